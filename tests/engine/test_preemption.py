"""Preemption: SIGTERM (or Ctrl-C) finishes the current iteration, checkpoints and exits 0; under
torchrun a signal to one rank stops every rank after the same iteration, and the run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from engine import preemption as preemption_module
from engine.config import load_config
from engine.metrics import read_metrics
from engine.preemption import Preemption
from engine.trainer import Trainer
from tests.helpers import ROOT, TASK, TIMEOUT_S, free_port

pytest.importorskip("megatron.core", reason="megatron-core is not installed (see README: test command)")


def test_one_signal_is_noted_a_duplicate_ignored_and_a_second_exits_at_once(monkeypatch):
    monkeypatch.setattr(preemption_module, "DUPLICATE_S", 0.05)
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # at once: the copy torchrun forwards of the same request
        assert preemption.received == "SIGINT"
        time.sleep(0.1)
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def _wait_for_iterations(path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (path.is_file() and path.read_text().count("\n") >= n):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)


def _torchrun(run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "engine.train", f"run_dir={run_dir}", "iterations=6", *TASK,
            *extra]  # fmt: skip


@pytest.mark.parametrize("who", ["rank1", "everyone"])
def test_sigterm_stops_both_ranks_after_the_same_iteration_and_the_run_resumes_exactly(tmp_path, who):
    """rank1: a signal that reaches one worker only; everyone: SLURM's way, torchrun and both workers
    (torchrun forwards its copy as well, and itself exits non-zero for having been signalled)."""
    run_dir, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_torchrun(run_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    _wait_for_iterations(run_dir / "metrics.jsonl", 1, proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    for target in rank1 if who == "rank1" else [psutil.Process(proc.pid), *workers]:
        target.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0 or who == "everyone", err[-4000:]
    stopped = int((run_dir / "checkpoints" / "latest").read_text()[5:])
    reason = "a signal to another rank" if who == "rank1" else "SIGTERM"
    assert stopped < 5 and f"stopped by {reason} after iteration {stopped}" in out, out[-2000:]
    ckpt = run_dir / "checkpoints" / f"iter_{stopped:06d}"
    assert {"optimizer.rank0.pt", "optimizer.rank1.pt"} <= {p.name for p in ckpt.iterdir()}  # both ranks wrote
    assert [r["iteration"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(stopped + 1))

    resumed = subprocess.run(_torchrun(run_dir, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(6))
    straight = Trainer(load_config(None, [*TASK, "iterations=6", f"run_dir={tmp_path / 'straight'}"])).run()
    for row, ref in zip(rows[stopped + 1 :], straight[stopped + 1 :]):  # data parallel = one process, to rounding
        for key in [k for k in ref if not k.startswith("time/")]:
            assert abs(row[key] - ref[key]) <= 1e-5 * max(1.0, abs(ref[key])), (row["iteration"], key)
    assert json.loads((ckpt / "trainer_state.json").read_text())["layout"] == {"tp": 1, "pp": 1, "dp": 2}
