"""Stand-in text features: what the tiny task feeds the DiT where the real pipeline feeds Gemma 3
features through the LTX-2 connectors."""

from __future__ import annotations

from torch import Tensor

from ..noise import seeded_normal


def prompt_features(text: str, tokens: int, channels: int) -> Tensor:
    """(tokens, channels) deterministic per-prompt features: a fixed random draw keyed by the text."""
    return seeded_normal((tokens, channels), "prompt-features", text)
