"""TanQ, DopQ-ViT's tangent quantizer for post-Softmax attention (arXiv 2408.03291, §3; paper text not read).

What is established (abstract v3 and summaries, see docs/methods/dopq_vit.md): TanQ is a non-uniform quantizer
"based on the tangent function" that keeps resolution near 1 (few but decisive attention values) as well as near
0 (the dense bulk), where log2 / log√2 grids put a single level above 0.5. The exact formula is unknown; this module
implements the harness reading: quantize uniformly in a tangent-companded domain,

    θ(x) = θ₀ + (θ₁ − θ₀)·x,   θ₀ = −α·c,   θ₁ = α·(1 − c),           x ∈ [0, 1]
    g(x) = (tan θ(x) − tan θ₀) / (tan θ₁ − tan θ₀)                    (monotone, g(0) = 0, g(1) = 1)
    q    = clamp(round(g(x)·(2^b − 1)), 0, 2^b − 1)
    x̂    = (arctan(tan θ₀ + q/(2^b − 1)·(tan θ₁ − tan θ₀)) − θ₀) / (θ₁ − θ₀)

The local step is ∝ cos²θ(x): levels are densest at both ends of [0, 1] and sparsest at x = c. α → 0 is the
uniform grid; c = 0.5 is symmetric. (α, c) are chosen per tensor (or per head) on the calibration tensor by the
smallest mean |x − x̂|^p over a candidate grid, evaluated for all candidates at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from ptq_bench.errors import ConfigError
from ptq_bench.quant.base import QuantGrid, Quantizer, round_ste
from ptq_bench.quant.registry import QUANTIZERS
from ptq_bench.quant.ste import tangent_ste

_HALF_PI_MARGIN = 1e-3  # keep |θ| < π/2 so tan stays finite


def tan_grid(theta0: torch.Tensor, theta1: torch.Tensor, bits: int) -> torch.Tensor:
    """The 2^b reconstruction levels for each (θ₀, θ₁) pair, shape ``theta0.shape + (2^b,)``."""
    u = torch.linspace(0.0, 1.0, 2**bits, device=theta0.device, dtype=theta0.dtype)
    return _expand(u, theta0.unsqueeze(-1), theta1.unsqueeze(-1))


def _compand(x: torch.Tensor, theta0: torch.Tensor, theta1: torch.Tensor) -> torch.Tensor:
    t0, t1 = torch.tan(theta0), torch.tan(theta1)
    return (torch.tan(theta0 + (theta1 - theta0) * x) - t0) / (t1 - t0)


def _expand(u: torch.Tensor, theta0: torch.Tensor, theta1: torch.Tensor) -> torch.Tensor:
    t0, t1 = torch.tan(theta0), torch.tan(theta1)
    return (torch.atan(t0 + u * (t1 - t0)) - theta0) / (theta1 - theta0)


def tan_fake_quant(x: torch.Tensor, theta0: torch.Tensor, theta1: torch.Tensor, bits: int, ste: bool = True) -> torch.Tensor:
    """Fake-quantize ``x`` (clamped to [0, 1]) on the tangent grid; θ tensors broadcast against ``x``."""
    qmax = 2**bits - 1
    u = _compand(x.clamp(0.0, 1.0), theta0, theta1) * qmax
    q = torch.clamp(round_ste(u) if ste else torch.round(u), 0, qmax)
    return _expand(q / qmax, theta0, theta1)


def candidate_thetas(alphas: Sequence[float], centers: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ₀, θ₁) of every valid (α, c) pair: α > 0, c ∈ [0, 1], |θ| < π/2."""
    pairs = []
    for alpha in alphas:
        for c in centers:
            t0, t1 = -alpha * c, alpha * (1.0 - c)
            if alpha > 0 and 0.0 <= c <= 1.0 and max(-t0, t1) < math.pi / 2 - _HALF_PI_MARGIN:
                pairs.append((t0, t1))
    if not pairs:
        raise ConfigError("tanq: no valid (alpha, center) candidate (need alpha > 0, center in [0,1], alpha*max(c,1-c) < pi/2)")
    th = torch.tensor(pairs, dtype=torch.float32)
    return th[:, 0], th[:, 1]


