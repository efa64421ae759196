"""The counters a checkpoint restores besides tensors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    iteration: int  # last completed iteration
    step: int  # optimizer steps taken
    bad_steps: int = 0  # steps skipped for a non-finite value (engine.guard)
