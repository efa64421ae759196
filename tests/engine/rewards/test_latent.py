"""Tests for engine.rewards: the embedded rewards on latents with known answers,
the failure contract of score_rewards, and config validation of build_rewards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.errors import ConfigError, RewardError
from engine.rewards import (
    LATENT_REWARDS,
    MODALITIES,
    REGISTRY,
    AudioSteadiness,
    AVSync,
    Reward,
    RewardSpec,
    Rollout,
    VideoSharpness,
    build_rewards,
    score_rewards,
)
from models.latents import LatentGeometry

FPS = 24.0


def make_rollout(video: torch.Tensor, audio: torch.Tensor, fps: float = FPS) -> Rollout:
    """Rollout from (N, F, H, W, C) video and (N, T_a, C) audio; flattening f-major as the patchifier does."""
    n, f, h, w, c = video.shape
    return Rollout(
        video=video.reshape(n, f * h * w, c),
        audio=audio,
        video_grid=(f, h, w),
        fps=fps,
        prompts=tuple(f"prompt {i}" for i in range(n)),
    )


def checkerboard(f: int, h: int, w: int, c: int) -> torch.Tensor:
    """±1 alternating in h and w: the sharpest pattern, every neighbour differs by 2."""
    hh = torch.arange(h).view(h, 1)
    ww = torch.arange(w).view(1, w)
    board = ((hh + ww) % 2 * 2 - 1).float()
    return board.view(1, 1, h, w, 1).expand(1, f, h, w, c).clone()


def rollout_with_motion(motion: torch.Tensor, envelope_of_t, c: int = 4, t_a: int = 60) -> Rollout:
    """One sample whose video moves by exactly motion[f-1] between frames f-1 and f (RMS of the step)
    and whose audio token RMS is envelope_of_t(token time)."""
    steps = torch.cat([torch.zeros(1), motion]).cumsum(0)
    video = steps.view(1, -1, 1, 1, 1).expand(1, motion.numel() + 1, 2, 3, c).clone()
    env = envelope_of_t(LatentGeometry().audio_token_times(t_a)).float()
    audio = env.view(1, t_a, 1).expand(1, t_a, c).clone()
    return make_rollout(video, audio)


def motion_times(num_frames: int, fps: float) -> np.ndarray:
    t = LatentGeometry().frame_times(num_frames, fps).numpy()
    return (t[1:] + t[:-1]) / 2


# ---------------------------------------------------------------- video_sharpness


def test_sharpness_constant_video_is_zero():
    video = torch.full((2, 3, 4, 5, 8), 2.5)
    audio = torch.zeros(2, 10, 8)
    assert torch.allclose(VideoSharpness().score(make_rollout(video, audio)), torch.zeros(2))


def test_sharpness_checkerboard_is_high_and_ordered():
    sharp = checkerboard(3, 4, 6, 8)
    # A horizontal ramp: neighbouring tokens differ by a small step, vertically not at all.
    ramp = torch.linspace(-1, 1, 6).view(1, 1, 1, 6, 1).expand(1, 3, 4, 6, 8).clone()
    video = torch.cat([sharp, ramp])
    scores = VideoSharpness().score(make_rollout(video, torch.zeros(2, 10, 8)))
    assert scores[0].item() == pytest.approx(2.0, rel=1e-5)  # |diff| = 2, RMS = 1
    assert scores[1].item() < 0.5 * scores[0].item()


def test_sharpness_scale_invariant():
    video = torch.randn(3, 3, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    audio = torch.zeros(3, 10, 8)
    a = VideoSharpness().score(make_rollout(video, audio))
    b = VideoSharpness().score(make_rollout(3 * video, audio))
    assert torch.allclose(a, b, rtol=1e-5)
    assert (a > 0).all()


# ---------------------------------------------------------------- audio_steadiness


def test_steadiness_constant_is_max_and_noise_is_lower():
    gen = torch.Generator().manual_seed(1)
    constant = torch.full((1, 50, 8), 0.7)
    slow = torch.sin(torch.linspace(0, math.pi, 50)).view(1, 50, 1).expand(1, 50, 8) + 1
    noisy = torch.randn(1, 50, 8, generator=gen)
    audio = torch.cat([constant, slow, noisy])
    video = torch.zeros(3, 3, 2, 2, 8)
    scores = AudioSteadiness().score(make_rollout(video, audio))
    assert scores[0].item() == 0.0
    assert scores[0] > scores[1] > scores[2]
    assert (scores <= 0).all()


def test_steadiness_scale_invariant():
    audio = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(2))
    video = torch.zeros(2, 3, 2, 2, 8)
    a = AudioSteadiness().score(make_rollout(video, audio))
    b = AudioSteadiness().score(make_rollout(video, 3 * audio))
    assert torch.allclose(a, b, rtol=1e-5)


# ---------------------------------------------------------------- av_sync


def test_av_sync_linear_envelope_gives_exact_plus_and_minus_one():
    # Motion growing linearly with its time and an envelope linear in time: interpolation is exact.
    num_frames = 7
    mt = torch.from_numpy(motion_times(num_frames, FPS))
    motion = (0.5 + 2.0 * mt).float()
    up = rollout_with_motion(motion, lambda t: 1.0 + 3.0 * t)
    down = rollout_with_motion(motion, lambda t: 10.0 - 3.0 * t)
    assert AVSync().score(up).item() == pytest.approx(1.0, abs=1e-5)
    assert AVSync().score(down).item() == pytest.approx(-1.0, abs=1e-5)


def test_av_sync_envelope_following_motion():
    # A non-monotone motion; the audio envelope traces it (piecewise linear in seconds).
    motion = torch.tensor([0.2, 1.5, 0.4, 2.0, 0.3, 1.0])
    mt = motion_times(motion.numel() + 1, FPS)

    def follow(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.interp(t.numpy(), mt, motion.numpy()))

    def anti(t: torch.Tensor) -> torch.Tensor:
        return 3.0 - follow(t)

    assert AVSync().score(rollout_with_motion(motion, follow)).item() > 0.99
    assert AVSync().score(rollout_with_motion(motion, anti)).item() < -0.99


def test_av_sync_matches_numpy_pearson():
    gen = torch.Generator().manual_seed(3)
    n, f, h, w, c, t_a = 4, 9, 3, 4, 16, 40  # audio shorter than video: exercises the end clamp
    video = torch.randn(n, f, h, w, c, generator=gen)
    audio = torch.randn(n, t_a, c, generator=gen) * torch.rand(n, t_a, 1, generator=gen)
    scores = AVSync().score(make_rollout(video, audio))

    v = video.double().numpy()
    a = audio.double().numpy()
    frame_t = np.array([(max(0, 8 * i - 7) + 8 * i + 1) / 2 / FPS for i in range(f)])
    token_t = np.array([(max(0, 4 * i - 3) + 4 * i + 1) * 0.01 / 2 for i in range(t_a)])
    mt = (frame_t[1:] + frame_t[:-1]) / 2
    assert mt[-1] > token_t[-1]
    for s in range(n):
        motion = np.sqrt(((v[s, 1:] - v[s, :-1]) ** 2).mean(axis=(1, 2, 3)))
        envelope = np.sqrt((a[s] ** 2).mean(axis=1))
        expected = np.corrcoef(np.interp(mt, token_t, envelope), motion)[0, 1]
        assert scores[s].item() == pytest.approx(expected, abs=1e-5)


def test_av_sync_constant_series_scores_zero():
    motion = torch.tensor([0.2, 1.5, 0.4, 2.0])
    steady_audio = rollout_with_motion(motion, lambda t: torch.full_like(t, 0.8))
    still_video = rollout_with_motion(torch.full((4,), 0.5), lambda t: 1.0 + torch.sin(8 * t))
    assert AVSync().score(steady_audio).item() == 0.0
    assert AVSync().score(still_video).item() == 0.0


def test_av_sync_needs_three_frames():
    rollout = make_rollout(torch.randn(1, 2, 2, 2, 4), torch.randn(1, 20, 4))
    with pytest.raises(ValueError, match="at least 3 latent frames"):
        AVSync().score(rollout)
    with pytest.raises(RewardError, match="av_sync") as info:
        score_rewards([AVSync()], rollout)
    assert isinstance(info.value.__cause__, ValueError)


# ---------------------------------------------------------------- score_rewards


class _Fixed(Reward):
    """Test reward returning a preset value, to drive score_rewards' checks."""

    modality = "video"

    def __init__(self, name: str, value) -> None:
        self.name = name
        super().__init__()
        self.value = value

    def score(self, rollout: Rollout) -> torch.Tensor:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class _NeedsGrad(Reward):
    """Records whether gradients were enabled while scoring."""

    name = "grad_probe"
    modality = "audio"

    def score(self, rollout: Rollout) -> torch.Tensor:
        self.grad_enabled = torch.is_grad_enabled()
        return torch.zeros(rollout.num_samples)


