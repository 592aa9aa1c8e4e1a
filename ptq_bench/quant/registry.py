"""The quantizer registry: every quantizer class registers under a name (``uniform``, ``log2``, ...).

A quantizer class with ``post_softmax = True`` may quantize the post-Softmax attention map: every method with a
``softmax_quantizer`` option offers it by name (:func:`post_softmax_quantizer`), so adding one is one file.
"""

from __future__ import annotations

from typing import Any

from ptq_bench.errors import ConfigError
from ptq_bench.registry import Registry

QUANTIZERS: Registry[type] = Registry("quantizer")


def post_softmax_names() -> list[str]:
    """Registered quantizers that may quantize the post-Softmax map."""
    return [name for name in QUANTIZERS.names() if getattr(QUANTIZERS.get(name), "post_softmax", False)]


def check_post_softmax(name: str, method: str) -> str:
    """``name`` if it is a post-Softmax quantizer, else one line listing the choices."""
    if name not in post_softmax_names():
        raise ConfigError(f"method.softmax_quantizer={name!r} ({method}): must be one of {', '.join(post_softmax_names())}")
    return name


def post_softmax_quantizer(name: str, bits: int, options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The post-Softmax quantizer ``name`` at ``bits``, built with ``options[name]`` (a method's settings for it)."""
    return QUANTIZERS.get(name)(bits, **(options or {}).get(name, {}))
