"""One place that saves and resumes a run: where checkpoints go, which format they are written in,
the `latest` pointer, and the errors a user sees when one cannot be resumed.

Formats (`checkpoint_format`): `full` (engine.checkpoint.full: models whole in the official layout,
optimizer per rank), `dist` (engine.checkpoint.dist: megatron dist_checkpointing, reshards to any
layout), `auto` (dist when distributed on CUDA or with the distributed optimizer, else full).
Resume detects the format of the checkpoint it finds.

Every checkpoint carries the sha256 of its files (engine.checkpoint.integrity). Resuming starts from
the one `latest` names and falls back to the newest older one that verifies, naming what it skipped;
a damaged `latest` pointer is rebuilt from the directory. `checkpoint_keep` bounds how many are kept.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from models.lora import lora_layers

from ..errors import CheckpointError, ConfigError
from ..metrics import console
from ..parallel.layout import ProcessLayout
from ..policy import load_whole_policy_state, whole_policy_state
from . import full
from .atomic import write_text_atomic
from .integrity import verify, write_manifest
from .state import TrainState

FORMATS = ("auto", "full", "dist")
CHECKPOINT_NAME = re.compile(r"^iter_(\d{6,})$")
log = logging.getLogger(__name__)


def is_distributed_checkpoint(path: Path) -> bool:
    """megatron dist_checkpointing directories carry its metadata.json."""
    return (Path(path) / "metadata.json").is_file()


def is_checkpoint(path: Path) -> bool:
    """A directory holding a training checkpoint of either format."""
    return is_distributed_checkpoint(path) or full.is_full_checkpoint(path)


def _number(path: Path) -> int:
    """The iteration of checkpoint directory iter_NNNNNN."""
    return int(path.name[5:])


class CheckpointManager:
    """Checkpoints of the run in `run_dir`/checkpoints/iter_NNNNNN, the newest named by `latest`."""

    def __init__(
        self,
        run_dir: str | Path,
        fmt: str,
        layout: ProcessLayout,
        distributed_optimizer: bool = False,
        keep: int = 0,
        keep_every: int = 0,
    ):
        if fmt not in FORMATS:
            raise ValueError(f"checkpoint_format must be one of {', '.join(FORMATS)}; got {fmt!r}")
        self.root = Path(run_dir) / "checkpoints"
        self.layout = layout
        if fmt == "auto":
            fmt = "dist" if layout.distributed and (torch.cuda.is_available() or distributed_optimizer) else "full"
        if fmt == "dist" and not layout.distributed:
            raise ConfigError(
                "checkpoint_format=dist writes through torch.distributed: run under torchrun (one process will "
                "do: torchrun --nproc-per-node 1 -m engine.train ...), or use checkpoint_format=full"
            )
        self.format = fmt
        self.keep, self.keep_every = keep, keep_every
        self.resume_from: Path | None = None  # set by `find_resumable` ...
        self.skipped: list[str] = []  # ... with the damaged checkpoints it passed over

    @property
    def layout_key(self) -> dict:
        """What a full checkpoint's optimizer state is tied to."""
        return {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}

    def path_for(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:06d}"

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, if it exists."""
        pointer = self.root / "latest"
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        path = self.root / name
        return path if CHECKPOINT_NAME.match(name) and path.is_dir() else None

    def checkpoints(self) -> list[Path]:
        """Every checkpoint directory of the run, oldest first (temporary ones aside)."""
        found = [p for p in self.root.glob("iter_*") if CHECKPOINT_NAME.match(p.name) and p.is_dir()]
        return sorted(found, key=_number)

    def find_resumable(self) -> Path | None:
        """Collective: the checkpoint a resume continues from (also kept as `resume_from`): the one
        `latest` names, or else the newest older one whose files verify. Warns about each it skips
        (kept in `skipped`) and rebuilds a damaged pointer."""

        def survey() -> tuple[str | None, list[tuple[str, bool]]]:
            """What `latest` names, and the candidates in the order they are tried (with whether each
            holds a checkpoint's files)."""
            named, ours = self.latest(), self.checkpoints()
            older = [p for p in reversed(ours) if named is None or _number(p) < _number(named)]
            candidates = [(p.name, is_checkpoint(p)) for p in [named] * (named is not None) + older]
            return None if named is None else named.name, candidates

        named, candidates = self.layout.from_first_rank(survey())  # rank 0's view, for every rank alike
        chosen, self.skipped = None, []
        for name, complete in candidates:
            problem = verify(self.root / name, self.layout) if complete else "incomplete: no checkpoint files"
            if problem is None:
                chosen = self.root / name
                break
            self.skipped.append(f"{name} ({problem})")
        if self.layout.is_main and self.skipped:
            log.warning("skipped damaged checkpoints: %s", "; ".join(self.skipped))
            console(f"warning: skipped damaged checkpoints: {'; '.join(self.skipped)}")
        if chosen is not None and chosen.name != named:
            if self.layout.is_main:
                console(f"warning: `latest` named {named or 'nothing usable'}; resuming {chosen.name}")
            self.point_latest(chosen)
        self.resume_from = chosen
        return chosen

    def prune(self, saved: Path) -> None:
        """Rank 0 deletes the checkpoints before `saved` that `checkpoint_keep` does not keep (the last
        N up to `saved`, plus every `checkpoint_keep_every`-th iteration). Newer ones (left by a run
        resumed from an older checkpoint) are not this line of checkpoints' to judge: they stay."""
        if not self.keep or not self.layout.is_main:
            return
        line = [p for p in self.checkpoints() if _number(p) <= _number(saved)]
        keep = set(line[-self.keep :])
        if self.keep_every:
            keep |= {p for p in line if (_number(p) + 1) % self.keep_every == 0}
        for path in line:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def point_latest(self, path: Path) -> None:
        """Collective: makes `path` the checkpoint that `resume` continues from (rank 0 writes it)."""
        with self.layout.collectively("writing the latest pointer"):
            if self.layout.is_main:
                try:
                    write_text_atomic(self.root / "latest", path.name)
                except OSError as e:
                    raise CheckpointError(f"{self.root / 'latest'}: cannot write ({e.strerror or e})") from e

    def save(self, state: TrainState, model: nn.Module, old_model: nn.Module, optimizer, config: dict) -> Path:
        """Collective: writes checkpoint `iter_<state.iteration>` in this manager's format and points
        `latest` at it."""
        path = self.path_for(state.iteration)
        if self.format == "dist":
            from . import dist

            dist.save(path, model, old_model, optimizer, state, config, self.layout.dp_rank)
        else:
            models_state = (whole_policy_state(model), whole_policy_state(old_model))
            full.save(
                path,
                state,
                models_state,
                model.config,
                optimizer,
                config,
                self.layout.rank,
                self.layout_key,
                adapters=bool(lora_layers(model)),
            )
        write_manifest(path, self.layout)
        self.point_latest(path)
        self.prune(path)
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
        """Restores both models and the optimizer from `find_resumable`'s checkpoint, whatever its format."""
        path = self.resume_from or self.find_resumable()
        if path is None:
            raise CheckpointError(f"resume=true but {self.root} holds no checkpoint (start without --resume)")
        lora = bool(lora_layers(model))
        if self.format_of(path) == "dist":
            from . import dist

            _check_policies(path, dist.holds_adapters(path), lora)
            state, _ = dist.load(path, model, old_model, optimizer, self.layout.dp_rank)
        else:
            _check_policies(path, full.holds_adapters(path), lora)
            files = full.ADAPTER_FILES if lora else full.MODEL_FILES
            with self.layout.collectively(f"resuming {path}"):
                state, model_sd, old_sd = full.read(path, optimizer, self.layout.rank, self.layout_key)
                load_whole_policy_state(model, model_sd, str(path / files[0]))
                load_whole_policy_state(old_model, old_sd, str(path / files[1]))
        return state, path


def _check_policies(path: Path, saved_adapters: bool, adapters: bool) -> None:
    """A LoRA run resumes LoRA checkpoints, a full fine-tuning run full ones."""
    if saved_adapters != adapters:
        what = ("LoRA adapters", "lora.rank > 0") if saved_adapters else ("whole models", "lora.rank=0")
        raise CheckpointError(f"{path} holds {what[0]} (a run with {what[1]}); this run's lora.rank differs")
