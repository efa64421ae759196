"""Rewards: typed scorers of generated audio-video samples, and the embedded default set.

Each reward declares the modality it judges (``video``, ``audio`` or ``av``) so that routing (SPEC
section 2) can send its advantage only to the branch(es) it is about. In the real system rewards are
large models (VideoAlign, Audiobox Aesthetics, Synchformer); the engine ships a small default set that
scores the clean LATENTS on the CPU, with no decoder, so that training and tests run anywhere.

The default set conflicts on purpose, which is what makes routing matter:

- ``av_sync`` wants the audio energy to rise and fall with the video motion, while
  ``audio_steadiness`` wants the audio energy flat: on the audio branch they pull in opposite ways.
- ``video_sharpness`` pulls the video toward spatial detail, which says nothing about the audio;
  for the audio branch it is pure noise.

Under vanilla (global) routing each branch is pushed by the weighted sum of all three, so each one
receives the other's signal as noise; modality routing sends the audio branch only
``audio_steadiness`` + ``av_sync`` and the video branch only ``video_sharpness`` + ``av_sync``.

Timing follows LTX-2's causal latent layout (ARCHITECTURE.md sections 3-4): latent video frame f
covers pixel frames [max(0, 8f-7), 8f+1), and audio token i covers [max(0, 4i-3), 4i+1) * 10 ms.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MODALITIES = ("video", "audio", "av")

_EPS = 1e-6
# Relative spread below which a series counts as constant: far above float64 rounding of its mean
# (~1e-16), far below any real fluctuation.
_FLAT_RTOL = 1e-9


@dataclass(frozen=True)
class Rollout:
    """What rewards score: clean latents of N samples."""

    video: Tensor  # (N, F*H*W, C) video latent tokens, f-major order (token index = (f*H + h)*W + w)
    audio: Tensor  # (N, T_a, C) audio latent tokens, 25 per second
    video_grid: tuple[int, int, int]  # (F, H, W) latent frames, height, width
    fps: float  # pixel frame rate
    prompts: tuple[str, ...]  # the prompt of each sample (length N)

    def __post_init__(self) -> None:
        """Rejects inconsistent shapes here, so rewards can index the grid without re-checking."""
        if self.video.ndim != 3 or self.audio.ndim != 3:
            raise ValueError(
                f"video and audio must be (N, tokens, C); got {tuple(self.video.shape)} "
                f"and {tuple(self.audio.shape)}"
            )
        n = self.video.shape[0]
        f, h, w = self.video_grid
        if self.video.shape[1] != f * h * w:
            raise ValueError(
                f"video has {self.video.shape[1]} tokens but video_grid {self.video_grid} implies {f * h * w}"
            )
        if self.audio.shape[0] != n or len(self.prompts) != n:
            raise ValueError(
                f"sample counts disagree: video {n}, audio {self.audio.shape[0]}, prompts {len(self.prompts)}"
            )
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a finite number > 0, got {self.fps}")

    @property
    def num_samples(self) -> int:
        """N, the batch size every score must match."""
        return self.video.shape[0]

    def video_frames(self) -> Tensor:
        """Video latent as (N, F, H, W, C): the f-major token order makes this a plain reshape."""
        f, h, w = self.video_grid
        return self.video.reshape(self.num_samples, f, h, w, self.video.shape[-1])


def video_frame_times(num_frames: int, fps: float) -> Tensor:
    """Midpoint time in seconds of each latent video frame, float64 (F,).

    Frame f covers pixel frames [max(0, 8f-7), 8f+1): the causal VAE gives frame 0 a single pixel
    frame and every later frame 8, so times are not a uniform grid.
    """
    f = torch.arange(num_frames, dtype=torch.float64)
    start = (8 * f - 7).clamp(min=0)
    end = 8 * f + 1
    return (start + end) / 2 / fps


def audio_token_times(num_tokens: int) -> Tensor:
    """Midpoint time in seconds of each audio latent token, float64 (T_a,).

    Token i covers mel frames [max(0, 4i-3), 4i+1) at 10 ms each (causal shift of the /4 encoder),
    so token 0 is shorter than the rest.
    """
    i = torch.arange(num_tokens, dtype=torch.float64)
    start = (4 * i - 3).clamp(min=0) * 0.01
    end = (4 * i + 1) * 0.01
    return (start + end) / 2


def _rms(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Root mean square over ``dims``: the energy scale that makes the default rewards scale-invariant."""
    return x.square().mean(dim=dims).sqrt()


