"""Rollouts: the joint Euler ODE on the LTX-2 schedule, optional batched CFG, and the noise levels the
loss is trained at. The V2A attention mass that region-wise reweighting needs is recorded on the fly
by the recorder the caller passes (engine.algorithm.reweighting), never as an N_a x N_v map."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models import LTX2AVTransformer

from .algorithm.reweighting import V2AMassRecorder
from .fields import bounded
from .noise import stable_seed

BASE_SHIFT_TOKENS, MAX_SHIFT_TOKENS = 1024, 4096
BASE_SHIFT, MAX_SHIFT = 0.95, 2.05
SIGMA_MODES = ("highest", "uniform", "logit_normal")


@dataclass
class SamplerConfig:
    """`sampler.*`: the rollout schedule and guidance."""

    steps: int = bounded(2, None, default=10)
    shift: float | None = None  # None: the LTX-2 pipelines' fixed 2.05
    terminal: float = bounded(0.0, 0.99, default=0.1)
    cfg_video: float = bounded(1.0, None, default=1.0)  # 1.0 = unguided (SPEC 1: rollouts are unguided)
    cfg_audio: float = bounded(1.0, None, default=1.0)

    def sigmas(self) -> Tensor:
        """The (steps + 1,) schedule these settings give."""
        return ltx2_sigmas(self.steps, MAX_SHIFT if self.shift is None else self.shift, self.terminal)


def shift_for_tokens(num_tokens: int) -> float:
    """LTX-2's token-count-dependent shift: 0.95 at 1024 tokens, 2.05 at 4096, linear between and beyond."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SHIFT_TOKENS - BASE_SHIFT_TOKENS)
    return BASE_SHIFT + slope * (num_tokens - BASE_SHIFT_TOKENS)


def ltx2_sigmas(steps: int, shift: float = MAX_SHIFT, terminal: float = 0.1) -> Tensor:
    """(steps + 1,) float32 noise levels from 1 to 0: linear, shifted by e^s / (e^s + 1/sigma - 1),
    then stretched so that the last non-zero level is `terminal` (pipelines call it with s = 2.05).
    The stretch divides by 1 - sigma of the last non-zero step, which is 0 for a single step."""
    if steps < 2:
        raise ValueError(f"sampler.steps must be >= 2 (the LTX-2 stretch is undefined for one step), got {steps}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    nonzero = sigmas != 0
    e = math.exp(shift)
    sigmas[nonzero] = e / (e + (1.0 / sigmas[nonzero] - 1.0))
    one_minus = 1.0 - sigmas[nonzero]
    sigmas[nonzero] = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    return sigmas.to(torch.float32)


def training_sigmas(schedule: Tensor, mode: str, fraction: float, num: int, seed: int, iteration: int) -> list[float]:
    """Noise levels the loss is evaluated at in one iteration (SPEC 3).

    highest: the first ceil(fraction * steps) levels of the rollout's own schedule (the noisiest; the
    authors' choice); uniform / logit_normal: `num` fresh draws in (0, 1), seeded by (seed, iteration).
    """
    if mode == "highest":
        steps = len(schedule) - 1
        return [float(s) for s in schedule[: max(1, math.ceil(fraction * steps))]]
    g = torch.Generator().manual_seed(stable_seed(seed, iteration, "train-sigmas"))
    if mode == "uniform":
        draws = torch.rand(num, generator=g, dtype=torch.float64)
    elif mode == "logit_normal":
        draws = torch.sigmoid(torch.randn(num, generator=g, dtype=torch.float64))
    else:
        raise ValueError(f"train.sigma_mode must be one of {', '.join(SIGMA_MODES)}; got {mode!r}")
    return [float(s) for s in draws.clamp(1e-3, 1.0)]


@dataclass
class RolloutResult:
    video: Tensor  # (N, T_v, C) clean video latents
    audio: Tensor  # (N, T_a, C) clean audio latents
    sigmas: Tensor  # (steps + 1,) the schedule used


@torch.no_grad()
def sample(
    model: LTX2AVTransformer,
    video_noise: Tensor,
    audio_noise: Tensor,
    video_context: Tensor,
    audio_context: Tensor,
    video_grid: tuple[int, int, int],
    fps: float,
    sigmas: Tensor,
    cfg_video: float = 1.0,
    cfg_audio: float = 1.0,
    uncond_context: tuple[Tensor, Tensor] | None = None,
    v2a_recorder: V2AMassRecorder | None = None,
) -> RolloutResult:
    """Euler steps x <- x + (sigma_next - sigma) v on both streams from the given noise. `model` is
    the transformer or anything with its call signature (engine.parallel.PipelinedForward).

    With cfg_video or cfg_audio > 1, the conditional and unconditional passes run as one batched
    forward and v = v_u + scale (v_c - v_u) per stream; `uncond_context` gives the (video, audio)
    unconditional contexts, each (N, T_ctx, caption_channels). `v2a_recorder` (built for the N
    conditional rows) records the V2A attention mass of the steps and blocks it was built for.
    """
    n = video_noise.shape[0]
    guided = cfg_video != 1.0 or cfg_audio != 1.0
    if guided and uncond_context is None:
        raise ValueError("sample: cfg_video/cfg_audio > 1 needs uncond_context")
    ctx_v, ctx_a = video_context, audio_context
    if guided:
        ctx_v = torch.cat([video_context, uncond_context[0]])
        ctx_a = torch.cat([audio_context, uncond_context[1]])
    x, a = video_noise.clone(), audio_noise.clone()
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].to(x).expand(n)
        xin, ain, sin = (torch.cat([x, x]), torch.cat([a, a]), torch.cat([sigma, sigma])) if guided else (x, a, sigma)
        if v2a_recorder is not None:
            v2a_recorder.start_step(i)
        v_video, v_audio = model(xin, ain, sin, ctx_v, ctx_a, video_grid, fps, v2a_probe=v2a_recorder)
        if guided:
            (vc, vu), (ac, au) = v_video.chunk(2), v_audio.chunk(2)
            v_video, v_audio = vu + cfg_video * (vc - vu), au + cfg_audio * (ac - au)
        dt = (sigmas[i + 1] - sigmas[i]).to(x)
        x, a = x + dt * v_video, a + dt * v_audio
    return RolloutResult(x, a, sigmas)
