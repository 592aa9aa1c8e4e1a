"""Logarithmic fake quantizers for the post-Softmax attention map (RepQ-ViT, arXiv 2212.08254, Sec. 4.3).

Both quantizers have one per-tensor scale ``delta`` (the largest representable value) and code a value x ≥ 0 as
an integer exponent q:

* ``log2``:      q = clamp(round(-log2(x/δ)), 0, 2^b-1),   x̂ = 2^(-q) · δ
* ``log_sqrt2``: q = clamp(round(-2·log2(x/δ)), 0, 2^b-1), x̂ = 2^(-ceil(q/2)) · (√2 if q is odd else 1) · δ

A value whose unclamped exponent is ≥ 2^b (too small for the grid, zeros included) becomes 0; inputs are
≥ 0 (post-Softmax). δ is chosen
like RepQ-ViT's uniform ranges: among the {0.999, 0.9999, 0.99999} quantiles of the tensor, the one whose
quantized tensor has the smallest mean squared error (first one on ties).

Follows zkkli/RepQ-ViT classification/quant/quantizer.py (``LogSqrt2Quantizer``): δ is initialised to the
tensor's maximum there, but that value is only kept if no candidate scores below 1e10, so the maximum is never
a real candidate. The official repository has no log2 quantizer; ``log2`` is the same recipe with base 2, the
baseline of the paper's log√2 ablation.
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ptq_bench.quant.base import QuantGrid, Quantizer
from ptq_bench.quant.observers import REPQ_PERCENTILES, rowwise_quantiles
from ptq_bench.quant.registry import QUANTIZERS


@dataclass(frozen=True)
class LogOptions:
    """``percentiles``: the candidate quantiles for δ (RepQ-ViT's three)."""

    percentiles: tuple[float, ...] = REPQ_PERCENTILES


class _LogQuantizer(Quantizer):
    """Shared part: the per-tensor scale ``scale`` (δ) and its percentile search."""

    Options = LogOptions
    capabilities = frozenset({"post_softmax", "log_domain"})

    #: exponent steps per octave: 1 for log2, 2 for log√2
    steps_per_octave: ClassVar[int]
    base: ClassVar[str]

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        self.percentiles = self.options.percentiles
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
        if torch.compiler.is_compiling():  # the literal table form (the exp2 form's rounding relies on strict IEEE)
            return self._fake_quant_table(x, scale)
        if exp2_reproduces_levels(type(self), self.bits, x.dtype, x.device.type):
            return self._fake_quant_exp2(x, scale)
        return self._fake_quant_table(x, scale)

    def _fake_quant_table(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The literal form: integer exponents index the level table (exponents ≥ 2^b index its final 0)."""
        index = self.exponent(x, scale).clamp_(0, self.levels).to(torch.int64)
        return level_table(type(self), self.bits, x.dtype, x.device)[index].mul_(scale)

    def _fake_quant_exp2(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """:meth:`_fake_quant_table`'s values without its int64 index and gather (where
        :func:`exp2_reproduces_levels`), in place on one fresh tensor.

        h = log2(x/δ) rounded to a multiple of 1/steps is exactly -q/steps (round is odd-symmetric, ·steps is
        exact); h > 0 (q < 0) is clamped to 0, h ≤ -2^b/steps (q ≥ 2^b) becomes -inf, and x̂ = 2^h · δ (2^-inf = 0).
        """
        h = self._round_to_step_(torch.div(x, scale).log2_()).clamp_(max=0)
        return F.threshold_(h, -self.levels / self.steps_per_octave, -math.inf).exp2_().mul_(scale)

    def _round_to_step_(self, h: torch.Tensor) -> torch.Tensor:
        """Round h in place to the nearest multiple of 1/steps, ties to an even multiple (float32/float64)."""
        if self.steps_per_octave == 1:
            return h.round_()
        # adding 1.5/(eps·steps) leaves 1/steps as the last mantissa step for |h| < 0.5/(eps·steps), so the
        # hardware's round-to-nearest-even does the rounding; subtracting it back is exact
        shift = 1.5 / (torch.finfo(h.dtype).eps * self.steps_per_octave)
        return h.add_(shift).sub_(shift)

    @staticmethod
    @abstractmethod
    def _level_value(q: torch.Tensor) -> torch.Tensor:
        """Level value of exponent q on a grid with δ = 1."""

    def export(self) -> QuantGrid:
        levels = level_table(type(self), self.bits, self.scale.dtype, self.scale.device) * self.scale
        return QuantGrid("non_uniform", self.bits, scale=self.scale.detach().clone(), levels=levels.flip(0),
                         note=f"log base {self.base}: δ·level(q), q = 0..2^b-1, and 0 below the grid")

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

    @staticmethod
    def _level_value(q: torch.Tensor) -> torch.Tensor:
        return torch.exp2(-q)


@QUANTIZERS.register("log_sqrt2")
class LogSqrt2Quantizer(_LogQuantizer):
    """x̂ = 2^(-ceil(q/2)) · (√2 if q odd else 1) · δ with q = clamp(round(-2·log2(x/δ)), 0, 2^b-1).

    The odd-level factor is formed as (q mod 2)·(√2-1)+1 in the tensor dtype, as in the official code, so the
    levels match it bit for bit.
    """

    steps_per_octave = 2
    base = "sqrt2"

    @staticmethod
    def _level_value(q: torch.Tensor) -> torch.Tensor:
        odd_factor = torch.remainder(q, 2) * (math.sqrt(2) - 1) + 1
        return torch.exp2(-torch.ceil(q / 2)) * odd_factor


def level_table(cls: type[_LogQuantizer], bits: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """[level(0), ..., level(2^b - 1), 0]: ``cls``'s δ = 1 grid, computed elementwise like the official code."""
    q = torch.arange(2**bits, dtype=dtype, device=device)
    return torch.cat([cls._level_value(q), q.new_zeros(1)])


@functools.cache
def exp2_reproduces_levels(cls: type[_LogQuantizer], bits: int, dtype: torch.dtype, device_type: str) -> bool:
    """Whether ``torch.exp2(-q / steps)`` equals ``cls``'s level table for every exponent q < 2^b, in ``dtype`` on
    this device, through both the vectorized and the scalar (strided) kernel; float32 and float64 only.

    Then :meth:`_LogQuantizer._fake_quant_exp2` is exact. log2's levels are powers of two; log√2's odd levels
    2^-(k+1)·fl(fl(√2-1)+1) must equal exp2(-k-1/2): on an AVX-512 CPU so in float32 up to 8 bits, not in float64
    nor where the levels are subnormal (12 bits and more), which keep the table.
    """
    if dtype not in (torch.float32, torch.float64):
        return False
    table = level_table(cls, bits, dtype, device_type)[:-1]
    h = torch.arange(2**bits, dtype=dtype, device=device_type).div_(-cls.steps_per_octave)
    vectorized = torch.exp2(h.repeat(max(64, 2**16 >> bits))).view(-1, h.numel())
    strided = torch.exp2(h.repeat_interleave(2)[::2])
    return torch.equal(vectorized, table.expand_as(vectorized)) and torch.equal(strided, table)
