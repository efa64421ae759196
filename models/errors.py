"""The errors a user can cause, as opposed to bugs.

`UserError` is the one base the CLI catches (one line, exit 2, no traceback). It lives here, in the
lowest package that reads user files, because `models` never imports `engine`; `engine.errors` adds
the engine's kinds (config, reward, data) beside `CheckpointError`.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a config value, a file, a checkpoint, a reward. The message is one
    line naming the key, file or reward and what is allowed."""


class CheckpointError(UserError, ValueError):
    """A weights file or training checkpoint that cannot be read or does not fit the model; the
    message lists every missing, unexpected and mis-shaped key, or says what is wrong with the file."""
