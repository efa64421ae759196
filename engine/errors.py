"""Errors a user can cause: one base the CLI catches once (one line, exit 2, no traceback).

`UserError` and `CheckpointError` come from `models.errors` (models never import the engine, and
read weights files themselves); the engine adds its own kinds here. Internal invariants are asserts
or plain exceptions, and keep their tracebacks.
"""

from __future__ import annotations

from models.errors import CheckpointError, UserError


class ConfigError(UserError, ValueError):
    """A config value or key that is not allowed; the message names the key and what it allows."""


class RewardError(UserError, RuntimeError):
    """A reward that is misconfigured, raised, or returned a non-finite / wrongly shaped score; the
    message names the reward. Never replaced by a silent 0."""


class DataError(UserError, ValueError):
    """Prompts or text features that cannot be used; the message names the file or key."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: message` of an exception raised by code we call (a package, megatron, a user's reward) as one
    line of at most ~`limit` characters: the form a UserError built from it needs (a torch load error lists
    every key over many lines; megatron's repeat a traceback per rank)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit] + ' ...' if len(text) > limit else text}"


__all__ = ["CheckpointError", "ConfigError", "DataError", "RewardError", "UserError", "one_line"]
