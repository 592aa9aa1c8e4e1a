"""PTQ4ViT's quantization grids (Yuan et al., ECCV 2022, Sec. 3.2 "twin uniform quantization").

All three grids are written as the official code computes them (hahnyuan/PTQ4ViT @ b42c790), with
``qmax = 2^(b-1)`` for every grid, including the unsigned twin ranges:

* :func:`interval_quant`: the plain signed grid of every other layer, ``clamp(round(x/Δ), -qmax, qmax-1)·Δ``
  (quant_layers/linear.py ``quant_input``; the same formula as a symmetric :class:`UniformQuantizer`).
* :func:`twin_softmax_quant`: post-Softmax map (quant_layers/matmul.py, ``SoSPTQSLBatchingQuantMatMul.quant_input_A``).
  The high range [split, 1] has step 1/(qmax-1), the low range [0, split] step split/(qmax-1). The code
  *adds* the two range quantizers, each applied to the clamped input: for x < split the result is
  Q_high(split) + Q_low(x), and for x > split it is Q_high(x) + split (Q_low saturates at split). The paper
  describes a disjoint union of the two ranges, but we follow the code. Q_high(split) is 0 only for
  split < 1/(2(qmax-1)), so the split search avoids larger splits.
* :func:`twin_gelu_quant`: post-GELU input of fc2 (quant_layers/linear.py,
  ``PostGeluPTQSLBatchingQuantLinear.quant_input``). Positive values use a searched step in [0, qmax-1].
  Negative values use the fixed step 0.16997124254703522/qmax in [-qmax, 0]. 0.16997 is |min GELU|.

Every function broadcasts its parameters, so a search can pass a stack of candidates at once.
"""

from __future__ import annotations

from typing import Union

import torch

from ptq_bench.quant.base import QuantGrid, Quantizer
from ptq_bench.quant.registry import QUANTIZERS

#: |min_x GELU(x)|, the constant of the official post-GELU negative range.
GELU_MIN_MAGNITUDE = 0.16997124254703522

Param = Union[torch.Tensor, float]


def signed_qmax(bits: int) -> int:
    """PTQ4ViT's ``qmax = 2^(b-1)`` (the signed grid is [-qmax, qmax-1])."""
    return 2 ** (bits - 1)


def interval_quant(x: torch.Tensor, interval: Param, bits: int) -> torch.Tensor:
    """Signed uniform grid with step ``interval``: clamp(round(x/Δ), -qmax, qmax-1)·Δ."""
    qmax = signed_qmax(bits)
    return (x / interval).round_().clamp_(-qmax, qmax - 1).mul_(interval)


def twin_softmax_quant(x: torch.Tensor, split: torch.Tensor, bits: int) -> torch.Tensor:
    """Twin-uniform post-Softmax grid with split point ``split`` (a tensor broadcastable to ``x``)."""
    levels = signed_qmax(bits) - 1
    low_interval = split / levels
    high = torch.minimum(torch.maximum(x, split), torch.ones_like(split))
    high = (high * levels).round_().clamp_(0, levels) / levels
    low = torch.minimum(torch.maximum(x, torch.zeros_like(split)), split)
    low = (low / low_interval).round_().clamp_(0, levels) * low_interval
    return high + low


def gelu_negative_interval(bits: int) -> float:
    """The fixed step of the post-GELU negative range, 0.16997124254703522 / 2^(b-1)."""
    return GELU_MIN_MAGNITUDE / signed_qmax(bits)


def twin_gelu_quant(x: torch.Tensor, interval: Param, bits: int) -> torch.Tensor:
    """Twin-uniform post-GELU grid: step ``interval`` on [0, qmax-1], the fixed negative step on [-qmax, 0]."""
    qmax = signed_qmax(bits)
    negative_interval = gelu_negative_interval(bits)
    positive = (x / interval).round_().clamp_(0, qmax - 1) * interval
    negative = (x / negative_interval).round_().clamp_(-qmax, 0) * negative_interval
    return positive + negative


@QUANTIZERS.register("twin_softmax")
class TwinSoftmaxQuantizer(Quantizer):
    """Post-Softmax twin-uniform quantizer; one split point per tensor (buffer ``split``)."""

    capabilities = frozenset({"post_softmax"})

    #: Split used when calibrated lazily (the official non-batching ``SoSPTQSLQuantMatMul`` initialisation).
    DEFAULT_SPLIT = 0.01

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.register_buffer("split", torch.tensor(self.DEFAULT_SPLIT))

    def calibrate(self, x: torch.Tensor) -> None:
        self.split = torch.tensor(self.DEFAULT_SPLIT, device=x.device)

    def set_split(self, split: torch.Tensor) -> None:
        """Install a searched split point."""
        self.split = split.detach().clone().reshape(())
        self.calibrated = True
        self.params_changed()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return twin_softmax_quant(x, self.split, self.bits)

    @torch.no_grad()
    def export(self) -> QuantGrid:
        levels = signed_qmax(self.bits) - 1
        steps = torch.arange(levels + 1, dtype=self.split.dtype, device=self.split.device)
        # every output value is attained on a grid point of either range (or the split itself)
        points = torch.cat([steps * (self.split / levels), steps / levels, self.split.reshape(1)])
        return QuantGrid("non_uniform", self.bits, levels=torch.unique(twin_softmax_quant(points, self.split, self.bits)),
                         note="twin uniform: step split/(2^(b-1)-1) below the split, 1/(2^(b-1)-1) above")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={float(self.split):.6g}"


@QUANTIZERS.register("twin_gelu")
class TwinGeluQuantizer(Quantizer):
    """Post-GELU twin-uniform quantizer; one positive step per tensor (buffer ``interval``).

    Lazy calibration uses the official initialisation, max(x)/(qmax-0.5)
    (``PostGeluPTQSLBatchingQuantLinear._initialize_intervals``).
    """

    capabilities = frozenset({"post_gelu"})

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.register_buffer("interval", torch.ones(()))

    def calibrate(self, x: torch.Tensor) -> None:
        self.interval = x.max() / (signed_qmax(self.bits) - 0.5)

    def set_interval(self, interval: torch.Tensor) -> None:
        """Install a searched positive-range step."""
        self.interval = interval.detach().clone().reshape(())
        self.calibrated = True
        self.params_changed()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return twin_gelu_quant(x, self.interval, self.bits)

    @torch.no_grad()
    def export(self) -> QuantGrid:
        qmax = signed_qmax(self.bits)
        positive = torch.arange(qmax, dtype=self.interval.dtype, device=self.interval.device) * self.interval
        negative = torch.arange(-qmax, 0, dtype=self.interval.dtype, device=self.interval.device) * gelu_negative_interval(self.bits)
        return QuantGrid("non_uniform", self.bits, levels=torch.cat([negative, positive]),
                         note="twin uniform: fixed step below 0, searched step above")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, interval={float(self.interval):.6g}"
