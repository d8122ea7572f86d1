"""User-facing errors: the message is the whole story (one line, no traceback, exit 2).

Every error a user can fix by changing a config value, a record or a file subclasses
``UserError``; the CLIs catch it and print its first line.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message tells the user what to change."""


class BadRecordError(UserError, ValueError):
    """A record that cannot be trained on; the message names it."""


class DatasetLoadError(UserError, RuntimeError):
    """A data set could not be loaded; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A config value is impossible; the message names the key."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the config."""


class LoraTargetError(UserError, ValueError):
    """LoRA target patterns match nothing (or something that cannot take an adapter)."""


class MediaError(UserError, ValueError):
    """An image or video is missing or cannot be decoded."""


class ModelLoadError(UserError, RuntimeError):
    """A model or processor could not be loaded (offline hub, unknown id, wrong class); the message says what to do."""


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss became NaN or infinite: the run stops before checkpointing the broken weights."""


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user error: the CLIs print its first line, no traceback, exit 2."""
    return isinstance(err, UserError) or str(err).startswith("config error:")
