"""The counters a checkpoint restores besides tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class TrainState:
    iteration: int  # last completed iteration
    step: int  # optimizer steps taken
    bad_steps: int = 0  # steps skipped for a non-finite value (engine.guard)
    skipped_iterations: int = 0  # iterations dropped for a failed reward with on_failure: skip

    @classmethod
    def from_saved(cls, saved: Mapping) -> TrainState:
        """The counters a checkpoint stored (one from before a counter existed counts none)."""
        return cls(
            iteration=saved["iteration"],
            step=saved["step"],
            bad_steps=saved.get("bad_steps", 0),
            skipped_iterations=saved.get("skipped_iterations", 0),
        )
