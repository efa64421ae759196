"""Stopping a run cleanly on SIGTERM or SIGINT (SLURM preemption, a requeue, Ctrl-C): the current
iteration finishes, a checkpoint is written and the process exits 0; a second signal exits at once.

Under torchrun a signal may reach one rank only; after each iteration the ranks agree (a max over
every rank), so all of them stop after the same iteration and write the same checkpoint. A worker
often gets the same request twice within milliseconds (SLURM or the terminal signals every process,
and torchrun forwards its own copy): signals within `DUPLICATE_S` of the first count as one.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from .parallel import ProcessLayout

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_S = 1.0


class Preemption:
    """Context manager holding the signal handlers for the length of a run."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # only the main thread may install handlers
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum).name, time.monotonic()
        elif time.monotonic() - self._first_at > DUPLICATE_S:
            raise SystemExit(128 + signum)  # a second request: now

    def agreed(self, layout: ProcessLayout) -> str | None:
        """Collective: the signal that stops the run after this iteration, if any rank received one."""
        stop = layout.max_over("world", float(self.received is not None))
        return (self.received or "a signal to another rank") if stop else None