def _check_weight(value: object, where: str) -> float:
    """Weights scale advantages; a non-positive or non-finite one would flip or poison them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a finite number > 0, got {value!r}")
    return float(value)


class Reward(abc.ABC):
    """A scorer of rollouts, typed by the modality it judges so routing can target its advantage."""

    name: str
    modality: str

    def __init__(self, weight: float = 1.0) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"reward {self.name!r} has modality {self.modality!r}; expected one of {MODALITIES}")
        self.weight = _check_weight(weight, f"{self.name}.weight")

    @abc.abstractmethod
    def score(self, rollout: Rollout) -> Tensor:
        """(N,) float scores, higher is better."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, modality={self.modality!r}, weight={self.weight})"


class RewardError(RuntimeError):
    """A reward raised or returned a non-finite / wrongly shaped score; the message names the reward."""


class VideoSharpness(Reward):
    """Spatial detail of the video latent relative to its energy.

    Mean absolute difference between horizontally and between vertically adjacent tokens (the two
    averaged), divided by the RMS of the sample's latent, so scaling the latent does not change the
    score. It judges each frame alone, so it is blind to the audio and to motion: for the audio branch
    it is pure noise, and under global routing it dilutes the audio rewards.
    """

    name = "video_sharpness"
    modality = "video"

    def score(self, rollout: Rollout) -> Tensor:
        _, h, w = rollout.video_grid
        if h < 2 or w < 2:
            raise ValueError(f"video_sharpness needs a latent grid of at least 2x2, got {h}x{w}")
        x = rollout.video_frames().float()
        dims = (1, 2, 3, 4)
        dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=dims)
        dh = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=dims)
        return (dw + dh) / 2 / (_rms(x, dims) + _EPS)


class AudioSteadiness(Reward):
    """Steadiness of the sound: minus the mean absolute step between consecutive audio tokens.

    Divided by the RMS of the sample's audio latent, so it is scale-invariant; 0 (its maximum) for a
    constant latent. It wants the audio energy flat over time, which directly opposes ``av_sync``'s
    demand that the energy rise and fall with the video motion.
    """

    name = "audio_steadiness"
    modality = "audio"

    def score(self, rollout: Rollout) -> Tensor:
        a = rollout.audio.float()
        if a.shape[1] < 2:
            raise ValueError(f"audio_steadiness needs at least 2 audio tokens, got {a.shape[1]}")
        step = (a[:, 1:] - a[:, :-1]).abs().mean(dim=(1, 2))
        return -step / (_rms(a, (1, 2)) + _EPS)


