"""Rollouts: the joint Euler ODE on the LTX-2 schedule, optional batched CFG and STG, and the noise levels
the loss is trained at. The V2A attention mass that region-wise reweighting needs is recorded on the fly
by the recorder the caller passes (engine.algorithm.reweighting), never as an N_a x N_v map."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models import LTX2AVTransformer

from .algorithm.reweighting import V2AMassRecorder
from .errors import ConfigError
from .fields import bounded
from .noise import stable_seed

BASE_SHIFT_TOKENS, MAX_SHIFT_TOKENS = 1024, 4096
BASE_SHIFT, MAX_SHIFT = 0.95, 2.05
SIGMA_MODES = ("highest", "uniform", "logit_normal")


@dataclass
class SamplerConfig:
    """`sampler.*`: the rollout schedule and guidance.

    Guidance is LTX2Pipeline's CFG (per stream) and STG (one scale for both streams, as its
    audio_stg_scale defaults to stg_scale); its modality-isolation guidance and guidance rescale are
    not implemented, which is modality_scale=1 and guidance_rescale=0 there.
    """

    steps: int = bounded(2, None, default=10)
    shift: float | None = None  # None: the LTX-2 pipelines' fixed 2.05
    terminal: float = bounded(0.0, 0.99, default=0.1)
    cfg_video: float = bounded(1.0, None, default=1.0)  # 1.0 = unguided (SPEC 1: rollouts are unguided)
    cfg_audio: float = bounded(1.0, None, default=1.0)
    stg_scale: float = bounded(0.0, None, default=0.0)  # spatio-temporal guidance; 0 = off
    # Blocks whose self-attention the STG pass skips; diffusers recommends [29] for LTX-2.0 (19B).
    stg_blocks: list[int] = field(default_factory=lambda: [29])

    def __post_init__(self) -> None:
        if any(i < 0 for i in self.stg_blocks) or len(set(self.stg_blocks)) != len(self.stg_blocks):
            raise ConfigError(f"sampler.stg_blocks must be distinct block indices >= 0; got {self.stg_blocks}")
        if self.stg_scale > 0 and not self.stg_blocks:
            raise ConfigError(
                "sampler.stg_scale > 0 needs sampler.stg_blocks (the blocks whose self-attention it skips)"
            )

    def check_blocks(self, num_layers: int) -> None:
        """With STG on, every STG block must exist in a model of `num_layers` blocks (a cross-section
        rule: the depth comes from engine.policy.model_config)."""
        bad = sorted(i for i in self.stg_blocks if i >= num_layers)
        if self.stg_scale > 0 and bad:
            raise ConfigError(
                f"sampler.stg_blocks {bad} are outside the model's blocks 0..{num_layers - 1} ({num_layers} blocks)"
            )

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
    stg_scale: float = 0.0,
    stg_blocks: Sequence[int] = (),
) -> RolloutResult:
    """Euler steps x <- x + (sigma_next - sigma) v on both streams from the given noise. `model` is
    the transformer or anything with its call signature (engine.parallel.PipelinedForward).

    Guidance runs as one batched forward of N rows per pass, in the order [conditional,
    unconditional (CFG), perturbed (STG)]. With cfg_video or cfg_audio > 1, v = v_u + scale (v_c - v_u)
    per stream; `uncond_context` gives the (video, audio) unconditional contexts, each (N, T_ctx,
    caption_channels). With stg_scale > 0, the perturbed rows take the conditional contexts and skip
    the self-attention of `stg_blocks` (the model checks them against its depth), and both streams
    add stg_scale (v_c - v_p). This is LTX2Pipeline's combine x0_c + (cfg - 1)(x0_c - x0_u) +
    stg_scale (x0_c - x0_p), rewritten in velocity space: x0 = x - sigma v is affine in v at fixed
    x and sigma. `v2a_recorder` (built for N rows: the conditional ones, which come first) records the
    V2A attention mass of the steps and blocks it was built for.
    """
    n = video_noise.shape[0]
    guided = cfg_video != 1.0 or cfg_audio != 1.0
    if guided and uncond_context is None:
        raise ValueError("sample: cfg_video/cfg_audio > 1 needs uncond_context")
    if stg_scale < 0:
        raise ValueError(f"sample: stg_scale must be >= 0, got {stg_scale}")
    perturb = stg_scale > 0
    if perturb and not stg_blocks:
        raise ValueError("sample: stg_scale > 0 needs stg_blocks (the blocks whose self-attention STG skips)")
    contexts = [(video_context, audio_context)] + [uncond_context] * guided + [(video_context, audio_context)] * perturb
    copies = len(contexts)
    ctx_v, ctx_a = (torch.cat(parts) for parts in zip(*contexts))
    stg = {}
    if perturb:  # the last N rows
        rows = torch.arange(copies * n, device=video_noise.device)
        stg = {"perturbed": rows >= (copies - 1) * n, "stg_blocks": frozenset(stg_blocks)}
    x, a = video_noise.clone(), audio_noise.clone()
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].to(x).expand(n)
        xin, ain, sin = (torch.cat([t] * copies) for t in (x, a, sigma)) if copies > 1 else (x, a, sigma)
        if v2a_recorder is not None:
            v2a_recorder.start_step(i)
        out_v, out_a = model(xin, ain, sin, ctx_v, ctx_a, video_grid, fps, v2a_probe=v2a_recorder, **stg)
        rows_v, rows_a = out_v.chunk(copies), out_a.chunk(copies)
        vc, ac = v_video, v_audio = rows_v[0], rows_a[0]
        if guided:
            vu, au = rows_v[1], rows_a[1]
            v_video, v_audio = vu + cfg_video * (vc - vu), au + cfg_audio * (ac - au)
        if perturb:
            vp, ap = rows_v[-1], rows_a[-1]
            v_video, v_audio = v_video + stg_scale * (vc - vp), v_audio + stg_scale * (ac - ap)
        dt = (sigmas[i + 1] - sigmas[i]).to(x)
        x, a = x + dt * v_video, a + dt * v_audio
    return RolloutResult(x, a, sigmas)
