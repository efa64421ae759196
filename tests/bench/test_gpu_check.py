"""bench/gpu_check.py: the dry run end to end on the CPU, the wheel check, stage limits, the targets' verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench import gpu_check
from kernels import dispatch
from tests.helpers import ROOT


def test_dry_run_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    assert files == {
        "gpu_check.log",
        "env.json",
        "pytest.xml",
        "kernels.json",
        "dispatch_table.json",
        "step.json",
        "summary.json",
    }
    assert len(files) <= 8  # what the device tool brings back
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["env", "wheels", "kernels", "step", "pytest"]
    assert all(s["returncode"] == 0 for s in summary["stages"]) and summary["dry_run"]
    suite = ET.parse(out / "pytest.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("skipped")) == int(suite.get("tests"))  # no GPU here
    table = json.loads((out / "dispatch_table.json").read_text())
    committed = json.loads(dispatch.TABLE_PATH.read_text())["devices"]
    assert {k: v for k, v in table["devices"].items() if k != "cpu"} == committed  # merged into, not replaced
    assert table["devices"]["cpu"]["float32"] == summary["dispatch"]
    assert json.loads((out / "step.json").read_text())["device"] == "cpu"
    assert "===== summary" in proc.stdout and "===== step: passed" in (out / "gpu_check.log").read_text()


def test_gpu_test_files_are_found() -> None:
    files = gpu_check.gpu_test_files()
    assert "tests/kernels/test_triton_kernels.py" in files and "tests/kernels/test_dispatch.py" in files
    assert "tests/bench/test_gpu_check.py" not in files


def test_wheel_check(tmp_path: Path) -> None:
    for name in (
        "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl",
        "nvtx-0.2.17-cp312-cp312-manylinux2014_x86_64.whl",
    ):
        (tmp_path / name).touch()
    assert len(gpu_check.check_wheels(tmp_path)) == 2
    (tmp_path / "nvtx-0.2.16-cp312-cp312-manylinux2014_x86_64.whl").touch()
    with pytest.raises(ValueError, match=r"^--wheels .*: need one wheel per pin .*nvtx==0.2.17 \(found nvtx-0.2.16"):
        gpu_check.check_wheels(tmp_path)
    with pytest.raises(ValueError, match="megatron-core==0.19.2 \\(found none\\)"):
        gpu_check.check_wheels(tmp_path / "missing")


def test_a_stage_is_stopped_at_its_limit(tmp_path: Path) -> None:
    stage = gpu_check.Stage(
        "sleep", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1
    )
    with open(tmp_path / "log", "w") as log:
        outcome = gpu_check.run_stage(stage, 1.0, {}, log)
    assert outcome.returncode is None and not outcome.passed and outcome.seconds < 30
    assert "started" in (tmp_path / "log").read_text()


def _row(case: str, op: str, impl: str, seconds: float, scale: float = 1.0) -> dict:
    shape = [1, 32, 6144, 126, 64]
    return {"case": case, "op": op, "impl": impl, "seconds": seconds, "kv_grad_scale": scale, "shape": shape,
            "flops": 4e11, "bytes": 1e8}  # fmt: skip


def test_targets_are_judged_from_the_figures() -> None:
    kernels = {
        "matmul_tflops": 800.0,
        "copy_gbps": 4000.0,
        "rows": [
            _row("a2v", "fwd+bwd", "triton", 2e-3, 0.9),
            _row("a2v", "fwd+bwd", "sdpa", 1.5e-3, 0.9),
            _row("v2a", "fwd", "sdpa", 1e-3),
            _row("v2a", "fwd", "triton", 0.8e-3),
            _row("v2a", "mass", "triton", 0.4e-3),
            {k: v for k, v in _row("a2v", "fwd+bwd", "sdpa-flash", 0, 0.9).items() if k != "seconds"} | {"error": "x"},
        ],
    }
    step = {
        "matmul_tflops": 790.0,
        "forward_flops_parts": {},
        "backends": {"torch": {"step_s": 0.2, "tflops": 350.0, "mfu_measured": 0.443, "mfu_datasheet": 0.35},
                     "fp8": {"step_s": 0.16}},
    }  # fmt: skip
    verdicts = {t["target"]: t for t in gpu_check.judge(kernels, step)}
    assert (
        verdicts["a2v_fused_vs_sdpa_hook"]["value"] == pytest.approx(0.75)
        and not verdicts["a2v_fused_vs_sdpa_hook"]["met"]
    )
    assert "memory-bound floor of 0.025 ms" not in verdicts["a2v_fused_vs_sdpa_hook"]["limit"]
    assert "compute-bound floor of 0.500 ms" in verdicts["a2v_fused_vs_sdpa_hook"]["limit"]
    assert verdicts["mass_over_forward"]["value"] == pytest.approx(0.5) and verdicts["mass_over_forward"]["met"]
    assert "forward: triton" in verdicts["mass_over_forward"]["goal"]
    assert verdicts["step_mfu_bf16"]["met"]
    assert verdicts["fp8_step_speedup"]["value"] == pytest.approx(1.25) and not verdicts["fp8_step_speedup"]["met"]


def test_a_rerun_of_some_stages(tmp_path: Path) -> None:
    """`--stages` runs only those (in plan order), adds to the log, and keeps a dispatch table already there."""
    (tmp_path / "gpu_check.log").write_text("first run\n")
    table = {"about": "measured before", "devices": {}}
    (tmp_path / "dispatch_table.json").write_text(json.dumps(table))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--stages", "wheels", "env"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["env", "wheels"]
    assert (tmp_path / "gpu_check.log").read_text().startswith("first run\n")
    assert json.loads((tmp_path / "dispatch_table.json").read_text()) == table
    assert list(gpu_check.STAGES) == [s.name for s in gpu_check.stages(tmp_path, None, tmp_path, dry_run=True)]
