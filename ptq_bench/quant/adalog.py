"""AdaLog's adaptive-base logarithmic quantizers (Wu et al., ECCV 2024, arXiv 2407.12951, Sec. 3.2-3.3).

Both follow quantizers/logarithm.py of GoatWu/AdaLog @ 75a57d2 (``AdaLogQuantizer``, ``ShiftAdaLogQuantizer``).

``adalog``: the log base is 2^(q/r) with r = 37 fixed and an integer q (q = 37 is log2, q = 18.5 would be log√2).
A value x ≥ 0 is coded as

    e = round(-log2(clamp(x/s, 1e-15, 1)) · r / q),   x̂ = 0 if e ≥ 2^b, else level(min(e, 2^b - 1)) · s

and the level of code e is de-quantized with the two lookup tables of the official evaluation path (Sec. 3.2,
"hardware-friendly"): level(e) = 2^(-T1[e]) · T2[e] with T1[e] = floor(e·q/r) and T2[e] the fractional power
2^(-((e·q) mod r)/r) rounded to a multiple of 1/(4·2^(b-1) - 2). The tables are computed in double precision and
stored in float32, as ``update_table`` does. ``s`` is one scale per tensor (the post-Softmax map keeps s = 1).

``adalog_shift``: the post-GELU variant (``ShiftAdaLogQuantizer``): x̂ = AdaLog(x + η) - η with the fixed shift
η = |min GELU| = 0.16997124254703522, so GELU's negative outputs stay on the grid. After calibration AdaLog folds
-η into the next Linear's bias (``PostGeluLogBasedBatchingQuantLinear.reparam_bias``; :func:`fold_shift_into_bias_`),
and from then on the quantizer returns AdaLog(x + η) (``bias_reparamed``).

Training (a straight-through gradient on the rounding, as the official ``training_mode``) de-quantizes as
2^(-e·q/r)·s instead of the table, so dx̂/dx = x̂/x on the grid and 0 below it; the tables are what an evaluation and
an integer backend use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptq_bench.quant.base import QuantGrid, Quantizer, round_ste
from ptq_bench.quant.registry import QUANTIZERS
from ptq_bench.quant.twin_uniform import GELU_MIN_MAGNITUDE

#: AdaLog's fixed denominator of the log-base exponent (quantizers/logarithm.py, ``self.r = 37.0``).
ADALOG_R = 37
#: the smallest normalized value before the logarithm (``clamp(min=1e-15)``).
LOG_FLOOR = 1e-15


def table_denominator(bits: int) -> int:
    """4·2^(b-1) - 2: the fractional table T2 holds multiples of 1/this."""
    return 4 * 2 ** (bits - 1) - 2


def adalog_tables(bits: int, q: int, r: float = ADALOG_R) -> tuple[torch.Tensor, torch.Tensor]:
    """(T1, T2) for codes 0..2^b-1, in double and stored as float32 (``AdaLogQuantizer.update_table``)."""
    den = table_denominator(bits)
    r = float(r)
    t1 = [float(math.floor(i * q / r)) for i in range(2**bits)]
    t2 = [round((2 ** (-((q * i) % r) / r)) * den) / den for i in range(2**bits)]
    return torch.tensor(t1, dtype=torch.float32), torch.tensor(t2, dtype=torch.float32)


def adalog_levels(bits: int, q: int, r: float = ADALOG_R) -> torch.Tensor:
    """[level(0), ..., level(2^b-1), 0] for s = 1, with level(e) = 2^(-T1[e])·T2[e] (exact in float32)."""
    t1, t2 = adalog_tables(bits, q, r)
    return torch.cat([torch.pow(2, -t1) * t2, torch.zeros(1)])


def adalog_dequant(x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, r: float, bits: int,
                   table1: torch.Tensor, table2: torch.Tensor) -> torch.Tensor:
    """The official evaluation forward, literally (``AdaLogQuantizer.forward``, not training): what the searches call
    as the layer's current quantizer. :class:`AdaLogQuantizer` computes the same values through one level table."""
    scaled = (x / scale).clamp(min=LOG_FLOOR, max=1.0)
    codes = torch.round(-scaled.log2() * r / q)
    mask = codes < 2**bits
    index = torch.clamp(codes, 0, 2**bits - 1).long()
    return (2 ** (-table1[index])) * table2[index] * scale * mask


