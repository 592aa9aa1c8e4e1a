"""Typed checks of config values: each returns the value or raises one line naming the key, the value and what is
allowed (:class:`ConfigError`), so a bad input stops a run before any model is built or image read."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ptq_bench.errors import ConfigError
from ptq_bench.paths import expand_path


def integer(value: Any, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (never a bool, a float such as 2.5 or a string), at least ``minimum`` and at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r}: must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}={value!r}: must be an integer <= {maximum}")
    return value


def optional_integer(value: Any, key: str, minimum: int | None = None) -> int | None:
    return None if value is None else integer(value, key, minimum)


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: must be true or false")
    return value


def number(value: Any, key: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: must be a number")
    if value > high or value < low or (low_open and value == low):
        raise ConfigError(f"{key}={value!r}: must be in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def choice(value: Any, key: str, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}")
    return value


def writable_directory(path: str | Path, key: str) -> Path:
    """Create ``path`` if needed and prove it writable (a temporary file), before any work. An empty path (which
    would mean the current directory) is refused."""
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"{key}={path!r}: must be a folder path")
    if not str(path).strip():
        raise ConfigError(f"{key}={str(path)!r}: an empty path; give a folder")
    directory = expand_path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigError(f"{key}={str(path)!r}: not a writable directory ({error.strerror or type(error).__name__})") from None
    return directory
