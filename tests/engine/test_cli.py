"""The CLI's one error path: every mistake a user can make ends as one line on stderr and exit
status 2, never a traceback (engine.errors.UserError)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import models
from engine.checkpoint.integrity import write_manifest
from engine.cli import main
from engine.parallel import ProcessLayout
from tests.helpers import SMALL


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("omninft: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.mark.parametrize(
    "override, words",
    [
        ("surgery.schedule=[0.5, 1.0]", ["config error", "surgery.schedule has 2 entries"]),
        ("surgery.schedule=[0.5, 1.0, 1.0, 7.0]", ["config error", "surgery.schedule entries must be in [0, 1]"]),
        ("rewards=[{name: av_sync, modality: audio}]", ["rewards[0].modality", "cannot be set"]),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, capsys, override, words):
    assert main(["train", f"run_dir={tmp_path}", *SMALL, override]) == 2
    _one_line_error(capsys, *words)


def test_model_init_that_is_not_safetensors(tmp_path, capsys):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    assert main(["train", f"run_dir={tmp_path}", *SMALL, f"model.init={bogus}"]) == 2
    _one_line_error(capsys, "model.init", str(bogus), "not a readable safetensors file")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of one iteration with a full-format checkpoint."""
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "iterations=1", f"run_dir={run}", *SMALL]) == 0
    return run


def test_convert_accepts_a_full_checkpoint_directory(trained, tmp_path, capsys):
    ckpt = trained / "checkpoints" / "iter_000000"
    out = tmp_path / "diffusers.safetensors"
    assert main(["convert", str(ckpt), str(out), "--to", "diffusers"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    model = models.build_model("tiny")
    models.load_model_weights(model, out)  # every key and shape checked
    assert model.state_dict().keys() == {
        k[len("model.diffusion_model.") :] for k in load_file(ckpt / "model.safetensors")
    }


def test_convert_of_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    assert main(["convert", str(tmp_path), str(tmp_path / "x.safetensors"), "--to", "official"]) == 2
    _one_line_error(capsys, str(tmp_path), "not a training checkpoint")


def test_resume_in_another_layout_is_one_line(trained, tmp_path, capsys):
    ckpt = trained / "checkpoints" / "iter_000000"
    state = ckpt / "trainer_state.json"
    meta = json.loads(state.read_text())
    saved = state.read_text()
    try:  # as written by a TP=2 x DP=2 run (with its checksums: not a damaged checkpoint)
        state.write_text(json.dumps({**meta, "layout": {"tp": 2, "pp": 1, "dp": 2}}))
        write_manifest(ckpt, ProcessLayout())
        assert main(["train", "--resume", "iterations=2", f"run_dir={trained}", *SMALL]) == 2
    finally:
        state.write_text(saved)
        write_manifest(ckpt, ProcessLayout())
    _one_line_error(capsys, "was written with layout", "checkpoint_format=dist")


def test_distributed_checkpoint_without_torchrun_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "iter_000000"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")  # what marks a megatron dist_checkpointing directory
    (tmp_path / "checkpoints" / "latest").write_text(ckpt.name)
    assert main(["train", "--resume", f"run_dir={tmp_path}", *SMALL]) == 2
    _one_line_error(capsys, "is a distributed checkpoint", "torchrun")
