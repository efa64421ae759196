"""Helpers shared by the test modules: the repository root, the small task the multi-process tests
train on, and the torchrun launcher of the workers in tests/dist/ (importable without the CPU shim)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

TASK = [
    "train.prompts_per_iteration=2",
    "train.group_size=4",
    "train.batch_size=4",
    "sampler.steps=4",
    "task.video_grid=[3,2,2]",
    "reweight.warmup_steps=0",
    "log.progress=false",
    "log.tensorboard=false",
    "log.plot=false",
    "surgery.schedule=authors",
    # Adam's first step maps any gradient entry to +-lr * g / (|g| + eps): with eps=1e-8, entries that
    # are numerically zero (~1e-10 of either sign, depending on summation order) would move by 3e-6.
    "optim.eps=1e-6",
]


# The single-process tests' task: one optimizer step per iteration on 6 samples, no logs but metrics.
SMALL = ["train.prompts_per_iteration=2", "train.group_size=3", "train.batch_size=6", "sampler.steps=4",
         "task.video_grid=[3,2,2]", "log.tensorboard=false", "log.progress=false", "log.plot=false",
         "reweight.warmup_steps=0", "checkpoint_every=0"]  # fmt: skip


def small_config(run_dir, *overrides: str):
    """The SMALL task in `run_dir`, with `overrides` (key=value) applied last."""
    from engine.config import load_config

    return load_config(None, [*SMALL, f"run_dir={run_dir}", *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, nproc: int, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """tests/dist/<script> `args` on `nproc` CPU processes (gloo), OMP_NUM_THREADS=1, under a timeout (a
    failed rank would leave its peer waiting)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(ROOT / "tests" / "dist" / script),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def _failure(proc: subprocess.CompletedProcess | subprocess.TimeoutExpired) -> str:
    """torchrun's exit status (or timeout) and the tails of its output."""

    def text(x) -> str:
        return x.decode(errors="replace") if isinstance(x, bytes) else x or ""

    what = f"timed out after {proc.timeout:.0f} s" if isinstance(proc, subprocess.TimeoutExpired) else proc.returncode
    return f"torchrun failed ({what}):\n{text(proc.stdout)[-3000:]}\n{text(proc.stderr)[-6000:]}"


