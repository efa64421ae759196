"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add sync overhead, and stall badly on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
