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


__all__ = ["CheckpointError", "ConfigError", "DataError", "RewardError", "UserError"]
