"""Region-wise loss weights for video tokens from V2A attention mass (SPEC 5).

Video tokens that the audio attends to are the sound-emitting regions that decide sync quality;
weighting their loss up gives them more of the update. This module picks which blocks and sampling
steps are recorded, records the mass during the rollout (`V2AMassRecorder`, the model's V2A probe)
and maps the recorded score to weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import kernels
from models.latents import REFERENCE_DEPTH, reference_block

from ..errors import ConfigError
from ..fields import bounded, choice

REWEIGHT_MODES = ("minmax", "zscore_sigmoid", "off")
REFERENCE_STEPS = 20  # the authors' rollout length, the scale `first_step`/`last_step` are stated on


@dataclass
class ReweightConfig:
    """`reweight.*`: which V2A attention is recorded (deep blocks on the 48-block scale, late steps on
    the 20-step scale) and how its mass becomes video-token loss weights."""

    mode: str = choice(*REWEIGHT_MODES, default="minmax")
    lam: float = bounded(1.0, None, default=1.5)
    warmup_steps: int = bounded(0, None, default=400)
    first_deep_block: int = bounded(0, REFERENCE_DEPTH - 1, default=10)
    first_step: int = bounded(0, REFERENCE_STEPS - 1, default=10)  # steps 10-18 of a 20-step schedule, rescaled
    last_step: int = bounded(0, REFERENCE_STEPS - 1, default=18)

    def __post_init__(self) -> None:
        if self.last_step < self.first_step:
            raise ConfigError("reweight.last_step must be >= reweight.first_step")


def reference_blocks(num_layers: int, first_deep_block: int = 10) -> list[int]:
    """Deep blocks whose V2A attention mass is recorded: relative depth >= first_deep_block / 48.

    Deep blocks carry the cross-modal interaction; shallow ones attend for intra-modal reasons.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0 <= first_deep_block < REFERENCE_DEPTH:
        raise ValueError(f"first_deep_block must be in [0, {REFERENCE_DEPTH}), got {first_deep_block}")
    return [l for l in range(num_layers) if reference_block(l, num_layers) >= first_deep_block]


def reference_steps(
    num_steps: int, first: int = 10, last: int = 18, reference_steps: int = REFERENCE_STEPS
) -> list[int]:
    """Sampling steps whose attention mass is recorded (authors: steps 10-18 of 20).

    Late steps are used because the layout is settled by then. Step i of num_steps maps to step
    floor(i * reference_steps / num_steps) of the reference schedule; a schedule so short that no
    step maps into [first, last] records its final step.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= first <= last < reference_steps:
        raise ValueError(
            f"need 0 <= first <= last < reference_steps, got first={first}, last={last}, "
            f"reference_steps={reference_steps}"
        )
    steps = [i for i in range(num_steps) if first <= i * reference_steps // num_steps <= last]
    return steps or [num_steps - 1]


class V2AMassRecorder:
    """The model's V2A probe during a rollout: accumulates, per video token, the V2A attention mass
    summed over audio queries, averaged over heads, then over the recorded (block, step) pairs.

    Only the first `rows` batch rows count (the conditional half when CFG batches cond and uncond). The
    mass reuses the attention's log-sum-exp, so recording costs one pass over the logits, not two. A
    pipeline stage sees only its own blocks and a tensor-parallel rank only its heads: the trainer
    sums the stages' scores and averages the ranks' (engine.parallel.ProcessLayout)."""

    def __init__(
        self, steps: Sequence[int], blocks: Sequence[int], rows: int, num_video_tokens: int, device: torch.device | str
    ):
        self.steps, self.blocks = frozenset(steps), frozenset(blocks)
        self.rows = rows
        self.total = torch.zeros(rows, num_video_tokens, dtype=torch.float32, device=device)
        self.recorded_steps = 0
        self.active = False

    def start_step(self, step: int) -> None:
        """Called before each sampling step's model call."""
        self.active = step in self.steps
        self.recorded_steps += self.active

    def wants(self, block: int) -> bool:
        return self.active and block in self.blocks

    def record(self, block: int, q: Tensor, k: Tensor, lse: Tensor, first_row: int = 0) -> None:
        """q (B, H, N_a, D), k (B, H, N_v, D), lse (B, H, N_a) of batch rows first_row.. (a microbatch's
        rows within the sampled batch)."""
        stop = min(first_row + q.shape[0], self.rows)
        if stop > first_row:
            n = stop - first_row
            kernels.attention_mass(q[:n], k[:n], lse=lse[:n], out=self.total[first_row:stop])

    def rows_from(self, first_row: int) -> _RowOffset:
        """This recorder as the probe of a microbatch starting at batch row `first_row`."""
        return _RowOffset(self, first_row)

    def score(self) -> Tensor | None:
        """(rows, N_v) mean mass per video token, or None if no (step, block) pair was recorded."""
        if not (self.recorded_steps and self.blocks):
            return None
        return self.total / (self.recorded_steps * len(self.blocks))


