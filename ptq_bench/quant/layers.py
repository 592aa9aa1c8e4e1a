"""Quantized layers: Linear, Conv2d and a matmul, each with its own input (and weight) quantizers.

Layers are converted in place (``QuantLinear.convert_(linear, ...)``) so that parameter names, and so
checkpoints and state dicts, stay those of the FP model. The fake-quantized weight is computed once per
calibration and cached; it is recomputed only when the weight quantizer's parameters change or
:meth:`refresh_weight` is called (e.g. after a reparameterization edits the weight).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.quant.base import Quantizer


def _has_trainable_state(quantizer: Quantizer) -> bool:
    """Whether any of the quantizer's tensors (e.g. a step size under reconstruction) requires grad."""
    return any(t.requires_grad for t in quantizer.parameters()) or any(t.requires_grad for t in quantizer.buffers())


class _WeightCache:
    """Cached fake-quantized weight, valid for one (weight tensor, quantizer version) pair."""

    def __init__(self) -> None:
        self.key: tuple[int, int, int] | None = None
        self.value: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return quantizer(weight)  # in the compiled graph: no Python cache to trace
        if torch.is_grad_enabled() and (weight.requires_grad or _has_trainable_state(quantizer)):
            return quantizer(weight)  # a learnable weight or step size must see fresh gradients
        key = (weight.data_ptr(), weight._version, quantizer.version)
        if self.key != key or self.value is None:
            with torch.no_grad():
                value = quantizer(weight)
            # calibration on first use bumps the version: key on the post-calibration state
            self.key, self.value = (weight.data_ptr(), weight._version, quantizer.version), value
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None


class _QuantWeightMixin:
    weight: nn.Parameter
    weight_quantizer: Optional[Quantizer]
    input_quantizer: Optional[Quantizer]

    @classmethod
    def convert_(cls, layer: nn.Module, weight_quantizer: Optional[Quantizer], input_quantizer: Optional[Quantizer]):
        """Turn ``layer`` (an nn.Linear for QuantLinear, an nn.Conv2d for QuantConv2d) into this class, in place."""
        layer.__class__ = cls
        layer.weight_quantizer = weight_quantizer
        layer.input_quantizer = input_quantizer
        layer._weight_cache = _WeightCache()
        return layer

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq is None or not wq.enabled:
            return self.weight
        return self._weight_cache.get(self.weight, wq)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def refresh_weight(self) -> None:
        """Drop the cached quantized weight (call after editing ``weight`` in place)."""
        self._weight_cache.clear()


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """nn.Linear with a weight quantizer and an input quantizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """nn.Conv2d (the patch embedding) with a weight quantizer and an input quantizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantMatMul(nn.Module):
    """``a @ b`` with a quantizer on each operand (attention: Q·Kᵀ and softmax(·)·V)."""

    def __init__(self, quantizer_a: Optional[Quantizer] = None, quantizer_b: Optional[Quantizer] = None) -> None:
        super().__init__()
        self.quantizer_a = quantizer_a
        self.quantizer_b = quantizer_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.quantizer_a is not None:
            a = self.quantizer_a(a)
        if self.quantizer_b is not None:
            b = self.quantizer_b(b)
        return a @ b
