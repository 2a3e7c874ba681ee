"""The errors a user can fix, under one base class that every command catches (one line, exit status 2)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the commands print ``error: <message>`` and exit with status 2."""


class ConfigError(UserError):
    """An invalid setting; the message names the key and how to fix it."""


class DataError(UserError):
    """A problem with the input data; the message names the problem and the fix."""


class VocabularyError(UserError, ValueError):
    """Text that the vocabulary cannot encode; the message names the tokens."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, unsafe, or not one of ours; the message says which."""


class NonFiniteError(UserError):
    """Training produced NaN or infinite values; the message names the step and what was kept."""


class DiskFullError(UserError):
    """No space left (or the disk quota used up) where a file was being written; the message names the folder,
    the bytes the file needs and the bytes free. The file it would have replaced is left as it was."""


class MissingPackageError(UserError):
    """An optional package a command needs is not installed; the message names the install command."""


class ExportError(UserError):
    """A model that cannot be written in the format asked for (``rnnlm-export``); the message says why and what can
    be exported instead."""
