"""The run directory: fresh runs never overwrite a previous run by accident, resume=auto, resumed runs
refuse to continue another model or seed and record every other change, and the logs read as if the
run had never stopped."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.cli import main
from engine.config import load_config
from engine.errors import ConfigError, DataError
from engine.metrics import read_metrics
from engine.trainer import Trainer
from tests.helpers import SMALL

SMALL = [*SMALL, "checkpoint_every=1"]


def _cfg(run_dir, *extra):
    return load_config(None, [*SMALL, f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """Metrics of an uninterrupted 3-iteration run, and a run dir holding the first 2 of them."""
    root = tmp_path_factory.mktemp("runs")
    straight = Trainer(_cfg(root / "straight", "iterations=3")).run()
    Trainer(_cfg(root / "run", "iterations=2")).run()
    return root, straight


def _without_times(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_a_fresh_run_refuses_a_used_run_dir(two_iterations, capsys):
    root, _ = two_iterations
    assert main(["train", *SMALL, f"run_dir={root / 'run'}", "iterations=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run (iter_000001, metrics.jsonl)" in err, err
    assert "--resume" in err and "overwrite=true" in err
    assert (root / "run" / "checkpoints" / "iter_000001").is_dir()  # nothing was touched


def test_overwrite_starts_over(tmp_path):
    Trainer(_cfg(tmp_path, "iterations=2")).run()
    Trainer(_cfg(tmp_path, "iterations=1", "overwrite=true")).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000000", "latest"]
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]


def test_resume_auto_starts_fresh_then_continues_exactly(two_iterations, tmp_path):
    root, straight = two_iterations
    fresh = Trainer(_cfg(tmp_path / "fresh", "iterations=1", "resume=auto"))
    assert not fresh.resuming
    (tmp_path / "fresh" / "metrics.jsonl").write_text('{"iteration": 0}\n')  # died before its first checkpoint
    assert not Trainer(_cfg(tmp_path / "fresh", "iterations=1", "resume=auto")).resuming
    run = shutil.copytree(root / "run", tmp_path / "run")
    resumed = Trainer(_cfg(run, "iterations=3", "resume=auto"))
    assert resumed.resuming
    (third,) = resumed.run()
    assert _without_times(third) == _without_times(straight[2])
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    changes = {"iterations": [2, 3], "run_dir": [str(root / "run"), str(run)]}
    assert history[-1] == {"resumed_from": "iter_000001", "changes": changes}


def test_resuming_another_model_or_seed_is_refused_with_a_diff(two_iterations):
    root, _ = two_iterations
    with pytest.raises(
        ConfigError, match=r"another seed would not continue that run \(seed: 0 -> 1\).*resume_overrides"
    ):
        Trainer(_cfg(root / "run", "iterations=2", "resume=true", "seed=1"))
    with pytest.raises(ConfigError, match="model.init_seed: 0 -> 5"):
        Trainer(_cfg(root / "run", "iterations=2", "resume=true", "model.init_seed=5"))
    # Refused before the model is built: building a 19B on this machine would not end well.
    with pytest.raises(ConfigError, match="another model.preset .*'tiny' -> 'ltx2-19b'"):
        Trainer(_cfg(root / "run", "iterations=2", "resume=true", "model.preset=ltx2-19b"))
    assert Trainer(_cfg(root / "run", "iterations=2", "resume=true", "seed=1", "resume_overrides=true")).resuming


def test_a_resumed_run_takes_the_new_learning_rate(two_iterations, capsys):
    root, _ = two_iterations
    trainer = Trainer(_cfg(root / "run", "iterations=2", "resume=true", "optim.lr=0.125", "optim.beta2=0.5"))
    trainer.resume()
    assert {(g["lr"], g["betas"]) for g in trainer.optimizer.param_groups} == {(0.125, (0.9, 0.5))}
    assert "optim.lr: 0.0003 -> 0.125" in capsys.readouterr().out


def test_resume_tolerates_a_metrics_line_cut_short(tmp_path):
    Trainer(_cfg(tmp_path, "iterations=2")).run()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"iteration": 2, "loss": 1')  # a crash while writing iteration 2
    Trainer(_cfg(tmp_path, "iterations=3", "resume=true")).run()
    assert [r["iteration"] for r in read_metrics(metrics)] == [0, 1, 2]
    metrics.write_text('{"iteration": 0\n' + metrics.read_text())
    with pytest.raises(DataError, match="line 1 is not JSON"):
        read_metrics(metrics)


def test_resumed_runs_do_not_repeat_tensorboard_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = [o for o in SMALL if not o.startswith("log.tensorboard")]
    assert main(["train", *tb, f"run_dir={tmp_path}", "iterations=3"]) == 0
    (tmp_path / "checkpoints" / "latest").write_text("iter_000000")  # as if iterations 1-2 were lost
    assert main(["train", *tb, f"run_dir={tmp_path}", "iterations=3", "--resume"]) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [0, 1, 2]


def test_early_errors_before_any_model_is_built(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", *SMALL, f"run_dir={blocker / 'run'}"]) == 2
    assert "run_dir: cannot write to" in capsys.readouterr().err
    assert main(["train", *SMALL, f"run_dir={tmp_path / 'r'}", "checkpoint_format=dist"]) == 2
    assert "checkpoint_format=dist writes through torch.distributed: run under torchrun" in capsys.readouterr().err
    assert main(["train", *SMALL, f"run_dir={tmp_path / 'r'}", "resume=sometimes"]) == 2
    assert "resume must be true, false or auto" in capsys.readouterr().err


def test_yaml_integers_are_read_as_written():
    assert load_config(None, ["seed=010"]).seed == 10
    with pytest.raises(ConfigError, match="iterations must be an integer, got '1:30'"):
        load_config(None, ["iterations=1:30"])


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("omninft ")
