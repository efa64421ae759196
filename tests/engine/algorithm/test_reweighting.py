"""Region weights against hand examples and an independent float64 formula."""

import math

import pytest
import torch

from engine.algorithm.reweighting import REWEIGHT_MODES, reference_blocks, reference_steps, region_weights


def test_minmax_hand_example() -> None:
    score = torch.tensor([[1.0, 2.0, 3.0, 5.0], [40.0, 10.0, 30.0, 20.0], [7.0, 7.0, 7.0, 7.0]])
    expected = torch.tensor([[1.0, 1.375, 1.75, 2.5], [2.5, 1.0, 2.0, 1.5], [1.0, 1.0, 1.0, 1.0]])
    out = region_weights(score, "minmax", lam=1.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def direct_zscore_sigmoid(score: torch.Tensor, frame_ids: list[int], lam_t: float) -> torch.Tensor:
    s = score.to(torch.float64)
    out = torch.empty_like(s)
    for b in range(s.shape[0]):
        for f in set(frame_ids):
            idx = [i for i, g in enumerate(frame_ids) if g == f]
            vals = [float(s[b, i]) for i in idx]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
            for i, v in zip(idx, vals):
                z = (v - mean) / (std + 1e-6)
                w = 1 + (lam_t - 1) / (1 + math.exp(-(lam_t - 1) * z))
                out[b, i] = min(max(w, 1.0), lam_t)
    return out


FRAMES = [0, 0, 1, 1, 1, 2, 0, 2, 2, 1]


def random_score(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, len(FRAMES), generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("step, lam_t", [(100, 1.125), (200, 1.25), (400, 1.5), (10_000, 1.5)])
def test_zscore_sigmoid_matches_formula_and_warmup(step: int, lam_t: float) -> None:
    score = random_score()
    out = region_weights(score, "zscore_sigmoid", lam=1.5, frame_ids=torch.tensor(FRAMES), step=step, warmup_steps=400)
    torch.testing.assert_close(out, direct_zscore_sigmoid(score, FRAMES, lam_t).float())
    assert out.max() > 1.0


def test_zscore_sigmoid_warmup_start_and_no_warmup() -> None:
    score, frames = random_score(1), torch.tensor(FRAMES)
    assert torch.equal(region_weights(score, "zscore_sigmoid", frame_ids=frames, step=0), torch.ones_like(score))
    no_warmup = region_weights(score, "zscore_sigmoid", lam=2.0, frame_ids=frames, step=0, warmup_steps=0)
    torch.testing.assert_close(no_warmup, direct_zscore_sigmoid(score, FRAMES, 2.0).float())


def test_zscore_sigmoid_bounds() -> None:
    score = torch.randn(4, len(FRAMES), generator=torch.Generator().manual_seed(2)) * 100
    out = region_weights(score, "zscore_sigmoid", lam=1.5, frame_ids=torch.tensor(FRAMES), step=400)
    assert out.min() >= 1.0 and out.max() <= 1.5


def test_weights_carry_no_grad_and_off_is_ones() -> None:
    score = random_score(3).requires_grad_(True)
    assert not region_weights(score, "minmax").requires_grad
    assert not region_weights(score, "zscore_sigmoid", frame_ids=torch.tensor(FRAMES), step=50).requires_grad
    assert torch.equal(region_weights(score, "off"), torch.ones(score.shape))


def test_errors() -> None:
    with pytest.raises(ValueError) as err:
        region_weights(random_score(), "softmax")
    assert all(m in str(err.value) for m in REWEIGHT_MODES)
    with pytest.raises(ValueError, match="frame_ids"):
        region_weights(random_score(), "zscore_sigmoid")
    with pytest.raises(ValueError, match="frame_ids"):
        region_weights(random_score(), "zscore_sigmoid", frame_ids=torch.tensor(FRAMES[:-1]))


def test_reference_blocks() -> None:
    assert reference_blocks(48) == list(range(10, 48))
    assert reference_blocks(4) == [1, 2, 3]  # reference blocks 0, 12, 24, 36
    assert reference_blocks(96) == list(range(20, 96))
    assert reference_blocks(48, first_deep_block=40) == list(range(40, 48))


def test_reference_steps() -> None:
    assert reference_steps(20) == list(range(10, 19))
    assert reference_steps(40) == list(range(20, 38))
    assert reference_steps(10) == [5, 6, 7, 8, 9]
    assert reference_steps(2) == [1]
    assert reference_steps(1) == [0]  # no step maps into 10-18: fall back to the last step
