"""AIQViT's Dynamic Focusing Quantizer (DFQ) for post-Softmax attention maps.

AIQViT (Jiang et al., AAAI 2025, arXiv 2502.04628), Eq. 15: with x ∈ [0, 1] and a learnable interval [b1, b2]
(one pair per Softmax layer), values inside the interval are quantized uniformly with k bits and values outside
go to the end codes (x < b1 → 0, x > b2 → 2^k − 1). No logarithm is involved. b1 and b2 are learned with the
block reconstruction loss through straight-through rounding.

The paper does not print the de-quantization or the initialization. Harness choices (docs/methods/aiqvit.md):
the interval is an asymmetric uniform grid with s = (b2 − b1)/(2^k − 1) and integer zero point z = round(−b1/s)
(Eq. 6's Quant-U), so code 0 de-quantizes to ≈ b1 (``below="b1"``); ``below="zero"`` instead maps x < b1 to an
exact 0. b1 starts at 0; b2 starts at the tensor maximum (``init="max"``) or at the value of a grid that
minimizes the squared error of the map (``init="mse"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ptq_bench.quant.base import QuantGrid, Quantizer, round_ste
from ptq_bench.quant.registry import QUANTIZERS
from ptq_bench.quant.ste import uniform_ste

Init = Literal["max", "mse"]
Below = Literal["b1", "zero"]

#: Smallest interval width, so that the scale stays positive while b1 and b2 are learned.
MIN_WIDTH = 1e-4


@dataclass(frozen=True)
class DFQOptions:
    """``init``: b2's start (``mse`` search over ``grid_size`` fractions of the maximum, or the maximum);
    ``below``: what x < b1 de-quantizes to (``b1``: code 0 of the grid, ≈ b1; ``zero``: exactly 0). Harness
    readings, see the module docstring."""

    init: Init = "mse"
    below: Below = "b1"
    grid_size: int = 100


@QUANTIZERS.register("dfq")
class DynamicFocusingQuantizer(Quantizer):
    """Uniform quantizer on a learnable sub-interval [b1, b2] of [0, 1], clamping outside (AIQViT Eq. 15)."""

    Options = DFQOptions
    capabilities = frozenset({"post_softmax"})

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        o: DFQOptions = self.options
        self.init = o.init
        self.below = o.below
        self.grid_size = o.grid_size
        self.b1 = nn.Parameter(torch.zeros(()))
        self.b2 = nn.Parameter(torch.ones(()))

    @property
    def qmax(self) -> int:
        return self.levels - 1

    def interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b1, b2) projected onto 0 ≤ b1 < b2 ≤ 1 (gradients pass where the constraints are inactive)."""
        b1 = self.b1.clamp(0.0, 1.0 - MIN_WIDTH)
        b2 = torch.maximum(self.b2.clamp(max=1.0), b1 + MIN_WIDTH)
        return b1, b2

    def _fake_quant(self, x: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        scale = (b2 - b1) / self.qmax
        zero_point = round_ste(-b1 / scale)
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
            x_hat = uniform_ste(x, scale, zero_point, 0, self.qmax)  # the values below, one autograd node (ste.py)
        else:
            q = torch.clamp(round_ste(x / scale) + zero_point, 0, self.qmax)
            x_hat = (q - zero_point) * scale
        if self.below == "zero":
            x_hat = torch.where(x < b1, torch.zeros_like(x_hat), x_hat)
        return x_hat

    def calibrate(self, x: torch.Tensor) -> None:
        high = x.max().clamp(MIN_WIDTH, 1.0)
        if self.init == "mse":
            zero = torch.zeros((), device=x.device)
            candidates = torch.linspace(1.0 / self.grid_size, 1.0, self.grid_size, device=x.device) * high
            errors = torch.stack([(self._fake_quant(x, zero, c) - x).pow(2).mean() for c in candidates])
            high = candidates[errors.argmin()]
        with torch.no_grad():
            self.b1.zero_()
            self.b2.copy_(high)

    def learnable_parameters(self) -> dict[str, str]:
        return {"b1": "range", "b2": "range"}

    @torch.no_grad()
    def export(self) -> QuantGrid:
        b1, b2 = self.interval()
        scale = (b2 - b1) / self.qmax
        zero_point = torch.round(-b1 / scale)
        if self.below == "b1":
            return QuantGrid("affine", self.bits, scale.clone(), zero_point.clone(), 0, self.qmax)
        levels = (torch.arange(self.levels, dtype=scale.dtype, device=scale.device) - zero_point) * scale
        return QuantGrid("non_uniform", self.bits, levels=torch.cat([levels.new_zeros(1), levels]),
                         note="affine grid on [b1, b2] and an exact 0 below b1")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.interval()
        return self._fake_quant(x, b1, b2)

    def extra_repr(self) -> str:
        b1, b2 = self.interval()
        return f"{super().extra_repr()}, interval=[{b1.item():.4g}, {b2.item():.4g}], init={self.init}, below={self.below}"
