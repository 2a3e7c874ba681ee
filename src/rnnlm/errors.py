"""The error a bad setting raises, and the checks that phrase it: ``key=value`` and how to fix it."""

from __future__ import annotations

import math


class ConfigError(Exception):
    """An invalid setting; the message names the key and how to fix it."""


def positive_integer(problems: list[str], key: str, value, allow_none: bool = False) -> None:
    """Add a problem unless ``value`` is a positive integer (or None, with ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        extra = " or null" if allow_none else ""
        problems.append(f"{key}={value} must be a positive integer{extra}")


def positive_number(problems: list[str], key: str, value) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        problems.append(f"{key}={value} must be a positive number")
