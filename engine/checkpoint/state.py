"""The counters a checkpoint restores besides tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class TrainState:
    iteration: int  # last completed iteration
    step: int  # optimizer steps taken
    bad_steps: int = 0  # steps skipped for a non-finite value (engine.guard)

    @classmethod
    def from_saved(cls, saved: Mapping) -> TrainState:
        """The counters a checkpoint stored (one from before `bad_steps` existed counts none)."""
        return cls(iteration=saved["iteration"], step=saved["step"], bad_steps=saved.get("bad_steps", 0))
