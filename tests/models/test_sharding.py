"""The sequence and head cuts a Sharding makes, in one process (the parallel runs are in
tests/engine/parallel/test_parallel.py)."""

from __future__ import annotations

import pytest
import torch

import models
from models import Sharding


def test_one_process_cuts_nothing():
    s = Sharding()
    x = torch.randn(2, 7, 3)
    assert s.padded_length(7) == s.local_length(7) == 7
    assert s.scatter(x) is x and torch.equal(s.gather(x, 7), x)
    assert s.key_mask(None, 2, 7, x.device) is None
    assert s.local_heads(4) == 4 and s.head_slice(4) == slice(0, 4)


def test_padding_to_row_multiples_masks_the_padded_keys_and_rotates_them_by_identity():
    s = Sharding().aligned(16)  # what the te backend's FP8 GEMMs need
    assert s.padded_length(7) == 16 and s.padded_length(16) == 16 and s.padded_length(17) == 32
    x = torch.randn(2, 7, 3)
    padded = s.scatter(x)
    assert padded.shape == (2, 16, 3) and torch.equal(padded[:, :7], x) and not padded[:, 7:].any()
    assert torch.equal(s.gather(padded, 7), x)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    full = s.key_mask(mask, 2, 7, x.device)
    assert full.shape == (2, 16) and torch.equal(full[:, :7], mask) and not full[:, 7:].any()
    assert s.key_mask(None, 2, 7, x.device)[:, :7].all()
    cos, sin = torch.rand(1, 2, 7, 4), torch.rand(1, 2, 7, 4)
    pcos, psin = s.pad_rope((cos, sin), 7)
    assert pcos.shape == (1, 2, 16, 4) and (pcos[:, :, 7:] == 1).all() and (psin[:, :, 7:] == 0).all()
    assert torch.equal(pcos[:, :, :7], cos) and torch.equal(psin[:, :, :7], sin)


def test_tensor_parallel_rank_gets_its_heads_and_sequence_share():
    s = Sharding(tp_size=2, tp_rank=1, sequence_parallel=True)
    assert s.sequence_shards == 2 and s.padded_length(7) == 8 and s.local_length(7) == 4
    assert s.local_heads(4) == 2 and s.head_slice(4) == slice(2, 4)
    with pytest.raises(ValueError, match="5 attention heads cannot be split over 2"):
        s.local_heads(5)
    with pytest.raises(ValueError, match="sequence parallelism needs more than one"):
        Sharding(sequence_parallel=True)


def test_layer_backends_take_their_row_multiple_into_the_sharding_and_refuse_what_they_cannot_split():
    assert models.backends.resolve_backend("torch").sharding == Sharding()
    with pytest.raises(ValueError, match="model.backend=fp8 builds whole layers; 2 tensor-parallel ranks"):
        models.build_model("tiny", backend="fp8", sharding=Sharding(tp_size=2, tp_rank=0))
    with pytest.raises(ValueError, match="a backend instance alone"):
        models.build_model("tiny", backend=models.TorchBackend(), sharding=Sharding())