def _reports(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def torchrun(script: str, nproc: int, *args: str, out: Path) -> list[dict]:
    """Runs tests/dist/<script> on `nproc` CPU processes (gloo) under a timeout (a failed rank would leave
    its peer waiting) and returns the JSON verdict each rank wrote to <out>/rank<r>.json."""
    proc = _launch(script, nproc, [*args, "--out", str(out)], TIMEOUT_S)
    assert proc.returncode == 0, _failure(proc)
    results = _reports(out)
    assert len(results) == nproc, f"expected {nproc} rank reports, got {len(results)}"
    return results


def torchrun_cases(script: str, nproc: int, cases: dict[str, list[str]], out: Path) -> dict[str, list[dict]]:
    """Runs every case of `cases` (id -> the worker's arguments) in ONE torchrun launch of tests/dist/<script>
    on `nproc` processes and returns each case's rank reports (<out>/<id>/rank<r>.json). A launch costs
    ~10 s (2 processes) to ~20 s (4 processes) of start-up on a 2-core machine (every worker imports torch
    and megatron-core) before any work; the worker runs the cases one after the other, each from the state
    a fresh worker starts in (`worker_cases`). Raises AssertionError with torchrun's output when the launch
    fails (also after some cases finished: they are named), or when a case lacks a rank's report."""
    assert all(case and "/" not in case and not case.startswith("-") for case in cases), list(cases)
    args = ["--out", str(out)] + [a for case, case_args in cases.items() for a in ("--case", case, *case_args)]
    try:
        proc = _launch(script, nproc, args, TIMEOUT_S * len(cases))  # each case keeps the budget of a launch
    except subprocess.TimeoutExpired as e:
        proc = e
    reports = {case: _reports(out / case) for case in cases}
    if isinstance(proc, subprocess.TimeoutExpired) or proc.returncode != 0:
        finished = [case for case, r in reports.items() if len(r) == nproc]
        raise AssertionError(f"cases {list(cases)} in one launch, finished: {finished}; {_failure(proc)}")
    for case, r in reports.items():
        assert len(r) == nproc, f"case {case}: expected {nproc} rank reports, got {len(r)}"
    return reports


def _selected_cases(request) -> list:
    """The test items of `request.node`'s parametrized function (same function, same module or class) that
    this session runs (after -k, --lf, ...), in collection order."""
    item = request.node
    return [
        other
        for other in request.session.items
        if getattr(other, "originalname", None) == item.originalname and other.parent is item.parent
    ]


class SharedLaunches:
    """The torchrun launches of a parametrized test function's cases: one launch per process count.

    Why cases share a launch: start-up (~10 s for 2 processes, ~20 s for 4 on a 2-core machine) would
    otherwise be paid by every case. Made by a module-scoped fixture for one worker script; a test item
    (parametrized with `args`, the worker's arguments, and `nproc` unless every case uses the same count)
    calls `reports(request, nproc)`. The first item of a process count launches every *selected* item
    (after -k, --lf, ...) of the same test function with that count, in collection order, through
    `torchrun_cases`; each item then gets its own case's reports (pytest's --durations charges the launch to
    that first item). A failed launch fails every item of its group with torchrun's output, without
    launching again."""

    def __init__(self, script: str, tmp_path_factory):
        self.script, self.tmp_path_factory = script, tmp_path_factory
        self.outcomes: dict[tuple[str, int], dict[str, list[dict]] | str] = {}  # reports per case, or the failure

    def reports(self, request, nproc: int) -> list[dict]:
        """The rank reports of the case of test item `request.node` (its parametrize id)."""
        item = request.node
        key = (item.originalname, nproc)
        if key not in self.outcomes:
            group = {
                other.callspec.id: list(other.callspec.params["args"])
                for other in _selected_cases(request)
                if other.callspec.params.get("nproc", nproc) == nproc
            }
            out = self.tmp_path_factory.mktemp(f"{Path(self.script).stem}-{nproc}proc")
            try:
                self.outcomes[key] = torchrun_cases(self.script, nproc, group, out)
            except AssertionError as e:
                self.outcomes[key] = str(e)
        outcome = self.outcomes[key]
        if isinstance(outcome, str):
            raise AssertionError(outcome)
        return outcome[item.callspec.id]


class SharedPhases:
    """The torchrun launches of a parametrized test function whose cases each take several launches of one
    worker script in order (phases: e.g. a save, then a resume from the save's checkpoint): per phase, one
    launch per process count (`torchrun_cases`), so that start-up is paid once per phase and count.

    Made by a module-scoped fixture with `phases(params, case_dir)`: a case's launches, a list of (nproc, the
    worker's arguments) per phase, from its test item's parametrize values `params` and a folder `case_dir`
    of its own (e.g. for the worker's run directories). A test item calls `outputs(request)`. The first item
    launches every *selected* item (after -k, --lf, ...) of the same test function: phase 0 of all of them
    (a launch per process count, in order of first appearance), then phase 1, ... Each item then gets its
    `case_dir` and its phases' output folders (<out>/<id>: the rank reports and what the worker wrote there).
    A failed launch fails every item of its group with torchrun's output; their later phases are not run."""

    def __init__(self, script: str, tmp_path_factory, phases: Callable[[dict, Path], list[tuple[int, list[str]]]]):
        self.script, self.tmp_path_factory, self.phases = script, tmp_path_factory, phases
        self.outcomes: dict[str, dict[str, tuple[Path, list[Path]] | str]] = {}  # per function, per case; or failure

    def outputs(self, request) -> tuple[Path, list[Path]]:
        """The case dir and the output folder of each phase of the case of test item `request.node` (its
        parametrize id)."""
        item = request.node
        if item.originalname not in self.outcomes:
            self.outcomes[item.originalname] = self._run(_selected_cases(request))
        outcome = self.outcomes[item.originalname][item.callspec.id]
        if isinstance(outcome, str):
            raise AssertionError(outcome)
        return outcome

    def _run(self, items) -> dict[str, tuple[Path, list[Path]] | str]:
        root = self.tmp_path_factory.mktemp(Path(self.script).stem)
        dirs = {o.callspec.id: root / "cases" / o.callspec.id for o in items}
        launches = {o.callspec.id: self.phases(o.callspec.params, dirs[o.callspec.id]) for o in items}
        outcomes: dict[str, tuple[Path, list[Path]] | str] = {case: (dirs[case], []) for case in launches}
        for phase in range(max(len(v) for v in launches.values())):
            groups: dict[int, dict[str, list[str]]] = {}
            for case, phases in launches.items():
                if phase < len(phases) and not isinstance(outcomes[case], str):
                    nproc, args = phases[phase]
                    groups.setdefault(nproc, {})[case] = list(args)
            for nproc, group in groups.items():
                out = root / f"phase{phase}-{nproc}proc"
                try:
                    torchrun_cases(self.script, nproc, group, out)
                except AssertionError as e:
                    outcomes.update(dict.fromkeys(group, f"phase {phase} ({nproc} processes): {e}"))
                else:
                    for case in group:
                        outcomes[case][1].append(out / case)
        return outcomes


def worker_cases(argv: list[str] | None = None) -> Iterator[tuple[list[str], Path]]:
    """Worker side of `torchrun_cases`: the command line `--out DIR --case ID ARGS... [--case ID ARGS...]`
    gives (ARGS, DIR/ID) per case, in order (without --case: the whole command line but --out DIR is one
    case writing to DIR, a launch of `torchrun`). Each case starts from the state a fresh worker would: the
    torch, Python and numpy RNGs are put back to their state at the first case, megatron-core's model-parallel
    state is destroyed (the case initialises its own: engine.parallel.init_layout only does so when it is
    not), and, after a barrier, the previous case's objects are collected."""
    import gc
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    argv = list(sys.argv[1:] if argv is None else argv)
    at = argv.index("--out")
    out = Path(argv[at + 1])
    del argv[at : at + 2]
    if "--case" not in argv:
        cases = [(out, argv)]
    else:
        assert argv[0] == "--case", f"arguments before the first --case: {argv}"
        starts = [i for i, a in enumerate(argv) if a == "--case"] + [len(argv)]
        cases = [(out / argv[i + 1], argv[i + 2 : j]) for i, j in zip(starts, starts[1:])]
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    for n, (case_out, case_args) in enumerate(cases):
        if n:
            if dist.is_initialized():
                dist.barrier()
            gc.collect()
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            np.random.set_state(rng[2])
        yield case_args, case_out


def tiny_inputs(cfg) -> dict:
    """Forward arguments for a model of `cfg` (a `models.ModelConfig`): batch 2, a (2, 3, 4) latent grid,
    9 audio tokens, 7 and 6 context tokens, per-sample sigmas; fixed random values."""
    import torch

    g = torch.Generator().manual_seed(1)
    return dict(
        video=torch.randn(2, 24, cfg.in_channels, generator=g),
        audio=torch.randn(2, 9, cfg.audio_in_channels, generator=g),
        sigma=torch.rand(2, generator=g) * 0.9 + 0.05,
        video_context=torch.randn(2, 7, cfg.video_context_dim, generator=g),
        audio_context=torch.randn(2, 6, cfg.audio_context_dim, generator=g),
        video_grid=(2, 3, 4),
    )
