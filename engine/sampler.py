"""Rollouts: the joint Euler ODE on the LTX-2 schedule, optional batched CFG, and the V2A attention
mass that region-wise reweighting needs (recorded on the fly, never as an N_a x N_v map)."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

import kernels
from models import LTX2AVTransformer

BASE_SHIFT_TOKENS, MAX_SHIFT_TOKENS = 1024, 4096
BASE_SHIFT, MAX_SHIFT = 0.95, 2.05


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


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text: the same on every process, rank and Python run."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_normal(shape: Sequence[int], *seed_parts: object, device: torch.device | str = "cpu") -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(stable_seed(*seed_parts))
    return torch.randn(*shape, generator=g).to(device)


@dataclass(frozen=True)
class Prompt:
    """A prompt and its text features (stand-ins for the Gemma features the real pipeline feeds in)."""
    text: str
    context: Tensor  # (T_ctx, caption_channels)


def prompt_features(text: str, tokens: int, channels: int) -> Tensor:
    """Deterministic per-prompt features: a fixed random draw keyed by the prompt text."""
    return seeded_normal((tokens, channels), "prompt-features", text)


def rollout_noise(seed: int, iteration: int, prompt: str, sample: int, video_shape: tuple[int, int],
                  audio_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Initial noise of one sample: a function of (seed, iteration, prompt, sample index) only, so the
    rollouts do not depend on how samples are spread over processes."""
    return (seeded_normal(video_shape, seed, iteration, prompt, sample, "video"),
            seeded_normal(audio_shape, seed, iteration, prompt, sample, "audio"))


def training_noise(seed: int, iteration: int, prompt: str, sample: int, sigma_index: int,
                   video_shape: tuple[int, int], audio_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Forward-process noise of one sample at the iteration's `sigma_index`-th training sigma, keyed
    like `rollout_noise` so training does not depend on batching or layout either."""
    return (seeded_normal(video_shape, seed, iteration, prompt, sample, "train", sigma_index, "video"),
            seeded_normal(audio_shape, seed, iteration, prompt, sample, "train", sigma_index, "audio"))


class V2AMassRecorder:
    """Accumulates, per video token, the V2A attention mass summed over audio queries, averaged over
    heads, then over the recorded (block, step) pairs. Only the first `rows` batch rows count (the
    conditional half when CFG batches cond and uncond). A pipeline stage sees only its own blocks:
    its score is its share of the sum over blocks, and the stages' scores add up."""

    def __init__(self, blocks: Sequence[int], rows: int, num_video_tokens: int, device: torch.device):
        self.blocks = frozenset(blocks)
        self.rows = rows
        self.total = torch.zeros(rows, num_video_tokens, dtype=torch.float32, device=device)
        self.steps = 0
        self.active = False

    def start_step(self, record: bool) -> None:
        self.active = record
        self.steps += record

    def __call__(self, block: int, q: Tensor, k: Tensor, first_row: int = 0) -> None:
        """q, k of `block` for batch rows first_row.. (a microbatch's rows within the sampled batch)."""
        stop = min(first_row + q.shape[0], self.rows)
        if self.active and block in self.blocks and stop > first_row:
            n = stop - first_row
            kernels.attention_mass(q[:n], k[:n], out=self.total[first_row:stop])

    def score(self) -> Tensor | None:
        return self.total / (self.steps * len(self.blocks)) if self.steps else None


@dataclass
class RolloutResult:
    video: Tensor             # (N, T_v, C) clean video latents
    audio: Tensor             # (N, T_a, C) clean audio latents
    sigmas: Tensor            # (steps + 1,) the schedule used
    v2a_score: Tensor | None  # (N, T_v) mean V2A attention mass per video token, if recorded


@torch.no_grad()
def sample(model: LTX2AVTransformer, video_noise: Tensor, audio_noise: Tensor, video_context: Tensor,
           audio_context: Tensor, video_grid: tuple[int, int, int], fps: float, sigmas: Tensor,
           cfg_video: float = 1.0, cfg_audio: float = 1.0, uncond_context: tuple[Tensor, Tensor] | None = None,
           record_steps: Sequence[int] = (), record_blocks: Sequence[int] = ()) -> RolloutResult:
    """Euler steps x <- x + (sigma_next - sigma) v on both streams from the given noise. `model` is
    the transformer or anything with its call signature and `backend` (engine.pipeline.PipelinedForward).

    With cfg_video or cfg_audio > 1, the conditional and unconditional passes run as one batched
    forward and v = v_u + scale (v_c - v_u) per stream; `uncond_context` gives the (video, audio)
    unconditional contexts, each (N, T_ctx, caption_channels).
    """
    n = video_noise.shape[0]
    guided = cfg_video != 1.0 or cfg_audio != 1.0
    if guided and uncond_context is None:
        raise ValueError("sample: cfg_video/cfg_audio > 1 needs uncond_context")
    ctx_v, ctx_a = video_context, audio_context
    if guided:
        ctx_v = torch.cat([video_context, uncond_context[0]])
        ctx_a = torch.cat([audio_context, uncond_context[1]])
    recorder = None
    if record_steps and record_blocks:
        recorder = V2AMassRecorder(record_blocks, n, video_noise.shape[1], video_noise.device)
    record_steps = set(record_steps)
    x, a = video_noise.clone(), audio_noise.clone()
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].to(x).expand(n)
        xin, ain, sin = (torch.cat([x, x]), torch.cat([a, a]), torch.cat([sigma, sigma])) if guided else (x, a, sigma)
        if recorder is not None:
            recorder.start_step(i in record_steps)
        v_video, v_audio = model(xin, ain, sin, ctx_v, ctx_a, video_grid, fps, v2a_probe=recorder)
        if guided:
            (vc, vu), (ac, au) = v_video.chunk(2), v_audio.chunk(2)
            v_video, v_audio = vu + cfg_video * (vc - vu), au + cfg_audio * (ac - au)
        dt = (sigmas[i + 1] - sigmas[i]).to(x)
        x, a = x + dt * v_video, a + dt * v_audio
    score = None if recorder is None else recorder.score()
    return RolloutResult(x, a, sigmas, None if score is None else model.backend.tp_average(score))
