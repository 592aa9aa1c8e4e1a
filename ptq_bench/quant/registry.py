"""The quantizer registry: every quantizer class registers under a name (``uniform``, ``log2``, ...)."""

from ptq_bench.registry import Registry

QUANTIZERS: Registry[type] = Registry("quantizer")
