"""bench/compile_sm90.py on CPU: the kernels compile for Hopper (sm_90) with the installed Triton.

`--quick` compiles one bf16 variant per kernel and head dim with Triton's bundled ptxas, no GPU
needed. The tool runs in a subprocess without TRITON_INTERPRET: under the interpreter (which some
tests set before importing triton) the kernels would not be compiled at all. A second run feeds the
tool a launcher call that no longer matches its kernel and expects a reported failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

H100_MAX_SHARED = 232448  # bytes of shared memory per block
TRITON = importlib.util.find_spec("triton")
PTXAS = Path(TRITON.submodule_search_locations[0], "backends", "nvidia", "bin", "ptxas") if TRITON else None

pytestmark = [
    pytest.mark.skipif(TRITON is None, reason="triton is not installed"),
    pytest.mark.skipif(PTXAS is not None and not PTXAS.exists(), reason=f"Triton's bundled ptxas is missing ({PTXAS})"),
]

# A launcher that passes one argument fewer than its kernel takes (as after a signature change).
DRIFTED = """
import sys
from bench import compile_sm90 as tool

launcher_calls = tool.launcher_calls


def drifted(dtypes):
    call = next(c for c in launcher_calls(dtypes) if c.kernel == "_attn_fwd")
    call.args = call.args[:-1]
    yield call


tool.launcher_calls = drifted
sys.exit(tool.main(sys.argv[1:]))
"""


def run_tool(out: Path, *code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, *(code or ["-m", "bench.compile_sm90"]), "--quick", "--jobs", "2", "--out", str(out)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_quick_compile_for_sm90(tmp_path: Path) -> None:
    out = tmp_path / "compile.json"
    proc = run_tool(out)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    records = report["records"]
    assert report["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
    assert report["variants"] == report["compiled"] == len(records) and report["failed"] == 0
    assert {(r["kernel"], r["head_dim"]) for r in records} == {
        (k, d)
        for k in ("_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dq", "_attn_bwd_dkdv", "_attention_mass_kernel")
        for d in (64, 128)
    }
    for r in records:
        assert r["dtype"] == "bf16" and r["cubin"] and r["error"] is None and not r["problems"], r
        assert 0 <= r["shared"] <= H100_MAX_SHARED, r
        assert r["regs"] is not None and r["spill_store"] is not None, r  # the ptxas -v log was read
        if r["dots"]:
            assert r["wgmma"] > 0, r
    assert sum(r["dots"] > 0 for r in records) == 8  # every kernel but _attn_bwd_delta multiplies tiles


def test_signature_drift_is_a_failure(tmp_path: Path) -> None:
    out = tmp_path / "compile.json"
    proc = run_tool(out, "-c", DRIFTED)
    assert proc.returncode == 1, proc.stdout[-5000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["variants"] == report["failed"] == 1 and report["compiled"] == 0
    assert report["records"][0]["error"].startswith("TypeError"), report["records"][0]
    assert "FAILED _attn_fwd" in proc.stdout
