"""What every command-line entry point shares: a user's mistake ends in one line and exit status 2."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from rnnlm.checkpoint import CheckpointError, NonFiniteError
from rnnlm.checks import ConfigError
from rnnlm.corpora import DataError
from rnnlm.vocab import VocabularyError

# The stream loader is an IterableDataset with a length, read without worker processes, so the
# length is exact; Lightning's warning about workers duplicating data does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)


# The datamodule saves and restores the stream's position itself (TextDataModule.state_dict), so a run
# resumed mid-epoch continues exactly; Lightning only looks for that on the DataLoader object.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


for _handler in logging.getLogger("lightning.pytorch").handlers:
    _handler.addFilter(_NoAdverts())

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (editable install)
USER_ERRORS = (ConfigError, DataError, CheckpointError, VocabularyError, NonFiniteError)
T = TypeVar("T")


def exit_on_user_error(task: Callable[..., T]) -> Callable[..., T]:
    """Print ``error: <message>`` and exit 2 on a user error, instead of a traceback
    (``HYDRA_FULL_ERROR=1`` shows the traceback)."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except USER_ERRORS as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for the whole story
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def pick_device(name: str) -> torch.device:
    """``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``cuda:1``, ``mps`` ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no GPU is available: use device=cpu or device=auto")
    return device


def _quote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value  # quoted by the user already
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${") + "'"


def quote_free_text(argv: list[str], text_keys: tuple[str, ...], list_keys: tuple[str, ...] = ()) -> list[str]:
    """Quote the values of free-text overrides, so ``prompt=안녕 세상`` or ``candidates=[근육,지방]`` reach
    the config as typed: Hydra's override grammar takes only ASCII words unquoted."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in text_keys:
            arg = f"{key}={_quote(value)}"
        elif sep and key in list_keys and value.startswith("[") and value.endswith("]"):
            items = [item.strip() for item in value[1:-1].split(",") if item.strip()]
            arg = f"{key}=[{','.join(_quote(item) for item in items)}]"
        out.append(arg)
    return out