def small_rollout(n: int = 3) -> Rollout:
    gen = torch.Generator().manual_seed(4)
    return make_rollout(torch.randn(n, 4, 2, 3, 8, generator=gen), torch.randn(n, 20, 8, generator=gen))


def test_score_rewards_builtin_shapes_and_dtype():
    rollout = small_rollout()
    probe = _NeedsGrad()
    rewards = [*build_rewards([RewardSpec(k) for k in LATENT_REWARDS]), probe, _Fixed("f64", torch.ones(3).double())]
    scores = score_rewards(rewards, rollout)
    assert list(scores) == [*LATENT_REWARDS, "grad_probe", "f64"]
    for value in scores.values():
        assert value.shape == (3,) and value.dtype == torch.float32
        assert torch.isfinite(value).all()
    assert probe.grad_enabled is False


def test_score_rewards_wraps_exception():
    cause = KeyError("missing decoder")
    with pytest.raises(RewardError, match="exploding") as info:
        score_rewards([_Fixed("exploding", cause)], small_rollout())
    assert info.value.__cause__ is cause


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_score_rewards_rejects_non_finite(bad):
    value = torch.tensor([0.0, bad, 1.0])
    with pytest.raises(RewardError, match="broken.*non-finite"):
        score_rewards([_Fixed("broken", value)], small_rollout())


