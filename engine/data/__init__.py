"""Prompts and their text features: the rollout task of a run and the stand-in features of the tiny task."""

from .features import prompt_features
from .task import DEFAULT_PROMPTS, TaskConfig, prompts_for

__all__ = ["DEFAULT_PROMPTS", "TaskConfig", "prompt_features", "prompts_for"]
