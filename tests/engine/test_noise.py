"""Random streams keyed by what they are for: rollout noise is a pure function of its key."""

from __future__ import annotations

import torch

from engine.noise import rollout_noise


def test_rollout_noise_is_a_pure_function() -> None:
    vs, as_ = (12, 16), (7, 16)
    torch.manual_seed(0)
    a = rollout_noise(3, 5, "a dog barks", 1, vs, as_)
    torch.manual_seed(12345)  # global RNG state must not matter
    _ = torch.randn(100)
    b = rollout_noise(3, 5, "a dog barks", 1, vs, as_)
    assert a[0].shape == vs and a[1].shape == as_
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (
        rollout_noise(3, 5, "a dog barks", 2, vs, as_),  # sample index
        rollout_noise(4, 5, "a dog barks", 1, vs, as_),  # seed
        rollout_noise(3, 6, "a dog barks", 1, vs, as_),  # iteration
        rollout_noise(3, 5, "a cat meows", 1, vs, as_),
    ):  # prompt
        assert not torch.allclose(a[0], other[0]) and not torch.allclose(a[1], other[1])
    # Video and audio draws are independent even at equal shapes.
    v, au = rollout_noise(3, 5, "x", 0, (7, 16), (7, 16))
    assert not torch.allclose(v, au)
    # Roughly standard normal.
    big = rollout_noise(0, 0, "p", 0, (4096, 16), (16, 16))[0]
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02
