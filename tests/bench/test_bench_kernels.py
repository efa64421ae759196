"""bench/kernels.py on the CPU: every call and op of a block measured, wrong candidates caught, the table written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench import kernels as bench_kernels
from kernels import dispatch, reference
from kernels.dispatch import CallClass, DispatchTable


def test_block_calls_are_the_models_attentions() -> None:
    calls = {c.name: c for c in bench_kernels.block_calls(6144, 126, 1024, 200)}
    assert (calls["a2v"].nq, calls["a2v"].nk, calls["a2v"].dim) == (6144, 126, 64)
    assert (calls["v2a"].nq, calls["v2a"].nk) == (126, 6144) and "mass" in calls["v2a"].ops
    assert calls["video-self"].dim == 128 and calls["audio-text"].real_keys == 200
    assert "fwd+bwd/scaled" in calls["a2v"].ops


def test_cpu_run_writes_rows_and_table(tmp_path: Path, single_thread: None) -> None:
    out, table_path = tmp_path / "kernels.json", tmp_path / "table.json"
    assert bench_kernels.main(["--reps", "1", "--out", str(out), "--dispatch", str(table_path)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["shapes"] == "small"
    ran = [r for r in result["rows"] if "seconds" in r]
    assert {(r["case"], r["op"], r["kv_grad_scale"]) for r in ran} == {
        (c.name, op.removesuffix("/scaled"), 0.9 if op.endswith("/scaled") else 1.0)
        for c in bench_kernels.block_calls(*bench_kernels.SHAPES["small"][0])
        for op in c.ops
    }
    assert {r["impl"] for r in ran} == {"sdpa", "sdpa-flash", "torch"}
    assert all(r["rel_error_vs_reference"] < 1e-5 and r["tflops"] > 0 for r in ran)
    table = DispatchTable.load(table_path)
    entries = table.devices["cpu"]["float32"]
    assert entries == result["dispatch"] == dispatch.fastest(ran)
    for key, entry in entries.items():
        assert table.choose("cpu", "float32", CallClass.parse(key)) == entry["impl"]
        assert entry["impl"] == min(entry["ms"], key=entry["ms"].get)


def test_a_wrong_candidate_is_never_chosen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, single_thread: None
) -> None:
    flash = dispatch.IMPLEMENTATIONS["sdpa-flash"]
    wrong = dataclasses.replace(
        flash,
        attention=lambda q, k, v, g, m: flash.attention(q, k, v, g, m) * 1.1,
        attention_lse=lambda q, k, v, g, m: (flash.attention(q, k, v, g, m) * 1.1, reference.row_lse(q, k, m)),
    )
    monkeypatch.setitem(dispatch.IMPLEMENTATIONS, "sdpa-flash", wrong)
    out, table_path = tmp_path / "kernels.json", tmp_path / "table.json"
    assert bench_kernels.main(["--reps", "1", "--out", str(out), "--dispatch", str(table_path)]) == 1
    rows = json.loads(out.read_text())["rows"]
    wrong_rows = [r for r in rows if r["impl"] == "sdpa-flash"]
    assert wrong_rows and all(r["error"].startswith("WrongResult: relative error") for r in wrong_rows)
    assert "sdpa-flash" not in {
        e["impl"] for e in json.loads(table_path.read_text())["devices"]["cpu"]["float32"].values()
    }
    assert torch.isfinite(torch.tensor([r["rel_error_vs_reference"] for r in wrong_rows])).all()
