"""The non-finite guard: a diverged step is caught before the optimizer applies it, is never
checkpointed, and the error says what went non-finite first, where and when.

Every check during a step is a flag on the device (no host sync per microbatch); `StepGuard.verdict`
sums the flags over all ranks (so every rank agrees to skip or stop) with one host sync per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import UserError
from .parallel import ProcessLayout

# In the order a NaN travels: the first flagged site is where it came from.
SITES = (
    "old-policy video output",
    "old-policy audio output",
    "policy video output",
    "policy audio output",
    "loss/video",
    "loss/audio",
    "loss/kl",
    "gradient",
)


class NonFiniteError(UserError):
    """Training produced a non-finite value more often than `train.max_bad_steps` allows (the run
    diverged: lower the learning rate, check the rewards' scale, or resume from an earlier checkpoint)."""


class StepGuard:
    """Non-finite flags of one optimizer step, per site and microbatch."""

    def __init__(self, microbatches: int, device: torch.device):
        self.flags = torch.zeros(len(SITES), max(1, microbatches), device=device)

    def check(self, site: str, microbatch: int, tensor: Tensor) -> None:
        """Flags `site` of `microbatch` when any entry of `tensor` is NaN or infinite (no host sync)."""
        self.flags[SITES.index(site), microbatch] += (~torch.isfinite(tensor.detach())).any()

    def verdict(self, layout: ProcessLayout) -> tuple[str, int] | None:
        """(site, microbatch) of the first non-finite value on any rank, or None (collective)."""
        bad = layout.sum_over("world", self.flags).nonzero()
        if not len(bad):
            return None
        site, microbatch = bad[0].tolist()
        return SITES[site], microbatch
