"""Range observers: given rows of values (one row per quantization group) return per-row (low, high) ranges.

Every observer is vectorized over rows, so per-channel calibration costs one sort, not a Python loop.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from ptq_bench.registry import Registry

Observer = Callable[..., tuple[torch.Tensor, torch.Tensor]]
OBSERVERS: Registry[Observer] = Registry("observer")

#: Percentiles searched by the official RepQ-ViT code (classification/quant/quantizer.py, init_quantization_scale).
REPQ_PERCENTILES = (0.999, 0.9999, 0.99999)


def affine_params(low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a uniform grid covering [low, high].

    Asymmetric: scale = (high - low) / (2^b - 1), zero point = round(-low / scale) (as in RepQ-ViT).
    Symmetric: scale = max(|low|, |high|) / (2^(b-1) - 1), zero point = 0.
    """
    if symmetric:
        scale = torch.maximum(low.abs(), high.abs()) / (2 ** (bits - 1) - 1)
        scale = scale.clamp_min(1e-8)
        return scale, torch.zeros_like(scale)
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-8)
    return scale, torch.round(-low / scale)


def grid_bounds(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of the grid: [0, 2^b-1] asymmetric, [-2^(b-1), 2^(b-1)-1] symmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@functools.cache
def ranks_in_input_dtype() -> bool:
    """Whether the installed ``torch.quantile`` forms the rank q·(n − 1) in the input's dtype (torch before
    pytorch/pytorch#187574, 2026, under which the official RepQ-ViT code ran) rather than in double. Probed once:
    both forms on fixed random rows (n = 1000, q = 0.999: rank 998.00104 in float32, 998.00101 in double), compared
    with torch.quantile; a torch that matches neither is refused rather than silently computed differently."""
    rows = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)).sort(dim=1).values
    reference = torch.quantile(rows, 0.999, dim=1)
    for in_dtype in (True, False):
        below, weight = _rank(0.999, 1000, torch.float32, in_dtype)
        if torch.equal(torch.lerp(rows[:, below], rows[:, below + 1], torch.full_like(reference, weight)), reference):
            return in_dtype
    raise RuntimeError(f"torch {torch.__version__}: torch.quantile forms its rank neither in float32 nor in double; "
                       "ptq_bench.quant.observers cannot reproduce it bit for bit")


