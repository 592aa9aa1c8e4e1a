"""The quantizer registry: every quantizer class registers under a name (``uniform``, ``log2``, ...).

A class declares its ``capabilities`` (:data:`ptq_bench.quant.base.CAPABILITIES`); the placement
(:mod:`ptq_bench.models.placement`) offers it for every role whose tensors it can take, so a new quantizer is one
file that every method can select by name.
"""

from __future__ import annotations

from ptq_bench.registry import Registry

QUANTIZERS: Registry[type] = Registry("quantizer")


def names_with(capability: str) -> list[str]:
    """Registered quantizers that declare ``capability``."""
    return [name for name in QUANTIZERS.names() if capability in QUANTIZERS.get(name).capabilities]
