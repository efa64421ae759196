"""Training checkpoints: one manager (save, resume, latest pointer, format choice) over the full and
distributed formats, written atomically; exports of a checkpoint's policy (`export`: official, diffusers,
LoRA files)."""

from .manager import FORMATS, CheckpointManager, is_distributed_checkpoint
from .state import TrainState

__all__ = ["FORMATS", "CheckpointManager", "TrainState", "is_distributed_checkpoint"]
