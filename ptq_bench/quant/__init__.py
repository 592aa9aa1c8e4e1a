"""Fake quantizers, observers and the quantizer registry."""

from ptq_bench.quant.base import Quantizer, round_ste, validate_bits
from ptq_bench.quant.observers import OBSERVERS
from ptq_bench.quant.registry import QUANTIZERS
from ptq_bench.quant.uniform import UniformQuantizer

__all__ = ["OBSERVERS", "QUANTIZERS", "Quantizer", "UniformQuantizer", "round_ste", "validate_bits"]
