"""Test-only: lets megatron-core 0.19.2 run on CPU tensors over gloo.

megatron-core hard-codes CUDA in its buffers, collectives and pipeline schedule
(`torch.cuda.current_device()` as an allocation device, `torch.cuda.synchronize()`, a
`torch.zeros(..., device="cuda")` token counter in the schedule). Without CUDA these are mapped to
the CPU; with CUDA nothing is touched, so GPU runs exercise megatron exactly as shipped.
"""
from __future__ import annotations

import torch


def install() -> bool:
    """Returns True when the shim is active (no CUDA)."""
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    zeros = torch.zeros

    def cpu_zeros(*args, device=None, **kwargs):
        return zeros(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)

    torch.zeros = cpu_zeros
    return True
