"""Training checkpoints: model, old (sampling) model, optimizer, RNG and counters, written atomically.

Each checkpoint is a directory built under a temporary name and renamed into place; the `latest`
pointer is replaced the same way, so a crash at any moment leaves the previous checkpoint intact.
The two models are stored whole, in the official LTX-2 layout (rank 0 writes what all ranks
gathered), so they load into any parallel layout. Optimizer state is stored per rank and resumes in
the layout that wrote it.
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
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.checkpoint import OFFICIAL_PREFIX, config_metadata, from_layout, to_layout
from models.config import ModelConfig

MODEL_FILES = ("model.safetensors", "old_model.safetensors")


@dataclass
class TrainState:
    iteration: int  # last completed iteration
    step: int       # optimizer steps taken


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, state: TrainState, models_state: tuple[dict[str, Tensor], dict[str, Tensor]],
                    model_config: ModelConfig, optimizer: torch.optim.Optimizer, config: dict, rank: int,
                    layout: dict) -> Path:
    """Collective: every rank calls it with the gathered (full) model and old-model state dicts."""
    root = checkpoint_root(run_dir)
    final = root / f"iter_{state.iteration:06d}"
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        torch.save(optimizer.state_dict(), tmp / f"optimizer.rank{rank}.pt")
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                   tmp / f"rng.rank{rank}.pt")
        if rank == 0:
            meta = config_metadata(model_config)
            for name, sd in zip(MODEL_FILES, models_state):
                save_file({k: v.detach().contiguous().cpu() for k, v in to_layout(sd, "official").items()},
                          tmp / name, metadata=meta)
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"iteration": state.iteration, "step": state.step, "layout": layout, "config": config}, indent=1))
        _barrier()
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            point_latest(final)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final


def point_latest(path: Path) -> None:
    """Makes `path` the checkpoint that `resume` continues from."""
    _write_text_atomic(path.parent / "latest", path.name)


def is_distributed_checkpoint(path: Path) -> bool:
    """megatron dist_checkpointing directories carry its metadata.json."""
    return (path / "metadata.json").is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def read_checkpoint(path: str | Path, optimizer: torch.optim.Optimizer, rank: int,
                    layout: dict) -> tuple[TrainState, dict[str, Tensor], dict[str, Tensor]]:
    """Restores optimizer and RNG of this rank; returns the counters and the two full state dicts
    (our names), for the caller to load into its (possibly parallel) models."""
    path = Path(path)
    meta = json.loads((path / "trainer_state.json").read_text())
    if meta["layout"] != layout:
        raise ValueError(f"{path} was written with layout {meta['layout']}, this run is {layout}: the optimizer "
                         f"state only resumes in the layout that wrote it")
    states = []
    for name in MODEL_FILES:
        raw = load_file(path / name)
        if not all(k.startswith(OFFICIAL_PREFIX) for k in raw):
            raise ValueError(f"{path / name} is not in the official layout")
        states.append(from_layout(raw, "official"))
    optimizer.load_state_dict(torch.load(path / f"optimizer.rank{rank}.pt", weights_only=True))
    rng = torch.load(path / f"rng.rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return TrainState(iteration=meta["iteration"], step=meta["step"]), states[0], states[1]
