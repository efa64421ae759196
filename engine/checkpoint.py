"""Training checkpoints: model, old (sampling) model, optimizer, RNG and counters, written atomically.

Each checkpoint is a directory built under a temporary name and renamed into place; the `latest`
pointer is replaced the same way. A crash at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.checkpoint import OFFICIAL_PREFIX, config_metadata, load_state, to_layout


@dataclass
class TrainState:
    iteration: int  # last completed iteration
    step: int       # optimizer steps taken


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, state: TrainState, model: nn.Module, old_model: nn.Module,
                    optimizer: torch.optim.Optimizer, config: dict) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{state.iteration:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        meta = config_metadata(model.config)
        save_file({k: v.detach().contiguous().cpu() for k, v in to_layout(model.state_dict(), "official").items()},
                  tmp / "model.safetensors", metadata=meta)
        save_file({k: v.detach().contiguous().cpu() for k, v in to_layout(old_model.state_dict(), "official").items()},
                  tmp / "old_model.safetensors", metadata=meta)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                   tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"iteration": state.iteration, "step": state.step, "config": config}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / "latest", final.name)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | Path, model: nn.Module, old_model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> TrainState:
    """Restores everything `save_checkpoint` wrote; weight files are checked whole before loading."""
    path = Path(path)
    for name, module in (("model.safetensors", model), ("old_model.safetensors", old_model)):
        state = load_file(path / name)
        if not all(k.startswith(OFFICIAL_PREFIX) for k in state):
            raise ValueError(f"{path / name} is not in the official layout")
        load_state(module, state, "official", source=str(path / name))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    meta = json.loads((path / "trainer_state.json").read_text())
    return TrainState(iteration=meta["iteration"], step=meta["step"])
