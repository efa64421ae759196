"""One place that saves and resumes a run: where checkpoints go, which format they are written in,
the `latest` pointer, and the errors a user sees when one cannot be resumed.

Formats (`checkpoint_format`): `full` (engine.checkpoint.full: models whole in the official layout,
optimizer per rank), `dist` (engine.checkpoint.dist: megatron dist_checkpointing, reshards to any
layout), `auto` (dist when distributed on CUDA or with the distributed optimizer, else full).
Resume detects the format of the checkpoint it finds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.weights import gather_full_state, load_full_state

from ..errors import CheckpointError, ConfigError
from ..parallel.layout import ProcessLayout
from . import full
from .atomic import barrier, write_text_atomic
from .state import TrainState

FORMATS = ("auto", "full", "dist")


def is_distributed_checkpoint(path: Path) -> bool:
    """megatron dist_checkpointing directories carry its metadata.json."""
    return (Path(path) / "metadata.json").is_file()


class CheckpointManager:
    """Checkpoints of the run in `run_dir`/checkpoints/iter_NNNNNN, the newest named by `latest`."""

    def __init__(self, run_dir: str | Path, fmt: str, layout: ProcessLayout, distributed_optimizer: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"checkpoint_format must be one of {', '.join(FORMATS)}; got {fmt!r}")
        self.root = Path(run_dir) / "checkpoints"
        self.layout = layout
        sharded = distributed_optimizer
        if fmt == "auto":
            fmt = "dist" if layout.distributed and (torch.cuda.is_available() or sharded) else "full"
        if fmt == "dist" and not layout.distributed:
            raise ConfigError(
                "checkpoint_format=dist writes through torch.distributed: run under torchrun (one process will "
                "do: torchrun --nproc-per-node 1 -m engine.train ...), or use checkpoint_format=full"
            )
        self.format = fmt

    @property
    def layout_key(self) -> dict:
        """What a full checkpoint's optimizer state is tied to."""
        return {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}

    def path_for(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:06d}"

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, if it exists."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def point_latest(self, path: Path) -> None:
        """Makes `path` the checkpoint that `resume` continues from (rank 0 writes the pointer)."""
        if self.layout.is_main:
            write_text_atomic(self.root / "latest", path.name)
        barrier()

    def save(self, state: TrainState, model: nn.Module, old_model: nn.Module, optimizer, config: dict) -> Path:
        """Collective: writes checkpoint `iter_<state.iteration>` in this manager's format and points
        `latest` at it."""
        path = self.path_for(state.iteration)
        if self.format == "dist":
            from . import dist

            dist.save(path, model, old_model, optimizer, state, config, self.layout.dp_rank)
        else:
            models_state = (gather_full_state(model), gather_full_state(old_model))
            full.save(path, state, models_state, model.config, optimizer, config, self.layout.rank, self.layout_key)
        self.point_latest(path)
        return path

    def format_of(self, path: Path) -> str:
        """`full` or `dist`: the format of the checkpoint at `path`, if this run can resume it."""
        if is_distributed_checkpoint(path):
            if not self.layout.distributed:  # before megatron is imported: its warnings would bury the line
                raise CheckpointError(
                    f"{path} is a distributed checkpoint: resume it under torchrun (one process "
                    f"will do: torchrun --nproc-per-node 1 -m engine.train ...)"
                )
            return "dist"
        if full.is_full_checkpoint(path):
            return "full"
        raise CheckpointError(f"{path} is neither a full nor a distributed checkpoint")

    def stored_config(self, path: Path) -> dict:
        """The run config a checkpoint was written with (read without building anything)."""
        if self.format_of(path) == "dist":
            from .dist import read_run_config

            return read_run_config(path)
        return full.read_run_config(path)

    def resume(self, model: nn.Module, old_model: nn.Module, optimizer) -> tuple[TrainState, Path]:
        """Restores both models and the optimizer from the latest checkpoint, whatever its format."""
        path = self.latest()
        if path is None:
            raise CheckpointError(f"resume=true but {self.root} holds no checkpoint (start without --resume)")
        if self.format_of(path) == "dist":
            from . import dist

            state, _ = dist.load(path, model, old_model, optimizer, self.layout.dp_rank)
        else:
            state, model_sd, old_sd = full.read(path, optimizer, self.layout.rank, self.layout_key)
            load_full_state(model, model_sd, str(path / full.MODEL_FILES[0]))
            load_full_state(old_model, old_sd, str(path / full.MODEL_FILES[1]))
        return state, path
