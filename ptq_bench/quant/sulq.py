"""SULQ, the shift-uniform-log2 post-Softmax quantizer of I&S-ViT (Zhong et al., arXiv 2311.10126, Sec. 4.1), as
the official code computes it (zysxmu/IaS-ViT @ 9300cea quant/quantizer.py, the class named ``LogSqrt2Quantizer``
that quant_model.py puts on the post-Softmax map):

    y = log2(x + η),   x̂ = 2^round(clamp(round((y - m)/Δ), 0, 2^b)·Δ + m) - η,   Δ = (M - m) / 2^b

with m, M the smallest and largest y of the calibration tensor. Calibration tries η in
{0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1} and keeps the first with the smallest mean squared
error, scoring each with Δ = (M - m)/(2^b - 1) and codes clamped to 2^b - 1 (``quantize``), while the forward uses
Δ = (M - m)/2^b and codes up to 2^b (``forward``): 2^b + 1 codes. Both as in the code. The rounds are the official
straight-through ``round_ste`` (same values), so gradients reach the input as there; η is not learnable (the
official block reconstruction freezes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ptq_bench.quant.base import QuantGrid, Quantizer, round_ste
from ptq_bench.quant.registry import QUANTIZERS

#: quant/quantizer.py ``init_quantization_scale``: the shifts η searched
SULQ_SHIFTS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class SulqOptions:
    """``shifts``: the candidate η, searched in order (ties keep the earlier)."""

    shifts: tuple[float, ...] = SULQ_SHIFTS


def log2(x: torch.Tensor) -> torch.Tensor:
    """ln(x) / ln(2) with ln(2) in x's dtype (the official ``logk``)."""
    return torch.log(x) / torch.log(torch.tensor(2, dtype=x.dtype, device=x.device))


@QUANTIZERS.register("sulq")
class SulqQuantizer(Quantizer):
    """Per tensor: ``shift`` η, ``log_min`` m and ``log_max`` M (see the module docstring)."""

    Options = SulqOptions
    capabilities = frozenset({"post_softmax", "log_domain"})

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        for name in ("shift", "log_min", "log_max"):
            self.register_buffer(name, torch.zeros(()))

    def calibrate(self, x: torch.Tensor) -> None:
        best = None
        for shift in self.options.shifts:
            y = log2(x + shift)
            high, low = torch.max(y), torch.min(y)
            step = (high - low) / (self.levels - 1)
            codes = torch.clamp(round_ste((y - low) / step), 0, self.levels - 1)
            error = (x - (2 ** torch.round(codes * step + low) - shift)).abs().pow(2).mean()
            if best is None or error < best[0]:
                best = (error, shift, low, high)
        _, shift, low, high = best
        self.shift, self.log_min, self.log_max = torch.tensor(shift).to(x.device), low, high
        self.calibrated = True
        self.params_changed()

    def _levels_of(self, codes: torch.Tensor) -> torch.Tensor:
        step = (self.log_max - self.log_min) / self.levels
        return 2 ** round_ste(codes * step + self.log_min) - self.shift

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        step = (self.log_max - self.log_min) / self.levels
        codes = torch.clamp(round_ste((log2(x + self.shift) - self.log_min) / step), 0, self.levels)
        return self._levels_of(codes)

    def export(self) -> QuantGrid:
        codes = torch.arange(self.levels + 1, dtype=self.log_min.dtype, device=self.log_min.device)
        return QuantGrid("non_uniform", self.bits, levels=torch.unique(self._levels_of(codes)),
                         note="shift-uniform-log2: 2^k - η on a uniform grid of log2(x + η) with 2^b + 1 codes")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={float(self.shift):.4g}, log2 range=[{float(self.log_min):.4g}, {float(self.log_max):.4g}]"
