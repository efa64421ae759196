"""The embedded latent rewards: a small default set that scores the clean LATENTS on the CPU, with no
decoder, so that training and tests run anywhere (the real system's rewards are large models:
VideoAlign, Audiobox Aesthetics, Synchformer).

The default set conflicts on purpose, which is what makes routing matter:

- ``av_sync`` wants the audio energy to rise and fall with the video motion, while
  ``audio_steadiness`` wants the audio energy flat: on the audio branch they pull in opposite ways.
- ``video_sharpness`` pulls the video toward spatial detail, which says nothing about the audio;
  for the audio branch it is pure noise.

Under vanilla (global) routing each branch is pushed by the weighted sum of all three, so each one
receives the other's signal as noise; modality routing sends the audio branch only
``audio_steadiness`` + ``av_sync`` and the video branch only ``video_sharpness`` + ``av_sync``.

Timing follows LTX-2's causal latent layout (models.latents, ARCHITECTURE.md sections 3-4): latent
video frame f covers pixel frames [max(0, 8f-7), 8f+1), and audio token i covers mel frames
[max(0, 4i-3), 4i+1) of 10 ms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Reward, Rollout, register

_EPS = 1e-6
# Relative spread below which a series counts as constant: far above float64 rounding of its mean
# (~1e-16), far below any real fluctuation.
_FLAT_RTOL = 1e-9


def _rms(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Root mean square over ``dims``: the energy scale that makes the default rewards scale-invariant."""
    return x.square().mean(dim=dims).sqrt()


@register
class VideoSharpness(Reward):
    """Spatial detail of the video latent relative to its energy.

    Mean absolute difference between horizontally and between vertically adjacent tokens (the two
    averaged), divided by the RMS of the sample's latent, so scaling the latent does not change the
    score. It judges each frame alone, so it is blind to the audio and to motion: for the audio branch
    it is pure noise, and under global routing it dilutes the audio rewards.
    """

    name = "video_sharpness"
    modality = "video"
    min_video_grid = (1, 2, 2)

    def score(self, rollout: Rollout) -> Tensor:
        _, h, w = rollout.video_grid
        if h < 2 or w < 2:
            raise ValueError(f"video_sharpness needs a latent grid of at least 2x2, got {h}x{w}")
        x = rollout.video_frames().float()
        dims = (1, 2, 3, 4)
        dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=dims)
        dh = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=dims)
        return (dw + dh) / 2 / (_rms(x, dims) + _EPS)


@register
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


@register
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
    min_video_grid = (3, 1, 1)  # two motion points at least: one correlation

    def score(self, rollout: Rollout) -> Tensor:
        num_frames = rollout.video_grid[0]
        if num_frames < 3:
            raise ValueError(f"av_sync needs at least 3 latent frames, got {num_frames}")
        num_tokens = rollout.audio.shape[1]
        if num_tokens < 2:
            raise ValueError(f"av_sync needs at least 2 audio tokens to interpolate, got {num_tokens}")

        x = rollout.video_frames().float()
        motion = _rms(x[:, 1:] - x[:, :-1], (2, 3, 4)).double()  # (N, F-1)
        frame_t = rollout.geometry.frame_times(num_frames, rollout.fps)
        motion_t = (frame_t[1:] + frame_t[:-1]) / 2

        envelope = _rms(rollout.audio.float(), (2,)).double()  # (N, T_a)
        sampled = _interp(motion_t, rollout.geometry.audio_token_times(num_tokens), envelope)
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


LATENT_REWARDS = (VideoSharpness.name, AudioSteadiness.name, AVSync.name)