def _rank(q: float, n: int, dtype: torch.dtype, in_dtype: bool | None = None) -> tuple[int, float]:
    """(index below, interpolation weight) of quantile ``q`` of ``n`` sorted values, as the installed torch.quantile
    forms them (``in_dtype`` None) or as given: q is cast to the input dtype first (0.999 becomes float32(0.999)),
    then the rank is q·(n − 1) in that dtype or in double (:func:`ranks_in_input_dtype`)."""
    q_cast = torch.tensor(q, dtype=dtype)
    if in_dtype if in_dtype is not None else ranks_in_input_dtype():
        rank = q_cast * (n - 1)
        below = int(rank.floor().item())
        return below, (rank - below).item()
    position = q_cast.item() * (n - 1)
    below = int(position // 1)
    return below, position - below


def _interpolated_quantile(order_stat: Callable[[int], torch.Tensor], n: int, q: float, dtype: torch.dtype) -> torch.Tensor:
    """Linear-interpolation quantile from ``order_stat(i)`` (the i-th smallest value of each row), bit-identical to
    ``torch.quantile`` of the installed torch on float32 rows (:func:`_rank`; the weight is cast to the input dtype
    and the values interpolated with ``lerp``)."""
    below, weight = _rank(q, n, dtype)
    lo, hi = order_stat(below), order_stat(min(below + 1, n - 1))
    return torch.lerp(lo, hi, torch.full_like(lo, weight))


def rowwise_quantile(sorted_rows: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile of each row of an already sorted 2-D tensor, as ``torch.quantile(rows, q, dim=1)``."""
    return _interpolated_quantile(lambda i: sorted_rows[:, i], sorted_rows.shape[1], q, sorted_rows.dtype)


def rowwise_quantiles(rows: torch.Tensor, qs: Sequence[float]) -> list[torch.Tensor]:
    """Quantiles of each row of an unsorted 2-D tensor, as ``torch.quantile(rows, q, dim=1)`` for q in ``qs``.

    When every requested rank lies in a short tail (RepQ-ViT's 0.999+ percentiles), only the two tails are
    selected with ``topk`` instead of sorting whole rows (about 5x faster on a few-million-element tensor).
    """
    n = rows.shape[1]
    belows = [_rank(q, n, rows.dtype)[0] for q in qs]
    indices = {i for b in belows for i in (b, min(b + 1, n - 1))}
    k_low = max((i + 1 for i in indices if i < n // 2), default=0)
    k_high = max((n - i for i in indices if i >= n // 2), default=0)
    if 4 * (k_low + k_high) >= n:
        sorted_rows = rows.sort(dim=1).values
        return [rowwise_quantile(sorted_rows, q) for q in qs]
    low = rows.topk(k_low, dim=1, largest=False).values if k_low else None  # ascending
    high = rows.topk(k_high, dim=1, largest=True).values if k_high else None  # descending

    def order_stat(i: int) -> torch.Tensor:
        return low[:, i] if i < n // 2 else high[:, n - 1 - i]  # type: ignore[index]

    return [_interpolated_quantile(order_stat, n, q, rows.dtype) for q in qs]


def _row_errors(rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool, p: float) -> torch.Tensor:
    scale, zp = affine_params(low, high, bits, symmetric)
    scale, zp = scale[:, None], zp[:, None]
    qmin, qmax = grid_bounds(bits, symmetric)
    # (clamp(round(rows/s) + z, qmin, qmax) - z)·s - rows, in place on one buffer (same values, a third of the memory traffic)
    err = rows / scale
    err.round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale).sub_(rows)
    return (err.square_() if p == 2 else err.abs_().pow_(p)).mean(dim=1)


def _select(candidates: Sequence[tuple[torch.Tensor, torch.Tensor]], errors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the candidate with the smallest error; ties keep the earlier candidate."""
    best = torch.stack(errors).argmin(dim=0)  # argmin returns the first minimum
    lows = torch.stack([c[0] for c in candidates])
    highs = torch.stack([c[1] for c in candidates])
    idx = torch.arange(lows.shape[1], device=lows.device)
    return lows[best, idx], highs[best, idx]


@OBSERVERS.register("minmax")
def minmax_observer(rows: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain minimum and maximum of each row."""
    return rows.amin(dim=1), rows.amax(dim=1)


@OBSERVERS.register("percentile")
def percentile_observer(
    rows: torch.Tensor,
    bits: int,
    symmetric: bool,
    percentiles: Sequence[float] = REPQ_PERCENTILES,
    p: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each row to its [1-pct, pct] quantiles, keeping the pct with the smallest L_p error.

    This is RepQ-ViT's search (quantizer.py ``init_quantization_scale``): for pct in {0.999, 0.9999, 0.99999}
    the range is (quantile(1-pct), quantile(pct)) and the score is mean |x - Q(x)|^p with p = 2.
    """
    quantiles = rowwise_quantiles(rows, [q for pct in percentiles for q in (1.0 - pct, pct)])
    candidates = list(zip(quantiles[0::2], quantiles[1::2]))
    errors = [_row_errors(rows, lo, hi, bits, symmetric, p) for lo, hi in candidates]
    return _select(candidates, errors)


@OBSERVERS.register("mse")
def mse_observer(
    rows: torch.Tensor, bits: int, symmetric: bool, num_candidates: int = 100, p: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink the min-max range by factors in (0, 1] and keep the factor with the smallest L_p error per row."""
    low, high = rows.amin(dim=1), rows.amax(dim=1)
    factors = torch.linspace(1.0 / num_candidates, 1.0, num_candidates).tolist()
    candidates = [(low * f, high * f) for f in factors]
    errors = [_row_errors(rows, lo, hi, bits, symmetric, p) for lo, hi in candidates]
    return _select(candidates, errors)