@dataclass(frozen=True)
class _RowOffset:
    recorder: V2AMassRecorder
    first_row: int

    def wants(self, block: int) -> bool:
        return self.recorder.wants(block)

    def record(self, block: int, q: Tensor, k: Tensor, lse: Tensor) -> None:
        self.recorder.record(block, q, k, lse, self.first_row)


def _minmax_weights(score: Tensor, lam: float) -> Tensor:
    lo = score.amin(dim=1, keepdim=True)
    span = score.amax(dim=1, keepdim=True) - lo
    # A constant score has no region to emphasise: weight 1 everywhere instead of 0/0.
    normed = torch.where(span > 0, (score - lo) / span.clamp(min=torch.finfo(score.dtype).tiny), 0.0)
    return 1.0 + lam * normed


def _frame_zscore(score: Tensor, frame_ids: Tensor) -> Tensor:
    """z-score of each token within its sample and latent frame (population std)."""
    _, inverse, counts = torch.unique(frame_ids, return_inverse=True, return_counts=True)
    batch, n_frames = score.shape[0], counts.numel()
    index = inverse.to(score.device).expand(batch, -1)
    counts = counts.to(score)
    mean = torch.zeros(batch, n_frames, dtype=score.dtype, device=score.device).scatter_add_(1, index, score) / counts
    centred = score - mean.gather(1, index)
    var = torch.zeros_like(mean).scatter_add_(1, index, centred.square()) / counts
    return centred / (var.sqrt().gather(1, index) + 1e-6)


def region_weights(
    score: Tensor,
    mode: str = "minmax",
    lam: float = 1.5,
    frame_ids: Tensor | None = None,
    step: int = 0,
    warmup_steps: int = 400,
) -> Tensor:
    """Loss weights (B, N_v), float32 and gradient-free, from V2A attention mass score (B, N_v).

    minmax (paper): w = 1 + lam * minmax(s) per sample, in [1, 1 + lam].
    zscore_sigmoid (authors): per-frame z-score so every frame has its own emphasised region, lam
    warmed up from 1 to lam over warmup_steps training steps, w = clamp(1 + (lam_t - 1) *
    sigmoid((lam_t - 1) z), 1, lam_t).
    off: ones.
    """
    if mode not in REWEIGHT_MODES:
        raise ValueError(f"reweighting mode {mode!r} is not one of {REWEIGHT_MODES}")
    if score.dim() != 2:
        raise ValueError(f"score must be (B, N_v), got {tuple(score.shape)}")
    s = score.detach().to(torch.float32)
    if mode == "off":
        return torch.ones_like(s)
    if mode == "minmax":
        if lam < 0:
            raise ValueError(f"minmax reweighting needs lam >= 0, got {lam}")
        return _minmax_weights(s, lam)

    if lam < 1:
        raise ValueError(f"zscore_sigmoid reweighting needs lam >= 1, got {lam}")
    if frame_ids is None or frame_ids.shape != s.shape[1:]:
        got = None if frame_ids is None else tuple(frame_ids.shape)
        raise ValueError(f"zscore_sigmoid needs frame_ids of shape (N_v,) = ({s.shape[1]},), got {got}")
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step ({step}) and warmup_steps ({warmup_steps}) must be >= 0")
    progress = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    lam_t = 1.0 + (lam - 1.0) * progress
    z = _frame_zscore(s, frame_ids)
    return (1.0 + (lam_t - 1.0) * torch.sigmoid((lam_t - 1.0) * z)).clamp(1.0, lam_t)