def _clamp_inclusive(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """clamp whose gradient passes on the bounds too (torch < 2.13's clamp, which the official training ran on;
    later torch gives 0 there, pytorch#191142), so the straight-through gradient does not depend on the torch."""
    inside = (t >= low) & (t <= high)
    return torch.where(inside, t, t.detach().clamp(low, high))


@dataclass(frozen=True)
class AdaLogOptions:
    """``r``: the base is 2^(q/r) (37 in the paper and code); ``q_min``/``q_max``: the range of q a lazy calibration
    searches (the official search tries q = 10 .. 10 + eq_n - 1 = 137); ``fixed_scale``: keep s = 1 (the official
    post-Softmax quantizer, whose input is at most 1) instead of fitting it."""

    r: int = ADALOG_R
    q_min: int = 10
    q_max: int = 137
    fixed_scale: bool = False


@QUANTIZERS.register("adalog")
class AdaLogQuantizer(Quantizer):
    """Adaptive-base log quantizer; buffers ``scale`` (s), ``q`` and the tables ``table1``/``table2``."""

    Options = AdaLogOptions
    capabilities = frozenset({"post_softmax", "log_domain"})  # post-GELU inputs go below 0: adalog_shift

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        o: AdaLogOptions = self.options
        if not 1 <= o.q_min <= o.q_max:
            raise ValueError(f"adalog: need 1 <= q_min <= q_max, got {o.q_min}, {o.q_max}")
        self.r = float(o.r)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("q", torch.tensor(o.r, dtype=torch.int64))
        t1, t2 = adalog_tables(self.bits, o.r, self.r)
        self.register_buffer("table1", t1)
        self.register_buffer("table2", t2)
        self._levels: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ parameters

    def set_params(self, scale: torch.Tensor | float, q: int | torch.Tensor) -> None:
        """Install s and q (the tables follow q)."""
        device = self.scale.device
        self.scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(()).to(device)
        q = int(q)
        if q < 1:
            raise ValueError(f"adalog: q must be a positive integer, got {q}")
        self.q = torch.tensor(q, dtype=torch.int64, device=device)
        t1, t2 = adalog_tables(self.bits, q, self.r)
        self.table1, self.table2 = t1.to(device), t2.to(device)
        self._levels = None
        self.calibrated = True
        self.params_changed()

    def levels_table(self) -> torch.Tensor:
        """[level(0..2^b-1), 0] for s = 1 from the installed tables (cached)."""
        if self._levels is None or self._levels.device != self.table1.device:
            self._levels = torch.cat([torch.pow(2, -self.table1) * self.table2, self.table1.new_zeros(1)])
        return self._levels

    def calibrate(self, x: torch.Tensor) -> None:
        """Lazy calibration (any method's placement): s = max(x) (1 with ``fixed_scale``), then the q in
        [q_min, q_max] with the smallest mean squared error on ``x`` (first on ties). AdaLog itself searches s and q
        on the layer output (:mod:`ptq_bench.methods.adalog_search`)."""
        x = self._shifted(x.float())
        scale = torch.ones((), device=x.device) if self.options.fixed_scale else x.max().clamp_min(1e-8)
        best = (math.inf, self.options.r)
        for q in range(self.options.q_min, self.options.q_max + 1):
            levels = adalog_levels(self.bits, q, self.r).to(x.device)
            error = (x - self._table_quant(x, scale, torch.tensor(q, device=x.device), levels)).pow(2).mean().item()
            if error < best[0]:
                best = (error, q)
        self.set_params(scale, best[1])

    # ------------------------------------------------------------------------------------------ quantization

    def codes(self, x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Unclamped codes round(-log2(clamp(x/s, 1e-15, 1))·r/q), in the official operation order."""
        return torch.round(torch.neg((x / scale).clamp(min=LOG_FLOOR, max=1.0).log2()) * self.r / q)

    def _table_quant(self, x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        index = self.codes(x, scale, q).clamp_(0, self.levels).to(torch.int64)  # codes >= 2^b index the final 0
        return levels.to(x.dtype)[index] * scale

    def _shifted(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _unshifted(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        shifted = self._shifted(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad):
            e = round_ste(torch.neg(_clamp_inclusive(shifted / self.scale, LOG_FLOOR, 1.0).log2()) * self.r / self.q)
            mask = e < self.levels
            e = _clamp_inclusive(e, 0, self.levels - 1)
            y = torch.pow(2, -e * self.q / self.r) * self.scale * mask
        else:
            y = self._table_quant(shifted, self.scale, self.q, self.levels_table())
        return self._unshifted(y)

    def learnable_parameters(self) -> dict[str, str]:
        return {} if self.options.fixed_scale else {"scale": "range"}

    @torch.no_grad()
    def export(self) -> QuantGrid:
        levels = self._unshifted(self.levels_table() * self.scale).flip(0)
        return QuantGrid("non_uniform", self.bits, scale=self.scale.detach().clone(), levels=levels,
                         note=f"AdaLog base 2^({int(self.q)}/{int(self.r)}): s·2^-T1[e]·T2[e], e = 0..2^b-1, and 0 below the grid")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, q={int(self.q)}, r={int(self.r)}"


@dataclass(frozen=True)
class ShiftAdaLogOptions(AdaLogOptions):
    """``shift``: η, added before and subtracted after the log grid (|min GELU| in the official code)."""

    shift: float = GELU_MIN_MAGNITUDE


@QUANTIZERS.register("adalog_shift")
class ShiftAdaLogQuantizer(AdaLogQuantizer):
    """AdaLog on x + η for post-GELU inputs; ``bias_reparamed``: η was folded into the next Linear's bias."""

    Options = ShiftAdaLogOptions
    capabilities = frozenset({"post_gelu", "log_domain"})

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        self.register_buffer("shift", torch.tensor([self.options.shift], dtype=torch.float32))
        self.register_buffer("bias_reparamed", torch.tensor(False))

    def _shifted(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift

    def _unshifted(self, y: torch.Tensor) -> torch.Tensor:
        return y if bool(self.bias_reparamed) else y - self.shift

    @torch.no_grad()
    def export(self) -> QuantGrid:
        grid = super().export()
        where = ("the next Linear's bias holds -η·Ŵ (folded): these are the levels of x + η" if bool(self.bias_reparamed)
                 else "levels of x (η subtracted)")
        return dataclasses.replace(grid, note=f"{grid.note}; shift η = {float(self.shift):.8g}, {where}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={float(self.shift):.6g}, bias_reparamed={bool(self.bias_reparamed)}"


@torch.no_grad()
def fold_shift_into_bias_(linear: nn.Module) -> None:
    """Fold -η into ``linear``'s bias, as ``PostGeluLogBasedBatchingQuantLinear.reparam_bias``: bias ← bias +
    (-η·1)·Ŵᵀ with the *quantized* weight Ŵ, after which the input quantizer stops subtracting η."""
    quantizer = linear.input_quantizer
    if not isinstance(quantizer, ShiftAdaLogQuantizer):
        raise TypeError("fold_shift_into_bias_ needs a Linear whose input quantizer is adalog_shift")
    if bool(quantizer.bias_reparamed):
        return
    weight = linear.quantized_weight()
    row = torch.full((1, linear.in_features), -quantizer.shift.item(), dtype=weight.dtype, device=weight.device)
    delta = (row @ weight.transpose(0, 1)).squeeze()
    if linear.bias is None:
        linear.bias = nn.Parameter(delta)
    else:
        linear.bias.data.copy_(linear.bias.data + delta)
    quantizer.bias_reparamed = torch.tensor(True, device=quantizer.shift.device)
    quantizer.params_changed()
