"""Config values checked against a dataclass field's type hint (one line naming the key otherwise).

Shared by method options (:mod:`ptq_bench.methods.options`) and quantizer options (:mod:`ptq_bench.quant.base`):
ints stay ints (``2.7`` or ``true`` is refused), floats accept ints, sequences become tuples, ``Literal`` values are
checked against their choices."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from ptq_bench.errors import ConfigError


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the type ``hint`` (ints stay ints, floats accept ints, sequences become tuples)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_describe(hint)}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{key}={value!r}: expected a list")
        items = list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}={value!r}: expected a list of {len(args)} values")
        return tuple(coerce(v, a, key) for v, a in zip(items, args))
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}={value!r}: expected null")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported option type {hint!r} for {key}")


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " | ".join(map(str, args))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(hint, str(hint))
