"""The full checkpoint format: both policies whole (rank 0 writes what all ranks gathered), so they load
into any parallel layout; optimizer and RNG state per rank, resumable in the layout that wrote it.
Written as one directory under a temporary name and renamed into place.

The policies are the two models in the official LTX-2 layout (`MODEL_FILES`), or, when training LoRA,
the "default" and "old" adapter sets alone (`ADAPTER_FILES`: `<layer>.lora_A/B.weight`, alpha not
folded; the frozen base is `model.init`, which the run config names).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.config import ModelConfig
from models.layouts import OFFICIAL_PREFIX, from_layout, to_layout
from models.weights import config_metadata

from ..errors import CheckpointError
from .atomic import atomic_directory
from .state import TrainState

MODEL_FILES = ("model.safetensors", "old_model.safetensors")
ADAPTER_FILES = ("model_lora.safetensors", "old_model_lora.safetensors")
STATE_FILE = "trainer_state.json"


def save(
    path: Path,
    state: TrainState,
    models_state: tuple[dict[str, Tensor], dict[str, Tensor]],
    model_config: ModelConfig,
    optimizer: torch.optim.Optimizer,
    config: dict,
    rank: int,
    layout: dict,
    adapters: bool = False,
) -> Path:
    """Collective: every rank calls it with the gathered (whole) policy states, the models' or (`adapters`)
    the LoRA sets', and writes its optimizer and RNG state; rank 0 writes the policies and the counters."""
    with atomic_directory(path) as tmp:
        torch.save(optimizer.state_dict(), tmp / f"optimizer.rank{rank}.pt")
        torch.save(
            {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            tmp / f"rng.rank{rank}.pt",
        )
        if rank == 0:
            meta = config_metadata(model_config)
            for name, sd in zip(ADAPTER_FILES if adapters else MODEL_FILES, models_state):
                sd = sd if adapters else to_layout(sd, "official")
                save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, tmp / name, metadata=meta)
            (tmp / STATE_FILE).write_text(
                json.dumps({**dataclasses.asdict(state), "layout": layout, "config": config}, indent=1)
            )
    return path


def is_full_checkpoint(path: Path) -> bool:
    """A directory this module wrote."""
    return (path / STATE_FILE).is_file() and any((path / files[0]).is_file() for files in (MODEL_FILES, ADAPTER_FILES))


def holds_adapters(path: Path) -> bool:
    """A full checkpoint of a LoRA run (adapter sets, no base weights)."""
    return (path / ADAPTER_FILES[0]).is_file()


def read_run_config(path: Path) -> dict:
    """The run config stored with the checkpoint."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: cannot read the run config ({e})") from e


def read(
    path: str | Path, optimizer: torch.optim.Optimizer, rank: int, layout: dict
) -> tuple[TrainState, dict[str, Tensor], dict[str, Tensor]]:
    """Restores optimizer and RNG of this rank; returns the counters and the two full state dicts
    (our names), for the caller to load into its (possibly parallel) models."""
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text())
    if meta["layout"] != layout:
        raise CheckpointError(
            f"{path} was written with layout {meta['layout']}, this run is {layout}: a full "
            f"checkpoint's optimizer state only resumes in the layout that wrote it (use "
            f"checkpoint_format=dist to reshard)"
        )
    states = []
    for name in ADAPTER_FILES if holds_adapters(path) else MODEL_FILES:
        raw = load_file(path / name)
        if holds_adapters(path):
            states.append(raw)
            continue
        if not all(k.startswith(OFFICIAL_PREFIX) for k in raw):
            raise CheckpointError(f"{path / name} is not in the official layout")
        states.append(from_layout(raw, "official"))
    optimizer.load_state_dict(torch.load(path / f"optimizer.rank{rank}.pt", weights_only=True))
    rng = torch.load(path / f"rng.rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return TrainState.from_saved(meta), states[0], states[1]
