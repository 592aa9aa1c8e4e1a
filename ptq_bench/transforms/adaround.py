"""AdaRound (Nagel et al., ICML 2020, arXiv 2004.10568): learned up/down rounding of a uniform weight grid.

During a block reconstruction each weight quantizer of a Linear/Conv is swapped for :class:`AdaRoundQuantizer`,
which keeps the calibrated (s, z) and rounds w/s to floor(w/s) + h(α), h the rectified sigmoid
clamp(σ(α)·(ζ - γ) + γ, 0, 1) with ζ = 1.1, γ = -0.1 (Sec. 3.3); α starts where h(α) = w/s - floor(w/s). The
regularizer Σ 1 - |2h(α) - 1|^b pushes h to 0 or 1 while b anneals from 20 to 2 after a warm-up
(:class:`RoundingAnnealing`). Afterwards :func:`bake_` writes the hard choice (floor(w/s) + [α ≥ 0])·s into the
weight and puts the uniform quantizer back, which rounds that weight to the same level (GoatWu/APHQ-ViT @ 84c9fde:
quantizers/adaround.py ``AdaRoundQuantizer``, utils/block_recon.py ``LossFunction``/``LinearTempDecay`` and the end
of ``reconstruct_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptq_bench.quant.base import QuantGrid, Quantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear
from ptq_bench.quant.uniform import UniformQuantizer

GAMMA, ZETA = -0.1, 1.1


class AdaRoundQuantizer(Quantizer):
    """A calibrated per-output-channel uniform weight grid with learned rounding (``soft``: h(α), else [α ≥ 0])."""

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__(base.bits)
        self.base = base
        self.qmin, self.qmax = base.qmin, base.qmax
        self.soft = True
        self.calibrated = True
        self.role = base.role
        scale = base.scale
        rest = weight.detach() / scale - torch.floor(weight.detach() / scale)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def rounding(self) -> torch.Tensor:
        """h(α) (soft) or the hard choice [α ≥ 0]."""
        if self.soft:
            return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
        return (self.alpha >= 0).float()

    def regularizer(self, b: float) -> torch.Tensor:
        """Σ 1 - |2h(α) - 1|^b, written (h - 0.5)·2 as the official loss does."""
        return (1 - ((self.rounding() - 0.5).abs() * 2).pow(b)).sum()

    def calibrate(self, x: torch.Tensor) -> None:
        raise RuntimeError("AdaRound keeps the grid of the quantizer it replaces")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.base.scale, self.base.zero_point
        x_int = torch.floor(x / scale) + self.rounding()
        return (torch.clamp(x_int + zero_point, self.qmin, self.qmax) - zero_point) * scale

    def hard_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(floor(w/s) + [α ≥ 0])·s, unclamped (``get_hard_value``)."""
        scale = self.base.scale
        return (torch.floor(weight / scale) + (self.alpha >= 0).float()) * scale

    def export(self) -> QuantGrid:
        return self.base.export()


def adaround_layers(block: nn.Module) -> list[QuantLinear | QuantConv2d]:
    """The block's Linears/Convs whose weight grid is a calibrated uniform one."""
    return [m for m in block.modules() if isinstance(m, (QuantLinear, QuantConv2d))
            and isinstance(m.weight_quantizer, UniformQuantizer) and m.weight_quantizer.enabled]


def attach_(layers: list[QuantLinear | QuantConv2d]) -> list[AdaRoundQuantizer]:
    """Swap each layer's uniform weight quantizer for an :class:`AdaRoundQuantizer` (returned, in order)."""
    quantizers = []
    for layer in layers:
        quantizer = AdaRoundQuantizer(layer.weight_quantizer, layer.weight)  # type: ignore[arg-type]
        layer.weight_quantizer = quantizer.to(layer.weight.device)
        layer.refresh_weight()
        quantizers.append(quantizer)
    return quantizers


def bake_(layers: list[QuantLinear | QuantConv2d]) -> None:
    """Write each layer's hard rounding into its weight and put its uniform quantizer back."""
    with torch.no_grad():
        for layer in layers:
            quantizer = layer.weight_quantizer
            if not isinstance(quantizer, AdaRoundQuantizer):
                raise TypeError(f"{type(layer).__name__} has no AdaRound quantizer to bake")
            layer.weight.data = quantizer.hard_weight(layer.weight.data)
            layer.weight_quantizer = quantizer.base
            layer.refresh_weight()


@dataclass(frozen=True)
class RoundingAnnealing:
    """The regularizer's exponent over ``iters`` steps: none before ``warmup``·iters (b = 0: no term), then b linear
    from ``start_b`` to ``end_b`` (``LinearTempDecay`` with decay_start 0; the values are the method's options)."""

    iters: int
    warmup: float
    start_b: float
    end_b: float

    def active(self, count: int) -> bool:
        """Whether the regularizer counts at the ``count``-th loss evaluation (1-based)."""
        return count >= self.iters * self.warmup

    def b(self, count: int) -> float:
        start = self.warmup * self.iters
        if count < start:
            return self.start_b
        rel = (count - start) / (self.iters - start)
        return self.end_b + (self.start_b - self.end_b) * max(0.0, 1 - rel)
