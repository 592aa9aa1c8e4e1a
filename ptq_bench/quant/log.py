"""Logarithmic fake quantizers for the post-Softmax attention map (RepQ-ViT, arXiv 2212.08254, Sec. 4.3).

Both quantizers have one per-tensor scale ``delta`` (the largest representable value) and code a value x ≥ 0 as
an integer exponent q:

* ``log2``:      q = clamp(round(-log2(x/δ)), 0, 2^b-1),   x̂ = 2^(-q) · δ
* ``log_sqrt2``: q = clamp(round(-2·log2(x/δ)), 0, 2^b-1), x̂ = 2^(-ceil(q/2)) · (√2 if q is odd else 1) · δ

A value whose unclamped exponent is ≥ 2^b (too small for the grid, zeros included) becomes 0. δ is chosen
like RepQ-ViT's uniform ranges: among the {0.999, 0.9999, 0.99999} quantiles of the tensor, the one whose
quantized tensor has the smallest mean squared error (first one on ties).

Follows zkkli/RepQ-ViT classification/quant/quantizer.py (``LogSqrt2Quantizer``): δ is initialised to the
tensor's maximum there, but that value is only kept if no candidate scores below 1e10, so the maximum is never
a real candidate. The official repository has no log2 quantizer; ``log2`` is the same recipe with base 2, the
baseline of the paper's log√2 ablation.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar, Sequence

import torch

from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.observers import REPQ_PERCENTILES, rowwise_quantiles
from ptq_bench.quant.registry import QUANTIZERS


class _LogQuantizer(Quantizer):
    """Shared part: the per-tensor scale ``scale`` (δ) and its percentile search."""

    post_softmax = True

    #: exponent steps per octave: 1 for log2, 2 for log√2
    steps_per_octave: ClassVar[int]
    base: ClassVar[str]

    def __init__(self, bits: int, percentiles: Sequence[float] = REPQ_PERCENTILES) -> None:
        super().__init__(bits)
        self.percentiles = tuple(percentiles)
        self.register_buffer("scale", torch.ones(()))

    def calibrate(self, x: torch.Tensor) -> None:
        flat = x.reshape(1, -1).float()
        best_error, best_scale = math.inf, None
        for candidate in rowwise_quantiles(flat, self.percentiles):
            candidate = candidate.reshape(())
            error = (flat - self._fake_quant(flat, candidate)).pow(2).mean().item()
            if error < best_error:
                best_error, best_scale = error, candidate
        if best_scale is None:
            raise ValueError(f"{type(self).__name__}: no finite calibration error (non-finite input?)")
        self.set_scale(best_scale)

    def set_scale(self, scale: torch.Tensor) -> None:
        """Install δ directly (tests, reparameterizations)."""
        self.scale = scale.detach().clone().reshape(()).to(self.scale.device)
        self.calibrated = True
        self.params_changed()

    def exponent(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Unclamped integer exponent round(-steps·log2(x/δ)); +inf for x = 0."""
        return (x / scale).log2_().mul_(-self.steps_per_octave).round_()

    def _fake_quant(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # exponents ≥ 2^b (zeros included) index the extra 0 at the end of the level table
        index = self.exponent(x, scale).clamp_(0, self.levels).to(torch.int64)
        return self._levels_with_zero(x.dtype, x.device)[index].mul_(scale)

    def _levels_with_zero(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[level(0), ..., level(2^b - 1), 0]: the δ = 1 grid, computed elementwise like the official code."""
        q = torch.arange(self.levels, dtype=dtype, device=device)
        return torch.cat([self._level_value(q), q.new_zeros(1)])

    @abstractmethod
    def _level_value(self, q: torch.Tensor) -> torch.Tensor:
        """Level value of exponent q on a grid with δ = 1."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # straight-through estimator, so reconstruction-based methods can train what feeds the map
            return x + (self._fake_quant(x.detach(), self.scale) - x).detach()
        return self._fake_quant(x, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base}"


@QUANTIZERS.register("log2")
class Log2Quantizer(_LogQuantizer):
    """x̂ = 2^(-q) · δ with q = clamp(round(-log2(x/δ)), 0, 2^b-1)."""

    steps_per_octave = 1
    base = "2"

    def _level_value(self, q: torch.Tensor) -> torch.Tensor:
        return torch.exp2(-q)


@QUANTIZERS.register("log_sqrt2")
class LogSqrt2Quantizer(_LogQuantizer):
    """x̂ = 2^(-ceil(q/2)) · (√2 if q odd else 1) · δ with q = clamp(round(-2·log2(x/δ)), 0, 2^b-1).

    The odd-level factor is formed as (q mod 2)·(√2-1)+1 in the tensor dtype, as in the official code, so the
    levels match it bit for bit.
    """

    steps_per_octave = 2
    base = "sqrt2"

    def _level_value(self, q: torch.Tensor) -> torch.Tensor:
        odd_factor = torch.remainder(q, 2) * (math.sqrt(2) - 1) + 1
        return torch.exp2(-torch.ceil(q / 2)) * odd_factor