@dataclass(frozen=True)
class TanQOptions:
    """The (α, c) candidates (harness choice: α in (0, π) by 0.25, the symmetric inflection point c = 1/2),
    ``granularity`` ``tensor`` (one shape) or ``head`` (one per index of ``head_dim``, dim 1 of a ``(B, H, N, N)``
    map), ``p`` the exponent of the calibration error, ``chunk_elements`` the size of the candidates × values block
    evaluated at once (memory only)."""

    alphas: tuple[float, ...] = tuple(round(0.25 * k, 2) for k in range(1, 13))  # 0.25 … 3.0
    centers: tuple[float, ...] = (0.5,)
    granularity: Literal["tensor", "head"] = "tensor"
    head_dim: int = 1
    p: float = 2.0
    chunk_elements: int = 2**25


@QUANTIZERS.register("tanq")
class TanQuantizer(Quantizer):
    """Tangent quantizer for values in [0, 1] (post-Softmax attention); see the module docstring and
    :class:`TanQOptions`."""

    Options = TanQOptions
    capabilities = frozenset({"post_softmax"})

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        o: TanQOptions = self.options
        self.granularity = o.granularity
        self.head_dim = o.head_dim
        self.p = o.p
        self.chunk_elements = o.chunk_elements
        theta0, theta1 = candidate_thetas(o.alphas, o.centers)
        self.register_buffer("candidates0", theta0, persistent=False)
        self.register_buffer("candidates1", theta1, persistent=False)
        self.register_buffer("theta0", torch.tensor(-0.5))
        self.register_buffer("theta1", torch.tensor(0.5))

    @property
    def alpha(self) -> torch.Tensor:
        return self.theta1 - self.theta0

    @property
    def center(self) -> torch.Tensor:
        return -self.theta0 / self.alpha

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        dim = self.head_dim % x.ndim
        return x.movedim(dim, 0).reshape(x.shape[dim], -1)

    def candidate_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Mean |x − x̂|^p of every candidate on every group, shape (candidates, groups)."""
        rows = self._groups(x.float()).clamp(0.0, 1.0)
        c0 = self.candidates0.to(rows.device)
        c1 = self.candidates1.to(rows.device)
        step = max(1, self.chunk_elements // max(1, rows.numel()))
        errors = []
        for start in range(0, c0.numel(), step):
            t0, t1 = c0[start : start + step, None, None], c1[start : start + step, None, None]
            xq = tan_fake_quant(rows.unsqueeze(0), t0, t1, self.bits, ste=False)
            errors.append((rows.unsqueeze(0) - xq).abs().pow(self.p).mean(dim=-1))
        return torch.cat(errors)

    def calibrate(self, x: torch.Tensor) -> None:
        best = self.candidate_errors(x).argmin(dim=0)  # first minimum on ties
        theta0, theta1 = self.candidates0.to(x.device)[best], self.candidates1.to(x.device)[best]
        if self.granularity == "tensor":
            theta0, theta1 = theta0.reshape(()), theta1.reshape(())
        else:
            dim = self.head_dim % x.ndim
            shape = (x.shape[dim],) + (1,) * (x.ndim - dim - 1)
            theta0, theta1 = theta0.reshape(shape), theta1.reshape(shape)
        self.theta0, self.theta1 = theta0.clone(), theta1.clone()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        theta0, theta1 = self.theta0.to(x.dtype), self.theta1.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad and not (theta0.requires_grad or theta1.requires_grad):
            return tangent_ste(x, theta0, theta1, self.bits)  # same values, one autograd node (ptq_bench/quant/ste.py)
        return tan_fake_quant(x, theta0, theta1, self.bits)

    @torch.no_grad()
    def export(self) -> QuantGrid:
        axis = None if self.granularity == "tensor" else self.head_dim
        # each level as the forward computes it (q/(2^b-1) through arctan), not linspace's rounding
        levels = tan_fake_quant(self.grid(), self.theta0.unsqueeze(-1), self.theta1.unsqueeze(-1), self.bits, ste=False)
        return QuantGrid("non_uniform", self.bits, levels=levels, axis=axis,
                         note="tangent-companded levels in [0, 1]")

    def grid(self) -> torch.Tensor:
        """Reconstruction levels, shape ``theta0.shape + (2^b,)`` (one row per group for ``head``)."""
        return tan_grid(self.theta0, self.theta1, self.bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.granularity}, alpha={self.alpha.flatten()[:4].tolist()}"
