"""The run directory (`run_dir`): a fresh run never writes over a previous one by accident, a resumed
run continues only what it can continue exactly, and every config change across resumes is printed
and recorded (`config_history.jsonl`). All of it is decided before any model is built."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .checkpoint import CheckpointManager
from .errors import CheckpointError, ConfigError
from .metrics import console
from .parallel import ProcessLayout

# What a checkpoint's weights and noise are: resuming with another value would not continue that run.
PROTECTED = ("seed", "model.preset", "model.init", "model.init_seed", "lora.rank", "lora.alpha", "lora.targets")
# Files a run writes at the top of its run_dir (checkpoints/ aside).
RUN_FILES = ("metrics.jsonl", "config_history.jsonl", "rewards.png", "tensorboard", "wandb", "wandb_id")
HISTORY = "config_history.jsonl"


def flatten(config: dict, prefix: str = "") -> dict:
    """{'model': {'preset': 'tiny'}} -> {'model.preset': 'tiny'} (lists stay values)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def config_diff(before: dict, after: dict) -> dict[str, tuple]:
    """{key: (before, after)} of the keys whose values differ (a key only one side has: None)."""
    a, b = flatten(before), flatten(after)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def format_diff(diff: dict[str, tuple]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())


def check_writable(run_dir: Path) -> None:
    """Creates `run_dir` and checks that files can be written there (ConfigError naming it if not)."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for where in (run_dir, run_dir / "checkpoints"):
            with tempfile.TemporaryFile(dir=where):
                pass
    except OSError as e:
        raise ConfigError(f"run_dir: cannot write to {run_dir} ({e.strerror or e})") from e


def previous_run(run_dir: Path, checkpoints: CheckpointManager) -> list[str]:
    """What a run left in `run_dir`: its newest checkpoint and a non-empty metrics log."""
    found = [p.name for p in checkpoints.checkpoints()][-1:]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(metrics.name)
    return found


def _clear(run_dir: Path, checkpoints: CheckpointManager) -> None:
    """Deletes what a previous run left in `run_dir` (its checkpoints and RUN_FILES)."""
    try:
        shutil.rmtree(checkpoints.root, ignore_errors=True)
        for name in RUN_FILES:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir: cannot clear {run_dir} ({e.strerror or e})") from e
    check_writable(run_dir)


def prepare(config: dict, run_dir: str | Path, checkpoints: CheckpointManager, layout: ProcessLayout) -> bool:
    """Collective: checks `run_dir` for the run `config` describes (the config as a dict); returns
    whether the run resumes from its latest checkpoint.

    resume=true needs a checkpoint; resume=auto resumes when there is one that verifies and starts
    afresh when there is none (the command a SLURM requeue repeats); a fresh run into a run_dir with a
    previous run's checkpoints or metrics is refused unless overwrite=true, which removes them. On
    resume, a change of `PROTECTED` keys is refused unless resume_overrides=true; every change is
    printed and appended to config_history.jsonl."""
    run_dir = Path(run_dir)
    with layout.collectively(f"checking run_dir {run_dir}"):
        if layout.is_main:
            check_writable(run_dir)
    latest = checkpoints.find_resumable() if config["resume"] in (True, "auto") else None
    damaged = f" (all damaged: {'; '.join(checkpoints.skipped)})" if checkpoints.skipped else ""
    if config["resume"] is True and latest is None:
        raise CheckpointError(
            f"resume=true but {checkpoints.root} holds no checkpoint that can be resumed{damaged}; start without "
            f"--resume" + (", with overwrite=true to delete them" if damaged else "")
        )
    if latest is None:
        found = previous_run(run_dir, checkpoints)
        restart = config["resume"] == "auto" and not checkpoints.checkpoints()  # died before a first checkpoint
        if found and not (config["overwrite"] or restart):
            advice = "" if damaged else "continue it with --resume (or resume=auto), or "
            raise ConfigError(
                f"run_dir {run_dir} already holds a run ({', '.join(found)}){damaged}: {advice}start over with "
                f"overwrite=true, which deletes it"
            )
        if found:
            with layout.collectively(f"clearing run_dir {run_dir}"):
                if layout.is_main:
                    _clear(run_dir, checkpoints)
        return False
    diff = config_diff(checkpoints.stored_config(latest), config)
    diff = {k: v for k, v in diff.items() if k not in ("resume", "overwrite", "resume_overrides")}
    protected = {k: v for k, v in diff.items() if k in PROTECTED}
    if protected and not config["resume_overrides"]:
        raise ConfigError(
            f"resuming {latest} with another {', '.join(protected)} would not continue that run "
            f"({format_diff(protected)}); pass resume_overrides=true to resume anyway"
        )
    if diff and layout.is_main:
        console(f"resuming {latest.name} with config changes: {format_diff(diff)}")
        with (run_dir / HISTORY).open("a") as f:
            f.write(json.dumps({"resumed_from": latest.name, "changes": {k: list(v) for k, v in diff.items()}}))
            f.write("\n")
    return True
