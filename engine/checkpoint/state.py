"""The counters a checkpoint restores besides tensors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    iteration: int  # last completed iteration
    step: int  # optimizer steps taken