class AVSync(Reward):
    """Synchrony of audio energy with video motion, over time in seconds.

    Motion of latent frame f >= 1 is the RMS of x[f] - x[f-1], placed at the midpoint of the two
    frames' times; the audio envelope (per-token RMS) is linearly interpolated at those times (clamped
    at the ends) and the score is Pearson's r between the two series. It is the only reward that needs
    both streams, so routing sends it to both branches; on audio it fights ``audio_steadiness``.
    A constant motion or envelope leaves r undefined; such a sample scores 0 (no evidence either way).
    Needs at least 3 latent frames: with 2 there is one motion point and no correlation.
    """

    name = "av_sync"
    modality = "av"

    def score(self, rollout: Rollout) -> Tensor:
        num_frames = rollout.video_grid[0]
        if num_frames < 3:
            raise ValueError(f"av_sync needs at least 3 latent frames, got {num_frames}")
        num_tokens = rollout.audio.shape[1]
        if num_tokens < 2:
            raise ValueError(f"av_sync needs at least 2 audio tokens to interpolate, got {num_tokens}")

        x = rollout.video_frames().float()
        motion = _rms(x[:, 1:] - x[:, :-1], (2, 3, 4)).double()  # (N, F-1)
        frame_t = video_frame_times(num_frames, rollout.fps)
        motion_t = (frame_t[1:] + frame_t[:-1]) / 2

        envelope = _rms(rollout.audio.float(), (2,)).double()  # (N, T_a)
        sampled = _interp(motion_t, audio_token_times(num_tokens), envelope)
        return _pearson(sampled, motion).float()


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Linear interpolation of each row of fp (N, len(xp)) at x, clamped to the end values.

    xp must be increasing with at least 2 points; clamping x first makes out-of-range points take
    the end values exactly.
    """
    x = x.clamp(xp[0], xp[-1])
    hi = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    lo = hi - 1
    frac = (x - xp[lo]) / (xp[hi] - xp[lo])
    return fp[:, lo] + frac * (fp[:, hi] - fp[:, lo])


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson r of (N, K) series; 0 where either row is constant (r undefined)."""
    ca = a - a.mean(dim=1, keepdim=True)
    cb = b - b.mean(dim=1, keepdim=True)
    flat_a = ca.abs().amax(dim=1) <= _FLAT_RTOL * a.abs().amax(dim=1)
    flat_b = cb.abs().amax(dim=1) <= _FLAT_RTOL * b.abs().amax(dim=1)
    flat = flat_a | flat_b
    denom = (ca.square().sum(dim=1) * cb.square().sum(dim=1)).sqrt()
    r = (ca * cb).sum(dim=1) / torch.where(flat, torch.ones_like(denom), denom)
    return torch.where(flat, torch.zeros_like(r), r.clamp(-1.0, 1.0))


BUILTIN_REWARDS: dict[str, type[Reward]] = {cls.name: cls for cls in (VideoSharpness, AudioSteadiness, AVSync)}

_SPEC_KEYS = ("name", "weight")


def build_rewards(specs: Sequence[Mapping]) -> list[Reward]:
    """Builds built-in rewards from config specs like ``[{'name': 'video_sharpness', 'weight': 1.0}]``.

    A reward's modality is part of what it measures, so a spec cannot override it. Errors name the
    offending entry (``rewards[i]...``) so a bad config is fixed without guessing.
    """
    rewards: list[Reward] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        unknown = sorted(str(k) for k in spec if k not in _SPEC_KEYS)
        if unknown:
            hint = " (a reward's modality is its own and cannot be set)" if "modality" in unknown else ""
            raise ValueError(f"rewards[{i}] has unknown keys {unknown}; allowed keys: {list(_SPEC_KEYS)}{hint}")
        if "name" not in spec:
            raise ValueError(f"rewards[{i}].name is required")
        name = spec["name"]
        if name not in BUILTIN_REWARDS:
            raise ValueError(f"rewards[{i}].name {name!r} is unknown; available: {sorted(BUILTIN_REWARDS)}")
        if name in seen:
            raise ValueError(f"rewards[{i}].name {name!r} is a duplicate; each reward may appear once")
        seen.add(name)
        weight = _check_weight(spec.get("weight", 1.0), f"rewards[{i}].weight")
        rewards.append(BUILTIN_REWARDS[name](weight=weight))
    return rewards


def score_rewards(rewards: Sequence[Reward], rollout: Rollout) -> dict[str, Tensor]:
    """Runs every reward under torch.no_grad; returns name -> (N,) float32.

    A reward that raises, returns a wrong shape, or returns any non-finite value raises RewardError
    naming the reward (chained from the original exception). It never substitutes a 0: a silently
    zeroed reward would still shift group advantages and train on garbage.
    """
    names = [r.name for r in rewards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"reward names must be unique, got duplicates {duplicates}")

    n = rollout.num_samples
    scores: dict[str, Tensor] = {}
    with torch.no_grad():
        for reward in rewards:
            try:
                out = reward.score(rollout)
            except Exception as exc:
                raise RewardError(f"reward {reward.name!r} raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(out, Tensor):
                raise RewardError(f"reward {reward.name!r} returned {type(out).__name__}, expected a Tensor")
            if out.shape != (n,):
                raise RewardError(f"reward {reward.name!r} returned shape {tuple(out.shape)}, expected ({n},)")
            out = out.float()
            if not torch.isfinite(out).all():
                raise RewardError(f"reward {reward.name!r} returned non-finite scores: {out.tolist()}")
            scores[reward.name] = out
    return scores
