"""The rollout task (`task.*`): which prompts, in which order, and the shape of the clip."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..fields import bounded

DEFAULT_PROMPTS = (
    "a dog barks twice in a quiet park",
    "waves crash on a rocky shore at dusk",
    "a drummer plays a slow steady beat",
    "rain falls on a tin roof at night",
    "a train passes a crossing with its bell ringing",
    "a child laughs while running through sprinklers",
    "a blacksmith hammers glowing metal",
    "an owl hoots in a dark forest",
)


@dataclass
class TaskConfig:
    """The rollout task: prompts, clip shape and the stand-in text features."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    video_grid: list[int] = field(default_factory=lambda: [7, 3, 4])  # latent frames, height, width
    fps: float = bounded(1e-3, None, default=24.0)
    context_tokens: int = bounded(1, None, default=8)

    def __post_init__(self) -> None:
        if len(self.video_grid) != 3 or any(n < 1 for n in self.video_grid):
            raise ConfigError(
                f"task.video_grid must be three positive integers [frames, height, width]; got {self.video_grid}"
            )
        if not self.prompts:
            raise ConfigError("task.prompts must hold at least one prompt")


def prompts_for(prompts: list[str], iteration: int, per_iteration: int) -> list[str]:
    """Iteration i takes the next `per_iteration` prompts, cycling through the list."""
    return [prompts[(iteration * per_iteration + j) % len(prompts)] for j in range(per_iteration)]
