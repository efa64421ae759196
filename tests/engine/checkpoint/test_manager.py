"""The checkpoint manager: checksums written with every checkpoint and verified before a resume,
fallback to the newest intact checkpoint, a damaged `latest` pointer rebuilt, and how many are kept."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.checkpoint.integrity import MANIFEST, verify
from engine.config import load_config
from engine.errors import CheckpointError
from engine.metrics import read_metrics
from engine.parallel import ProcessLayout
from engine.trainer import Trainer
from tests.helpers import SMALL

SMALL = [*SMALL, "checkpoint_every=1"]


def _cfg(run_dir, *extra):
    return load_config(None, [*SMALL, f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A run of 3 iterations with a checkpoint after each."""
    run = tmp_path_factory.mktemp("three")
    Trainer(_cfg(run, "iterations=3")).run()
    return run


@pytest.fixture
def run(three, tmp_path):
    return shutil.copytree(three, tmp_path / "run")


def test_every_checkpoint_carries_the_checksums_of_its_files(run):
    ckpt = run / "checkpoints" / "iter_000002"
    assert set(json.loads((ckpt / MANIFEST).read_text())) == {
        "model.safetensors", "old_model.safetensors", "optimizer.rank0.pt", "rng.rank0.pt", "trainer_state.json"
    }  # fmt: skip
    assert verify(ckpt, ProcessLayout()) is None
    with (ckpt / "old_model.safetensors").open("r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    assert verify(ckpt, ProcessLayout()) == "checksum mismatch in old_model.safetensors"
    (ckpt / "rng.rank0.pt").unlink()
    assert verify(ckpt, ProcessLayout()) == "missing rng.rank0.pt"


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(run, capsys):
    (run / "checkpoints" / "iter_000002" / "model.safetensors").write_bytes(b"truncated")
    trainer = Trainer(_cfg(run, "iterations=3", "resume=true"))
    assert trainer.checkpoints.resume_from.name == "iter_000001"
    out = capsys.readouterr().out
    assert "skipped damaged checkpoints: iter_000002 (checksum mismatch in model.safetensors)" in out
    assert (run / "checkpoints" / "latest").read_text() == "iter_000001"
    assert [m["iteration"] for m in trainer.run()] == [2]
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]


@pytest.mark.parametrize("pointer", [b"iter_000009", b"\xff\xfe garbage", None], ids=["absent", "garbage", "deleted"])
def test_a_damaged_latest_pointer_is_rebuilt_from_the_directory(run, pointer, capsys):
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    if pointer is not None:
        latest.write_bytes(pointer)
    trainer = Trainer(_cfg(run, "iterations=4", "resume=auto"))
    assert trainer.checkpoints.resume_from.name == "iter_000002"
    assert latest.read_text() == "iter_000002"
    assert "`latest` named nothing usable; resuming iter_000002" in capsys.readouterr().out


def test_when_nothing_is_intact_resume_fails_naming_what_was_skipped(run, capsys):
    for ckpt in (run / "checkpoints").glob("iter_*"):
        (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        Trainer(_cfg(run, "iterations=4", "resume=true"))
    assert "iter_000000 (checksum mismatch in trainer_state.json)" in capsys.readouterr().out


def test_checkpoint_keep_keeps_the_last_n_and_every_kth(tmp_path):
    Trainer(_cfg(tmp_path / "a", "iterations=5", "checkpoint_keep=2")).run()
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("iter_*")) == ["iter_000003", "iter_000004"]
    Trainer(_cfg(tmp_path / "b", "iterations=5", "checkpoint_keep=1", "checkpoint_keep_every=2")).run()
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("iter_*"))
    assert kept == ["iter_000001", "iter_000003", "iter_000004"]


def test_pruning_judges_only_the_line_a_resumed_run_continues(run):
    """Resumed from iter_000000 of a run that reached iter_000002: the new iter_000001 and the one
    resumed from are the last two of this line; the abandoned newer iter_000002 is left alone."""
    (run / "checkpoints" / "latest").write_text("iter_000000")
    Trainer(_cfg(run, "iterations=2", "resume=true", "checkpoint_keep=2")).run()
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == ["iter_000000", "iter_000001", "iter_000002"]
