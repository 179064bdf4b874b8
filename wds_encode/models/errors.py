"""Exception types raised while building or loading autoencoders.

Separate classes let the CLI tell a user *what* to fix: the model config (a JSON field), the
checkpoint file (keys / format), or a feature stable-audio-tools has that we do not implement yet.
They subclass the builtin exceptions a caller would naturally catch (ValueError / RuntimeError).
"""

from __future__ import annotations


class ModelConfigError(ValueError):
    """The model config JSON is malformed; the message names the offending field."""


class UnsupportedModelError(ModelConfigError, NotImplementedError):
    """The config is valid for stable-audio-tools but uses a component we do not implement."""


class CheckpointError(RuntimeError):
    """The checkpoint cannot be read or does not match the model; the message names the file."""
