"""Optional Weights & Biases logging: offline into the run directory, one W&B run per run directory
(continued on resume), and a clear error where the package is missing."""

from __future__ import annotations

import importlib.util

import pytest

from engine.config import load_config
from engine.errors import ConfigError
from engine.trainer import Trainer
from tests.helpers import SMALL

SMALL = [*SMALL, "log.wandb=true"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (test extra)")
def test_wandb_logs_offline_into_the_run_dir_and_a_resume_continues_the_same_run(tmp_path):
    Trainer(load_config(None, [*SMALL, f"run_dir={tmp_path}", "iterations=1"])).run()
    run_id = (tmp_path / "wandb_id").read_text()
    (first,) = (tmp_path / "wandb").glob("offline-run-*")
    assert first.name.endswith(run_id) and (first / f"run-{run_id}.wandb").stat().st_size > 0
    Trainer(load_config(None, [*SMALL, f"run_dir={tmp_path}", "iterations=2", "resume=true"])).run()
    assert (tmp_path / "wandb_id").read_text() == run_id
    assert all(p.name.endswith(run_id) for p in (tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_without_the_package_is_a_config_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"log.wandb=true needs the wandb package \(pip install wandb\)"):
        load_config(None, ["log.wandb=true"])
