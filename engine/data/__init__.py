"""Prompts and their text features: the rollout task of a run, its prompt datasets and their order, the
real LTX-2 text path (Gemma 3, connectors, embedding cache) and the stand-in features of the tiny task.

The text modules import transformers and diffusers only when a real encoder is used."""

from .features import prompt_features
from .prompts import PromptRecord, load_prompts, prompts_for
from .task import DEFAULT_PROMPTS, TaskConfig
from .text import TextConfig

__all__ = [
    "DEFAULT_PROMPTS",
    "PromptRecord",
    "TaskConfig",
    "TextConfig",
    "load_prompts",
    "prompt_features",
    "prompts_for",
]
