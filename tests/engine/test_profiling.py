"""NVTX ranges and the CUDA profiler window: safe on CPU, start/stop exactly at the window's edges."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import profiling
from engine.profiling import ProfilerWindow, nvtx_range


class _FakeProfiler:
    """Stands in for torch.cuda.profiler: records (call, iteration being stepped)."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.iteration = -1

    def run(self, window: ProfilerWindow, iterations: range) -> list[bool]:
        flags = []
        for it in iterations:
            self.iteration = it
            flags.append(window.step(it))
        return flags


@pytest.fixture
def profiler(monkeypatch) -> _FakeProfiler:
    fake = _FakeProfiler()
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: fake.calls.append(("start", fake.iteration)))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: fake.calls.append(("stop", fake.iteration)))
    return fake


def test_range_names_are_one_dotted_list():
    assert len(set(profiling.RANGES)) == len(profiling.RANGES) == 8
    assert all(name.startswith("omninft.") for name in profiling.RANGES)
    assert profiling.TRAIN_FWD == "omninft.train.fwd" and profiling.TRAIN_BWD == "omninft.train.bwd"


def test_pipeline_schedule_phases_become_ranges(monkeypatch):
    """megatron's schedule timers: compute phases are the trainer's fwd/bwd ranges when training,
    every other phase is omninft.pipeline.<phase>; start/stop push and pop one range each."""
    pushed = []
    monkeypatch.setattr(profiling.nvtx, "push_range", lambda message: pushed.append(message))
    monkeypatch.setattr(profiling.nvtx, "pop_range", lambda: pushed.append(None))
    train, forward_only = profiling.ScheduleTimers(True), profiling.ScheduleTimers(False)
    for timers, phase in (
        (train, "forward-compute"),
        (train, "backward-compute"),
        (train, "forward-send"),
        (forward_only, "forward-compute"),
    ):
        timer = timers(phase, log_level=2)
        timer.start(barrier=False)
        timer.stop()
    assert pushed == [
        profiling.TRAIN_FWD,
        None,
        profiling.TRAIN_BWD,
        None,
        "omninft.pipeline.forward-send",
        None,
        "omninft.pipeline.forward-compute",
        None,
    ]


def test_ranges_nest_on_cpu_and_pass_values_and_errors_through():
    x = torch.ones(3)
    with nvtx_range(profiling.ROLLOUT):
        with nvtx_range(profiling.TRAIN_FWD):
            y = x * 2
        with nvtx_range(profiling.TRAIN_BWD):
            z = y + 1
    assert torch.equal(z, torch.full((3,), 3.0))
    with pytest.raises(KeyError), nvtx_range(profiling.REWARD):
        raise KeyError("inside")
    with nvtx_range(profiling.EMA):  # the failed range was popped: ranges still open and close
        pass

    @nvtx_range(profiling.OPTIMIZER)
    def step(a: int) -> int:
        return a + 1

    assert step(1) == 2


def test_window_starts_and_stops_at_its_edges(monkeypatch, profiler):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    window = ProfilerWindow(3, 5)
    flags = profiler.run(window, range(10))
    assert profiler.calls == [("start", 3), ("stop", 6)]
    assert flags == [False] * 3 + [True] * 3 + [False] * 4
    window.close()
    assert len(profiler.calls) == 2


def test_window_of_one_step_and_resume_inside(monkeypatch, profiler):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    profiler.run(ProfilerWindow(2, 2), range(5))
    assert profiler.calls == [("start", 2), ("stop", 3)]
    profiler.calls.clear()
    profiler.run(ProfilerWindow(3, 8), range(5, 10))  # a run resumed at iteration 5 still captures 5..8
    assert profiler.calls == [("start", 5), ("stop", 9)]


def test_close_stops_a_window_open_at_the_end(monkeypatch, profiler):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    window = ProfilerWindow(1, 100)
    profiler.run(window, range(4))
    window.close()
    window.close()
    assert profiler.calls == [("start", 1), ("stop", 3)]
    assert not window.capturing


def test_no_cuda_never_touches_the_profiler_and_says_so_once(monkeypatch, profiler, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    window = ProfilerWindow(0, 3)
    with caplog.at_level(logging.WARNING, logger="engine.profiling"):
        flags = profiler.run(window, range(6))
        window.close()
    assert profiler.calls == [] and flags == [False] * 6
    assert sum("CUDA is not available" in r.getMessage() for r in caplog.records) == 1


def test_disabled_window_never_captures(monkeypatch, profiler):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert profiler.run(ProfilerWindow(None, None), range(5)) == [False] * 5
    assert profiler.calls == []


@pytest.mark.parametrize("start, end", [(5, 3), (None, 3), (2, None), (-1, 2)])
def test_bad_window_raises(start, end):
    with pytest.raises(ValueError, match="profiler window"):
        ProfilerWindow(start, end)
