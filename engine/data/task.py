"""The rollout task (`task.*`): which prompts (engine.data.prompts reads them) and the shape of the clip."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..fields import bounded
from .prompts import PromptRecord, load_prompts

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
    """The rollout task: prompts, clip shape and the stand-in text features.

    `prompts` and `eval_prompts` stay as written (a list or a file path), so the saved config reads
    like the one given; their records are parsed once, here, so a bad dataset fails when the config is
    read, and are kept off the fields (`records()`, `eval_records()`)."""

    prompts: list[str | dict] | str = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    eval_prompts: list[str | dict] | str | None = None  # held out for evaluation; None: no eval set
    video_grid: list[int] = field(default_factory=lambda: [7, 3, 4])  # latent frames, height, width
    fps: float = bounded(1e-3, None, default=24.0)
    context_tokens: int = bounded(1, None, default=8)

    def __post_init__(self) -> None:
        if len(self.video_grid) != 3 or any(n < 1 for n in self.video_grid):
            raise ConfigError(
                f"task.video_grid must be three positive integers [frames, height, width]; got {self.video_grid}"
            )
        self._records = load_prompts(self.prompts, "task.prompts")
        self._eval_records = None if self.eval_prompts is None else load_prompts(self.eval_prompts, "task.eval_prompts")

    def records(self) -> tuple[PromptRecord, ...]:
        """The training prompts, parsed."""
        return self._records

    def eval_records(self) -> tuple[PromptRecord, ...] | None:
        """The held-out evaluation prompts, parsed; None when there is no eval set."""
        return self._eval_records
