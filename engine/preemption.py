"""Stopping a run cleanly on SIGTERM or SIGINT (SLURM preemption, a requeue, Ctrl-C): the current
iteration finishes, a checkpoint is written and the process exits 0; a second signal exits at once.

Under torchrun a signal may reach one rank only; after each iteration the ranks agree (a max over
every rank), so all of them stop after the same iteration and write the same checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from .parallel import ProcessLayout

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Context manager holding the signal handlers for the length of a run."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # only the main thread may install handlers
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise SystemExit(128 + signum)  # the second signal: now
        self.received = name

    def agreed(self, layout: ProcessLayout) -> str | None:
        """Collective: the signal that stops the run after this iteration, if any rank received one."""
        stop = layout.max_over("world", float(self.received is not None))
        return (self.received or "a signal to another rank") if stop else None
