"""The full-precision baseline: the model as loaded, nothing quantized."""

from __future__ import annotations

from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.methods.base import METHODS, Method


@METHODS.register("fp")
class FullPrecision(Method):
    name = "fp"
    uses_bits = False
    uses_calibration = False

    def _quantize(self, model: nn.Module, data: CalibrationData | None) -> nn.Module:
        return model
