"""Config fields that carry their own rule: the loader (engine.config) checks choices and bounds when
it reads a value, and names the key when one is not allowed. Every feature's config section is a
dataclass of such fields, declared beside the code that uses it."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def choice(*choices: str, **kwargs) -> Any:
    """A string field that must be one of `choices`."""
    return field(metadata={"choices": choices}, **kwargs)


def bounded(lo: float | None = None, hi: float | None = None, **kwargs) -> Any:
    """A number field in [lo, hi] (None: unbounded on that side)."""
    return field(metadata={"min": lo, "max": hi}, **kwargs)
