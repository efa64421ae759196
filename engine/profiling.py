"""NVTX ranges and the CUDA profiler capture window, for `nsys profile --capture-range=cudaProfilerApi`.

Ranges come from the `nvtx` package, not `torch.cuda.nvtx`, which raises without CUDA. With no
profiler attached an `nvtx` range costs about a function call, so the trainer annotates
unconditionally and CPU runs take the same code path as GPU runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nvtx
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

# The phases of one training iteration, as nsys shows them. One list, so trainer and docs agree.
ROLLOUT = "omninft.rollout"
DECODE = "omninft.decode"
REWARD = "omninft.reward"
ADVANTAGE = "omninft.advantage"
TRAIN_FWD = "omninft.train.fwd"
TRAIN_BWD = "omninft.train.bwd"
OPTIMIZER = "omninft.optimizer"
EMA = "omninft.ema"
RANGES = (ROLLOUT, DECODE, REWARD, ADVANTAGE, TRAIN_FWD, TRAIN_BWD, OPTIMIZER, EMA)


def nvtx_range(name: str) -> nvtx.annotate:
    """Context manager (or decorator) marking one NVTX push/pop range named `name`."""
    return nvtx.annotate(message=name)


class ScheduleTimers:
    """megatron's `config.timers` hook for its pipeline schedule, turned into NVTX ranges: with
    `training`, the compute phases are the trainer's forward and backward ranges (the backward runs
    inside megatron's schedule, so this is the only place to mark it); every other phase (p2p
    sends and receives, the whole schedule) is `omninft.pipeline.<phase>`, which shows the bubbles."""

    def __init__(self, training: bool):
        self.names = {"forward-compute": TRAIN_FWD, "backward-compute": TRAIN_BWD} if training else {}

    def __call__(self, phase: str, log_level: int | None = None) -> _PushPop:
        return _PushPop(self.names.get(phase, f"omninft.pipeline.{phase}"))


class _PushPop:
    def __init__(self, name: str):
        self.name = name

    def start(self, barrier: bool = False) -> None:
        nvtx.push_range(message=self.name)

    def stop(self) -> None:
        nvtx.pop_range()


@dataclass
class ProfileConfig:
    """`profile.*`: iterations between which torch.cuda.profiler is on (for nsys --capture-range=cudaProfilerApi)."""

    start_step: int | None = None
    end_step: int | None = None

    def __post_init__(self) -> None:
        if (
            (self.start_step is None) != (self.end_step is None)
            or self.start_step is not None
            and not 0 <= self.start_step <= self.end_step
        ):
            raise ConfigError(
                "profile.start_step and profile.end_step must be set together with 0 <= start_step <= end_step"
            )


class ProfilerWindow:
    """Captures iterations `start_step`..`end_step` (inclusive) with the CUDA profiler API.

    Under `nsys profile --capture-range=cudaProfilerApi`, nsys records only between
    `torch.cuda.profiler.start()` and `stop()`, which skips warm-up and keeps the report small. Both
    steps None disables the window. Without CUDA the window never calls the profiler and logs so
    once, since `torch.cuda.profiler` needs the CUDA runtime.
    """

    def __init__(self, start_step: int | None, end_step: int | None):
        if (start_step is None) != (end_step is None):
            raise ValueError(f"profiler window needs both start and end step or neither, got {start_step}, {end_step}")
        if start_step is not None and not 0 <= start_step <= end_step:
            raise ValueError(f"profiler window needs 0 <= start <= end, got start={start_step}, end={end_step}")
        self.start_step, self.end_step = start_step, end_step
        self.capturing = False
        self._said_no_cuda = False

    def _inside(self, iteration: int) -> bool:
        return self.start_step is not None and self.start_step <= iteration <= self.end_step

    def step(self, iteration: int) -> bool:
        """Call once at the start of every iteration, before its work. Starts the capture when
        `iteration` enters the window (also when a resumed run begins inside it) and stops it at
        the first iteration past the end. Returns whether the capture is open."""
        inside = self._inside(iteration)
        if inside and not self.capturing:
            if torch.cuda.is_available():
                torch.cuda.profiler.start()
                self.capturing = True
            elif not self._said_no_cuda:
                log.warning(
                    "profiler window %d..%d: CUDA is not available, nothing is captured", self.start_step, self.end_step
                )
                self._said_no_cuda = True
        elif not inside and self.capturing:
            self.close()
        return self.capturing

    def close(self) -> None:
        """Stops an open capture; call when training ends, in case it ends inside the window."""
        if self.capturing:
            torch.cuda.profiler.stop()
            self.capturing = False
