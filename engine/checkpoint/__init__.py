"""Training checkpoints: one manager (save, resume, latest pointer, format choice) over the full and
distributed formats, written atomically."""

from .manager import FORMATS, CheckpointManager, is_distributed_checkpoint
from .state import TrainState

__all__ = ["FORMATS", "CheckpointManager", "TrainState", "is_distributed_checkpoint"]