@pytest.mark.parametrize("value", [torch.zeros(2), torch.zeros(3, 1), torch.tensor(0.0), [0.0, 0.0, 0.0]])
def test_score_rewards_rejects_wrong_shape_or_type(value):
    with pytest.raises(RewardError, match="misshapen"):
        score_rewards([_Fixed("misshapen", value)], small_rollout())


def test_score_rewards_rejects_duplicate_names():
    with pytest.raises(ValueError, match="duplicates"):
        score_rewards([_Fixed("a", torch.zeros(3)), _Fixed("a", torch.zeros(3))], small_rollout())


# ---------------------------------------------------------------- the config's rewards list


def build(entries: list[dict]) -> list[Reward]:
    """The rewards of a config whose `rewards` list is `entries` (typed by the loader, then built)."""
    return build_rewards(load_config(None, [f"rewards={json.dumps(entries)}"]).rewards)


def test_build_rewards_defaults_and_modalities():
    rewards = build([{"name": "video_sharpness"}, {"name": "av_sync", "weight": 2}])
    assert [type(r) for r in rewards] == [VideoSharpness, AVSync]
    assert [r.weight for r in rewards] == [1.0, 2.0]
    assert {REGISTRY[name].modality for name in LATENT_REWARDS} == set(MODALITIES)
    assert REGISTRY["audio_steadiness"] is AudioSteadiness


def test_build_rewards_unknown_name_lists_available():
    with pytest.raises(ConfigError, match="clapp") as info:
        build([{"name": "clapp"}])
    for name in LATENT_REWARDS:
        assert name in str(info.value)


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "1.0", True, None])
def test_build_rewards_bad_weight(weight):
    with pytest.raises(ConfigError, match=r"rewards\[1\]\.weight"):
        build([{"name": "video_sharpness"}, {"name": "av_sync", "weight": weight}])


def test_build_rewards_duplicate():
    with pytest.raises(ConfigError, match=r"rewards\[1\].*duplicate"):
        build([{"name": "av_sync"}, {"name": "av_sync", "weight": 2.0}])


def test_build_rewards_unknown_keys():
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.modality, rewards\[0\]\.scale.*modality is its own"):
        build([{"name": "av_sync", "modality": "audio", "scale": 2}])


def test_build_rewards_missing_name():
    with pytest.raises(ConfigError, match=r"rewards\[0\] needs exactly one of name .* or cls"):
        build([{"weight": 1.0}])


def test_rewards_must_not_be_empty():
    with pytest.raises(ConfigError, match="rewards must name at least one reward"):
        build([])


def test_reward_rejects_bad_modality():
    class Odd(Reward):
        name = "odd"
        modality = "text"

        def score(self, rollout: Rollout) -> torch.Tensor:
            return torch.zeros(rollout.num_samples)

    with pytest.raises(ValueError, match="odd.*text"):
        Odd()


def test_rollout_rejects_inconsistent_grid():
    with pytest.raises(ValueError, match="video_grid"):
        Rollout(torch.zeros(1, 10, 4), torch.zeros(1, 5, 4), (2, 2, 2), FPS, ("p",))
