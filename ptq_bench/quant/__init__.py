"""Fake quantizers, observers and the quantizer registry (every module here registers its quantizers)."""

import importlib
import pkgutil

from ptq_bench.quant.base import Quantizer, round_ste, validate_bits
from ptq_bench.quant.observers import OBSERVERS
from ptq_bench.quant.registry import QUANTIZERS
from ptq_bench.quant.uniform import UniformQuantizer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["OBSERVERS", "QUANTIZERS", "Quantizer", "UniformQuantizer", "round_ste", "validate_bits"]
