"""The full-precision baseline: the model as loaded, nothing quantized."""

from __future__ import annotations

import torch
from torch import nn

from ptq_bench.methods.base import METHODS, Method


@METHODS.register("fp")
class FullPrecision(Method):
    name = "fp"
    uses_bits = False
    uses_calibration = False

    def quantize(self, model: nn.Module, calib_images: torch.Tensor) -> nn.Module:
        return model
