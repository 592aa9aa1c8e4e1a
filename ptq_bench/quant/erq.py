"""ERQ's weight grids (Zhong et al., ICML 2024 / TPAMI 2025; zysxmu/ERQ @ 2f5b4ce quant/quantizer.py,
quant/quant_model.py).

* ``erq_weight`` observer: RepQ-ViT's percentile search with ERQ's wider list for weights
  (``init_quantization_scale`` when ``is_act`` is False): pct in {0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999,
  0.99995, 0.99999, 1}; activations keep RepQ-ViT's three.
* ``erq_two_part`` quantizer (``UniformQuantizer(two_part=True)``, which quant_model.py gives qkv and fc1): per
  output channel two asymmetric grids, one for the "outlier" input columns and one for the rest. A row's outliers
  are its entries above the 99th percentile of its positive entries or below the 1st percentile of its negative
  ones (``np.percentile``); the outlier columns are the out_features // 20 columns that are outliers in the most
  rows (``Counter.most_common``: ties in first-seen order).
* :func:`fake_quantize`: one grid with round, floor or ceil (ERQ's rounding refinement needs floor and ceil).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ptq_bench.quant.base import QuantGrid, Quantizer
from ptq_bench.quant.observers import OBSERVERS, affine_params, grid_bounds, percentile_observer
from ptq_bench.quant.registry import QUANTIZERS

#: quant/quantizer.py ``search_range`` for weights (``is_act`` False)
ERQ_WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999, 1.0)

Rounding = Callable[[torch.Tensor], torch.Tensor]

OBSERVERS.register("erq_weight")(functools.partial(percentile_observer, percentiles=ERQ_WEIGHT_PERCENTILES))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  rounding: Rounding = torch.round) -> torch.Tensor:
    """(clamp(rounding(x/s) + z, qmin, qmax) - z)·s, the official expression operation for operation."""
    q = torch.clamp(rounding(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def outlier_columns(weight: torch.Tensor, percentile: float, count: int) -> list[int]:
    """The ``count`` input columns that hold a row's outliers in the most rows (ties: first seen first)."""
    counts: Counter[int] = Counter()
    for row in weight:
        values = row.detach().cpu().numpy()
        high = np.percentile(values[values > 0], percentile)
        low = np.percentile(values[values < 0], 100 - percentile)
        counts.update(torch.nonzero((row > high) | (row < low)).flatten().tolist())
    return [column for column, _ in counts.most_common(count)]


@dataclass(frozen=True)
class TwoPartOptions:
    """``outlier_percentile``: a row's outliers lie above this percentile of its positive entries (below 100 minus it
    of its negative ones); ``outlier_divisor``: out_features // divisor outlier columns; ``observer``: each grid's
    range search."""

    outlier_percentile: float = 99.0
    outlier_divisor: int = 20
    observer: str = "erq_weight"


@QUANTIZERS.register("erq_two_part")
class TwoPartWeightQuantizer(Quantizer):
    """A 2-D weight, per output channel: ``outlier_columns`` on (``scale``, ``zero_point``), the other columns on
    (``scale_2``, ``zero_point_2``); a column in neither (ERQ appends the bias as one) comes out 0."""

    Options = TwoPartOptions
    capabilities = frozenset({"signed"})

    def __init__(self, bits: int, **options) -> None:
        super().__init__(bits, **options)
        self.observer = OBSERVERS.get(self.options.observer)
        for name in ("scale", "zero_point", "scale_2", "zero_point_2"):
            self.register_buffer(name, torch.zeros(()))
        self.register_buffer("outlier_columns", torch.zeros(0, dtype=torch.long))
        self.register_buffer("other_columns", torch.zeros(0, dtype=torch.long))

    def calibrate(self, x: torch.Tensor) -> None:
        if x.ndim != 2:
            raise ValueError(f"erq_two_part quantizes 2-D (Linear) weights, got shape {tuple(x.shape)}")
        count = x.shape[0] // self.options.outlier_divisor
        if count == 0:
            raise ValueError(f"erq_two_part: {x.shape[0]} output channels give no outlier column (out // {self.options.outlier_divisor})")
        top = outlier_columns(x, self.options.outlier_percentile, count)
        chosen = set(top)
        rest = [c for c in range(x.shape[1]) if c not in chosen]
        grids = [self._fit(x[:, columns]) for columns in (top, rest)]
        self.outlier_columns = torch.tensor(top, dtype=torch.long, device=x.device)
        self.other_columns = torch.tensor(rest, dtype=torch.long, device=x.device)
        (self.scale, self.zero_point), (self.scale_2, self.zero_point_2) = grids
        self.calibrated = True
        self.params_changed()

    def _fit(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.observer(rows.float(), self.bits, False)
        scale, zero_point = affine_params(low, high, self.bits, False)
        return scale.reshape(-1, 1), zero_point.reshape(-1, 1)

    def quantize_with(self, x: torch.Tensor, rounding: Rounding = torch.round) -> torch.Tensor:
        """The two grids with ``rounding`` (round, floor or ceil) on ``x``'s first columns."""
        qmin, qmax = grid_bounds(self.bits, False)
        out = torch.zeros_like(x)
        out[:, self.outlier_columns] = fake_quantize(x[:, self.outlier_columns], self.scale, self.zero_point, qmin, qmax, rounding)
        out[:, self.other_columns] = fake_quantize(x[:, self.other_columns], self.scale_2, self.zero_point_2, qmin, qmax, rounding)
        return out

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_with(x)

    def export(self) -> QuantGrid:
        qmin, qmax = grid_bounds(self.bits, False)
        steps = torch.arange(qmin, qmax + 1, dtype=self.scale.dtype, device=self.scale.device)
        levels = torch.stack([(steps - self.zero_point) * self.scale, (steps - self.zero_point_2) * self.scale_2], dim=1)
        return QuantGrid("non_uniform", self.bits, levels=levels, axis=0,
                         note="two affine grids per output channel: levels[:, 0] for the input columns "
                              f"{self.outlier_columns.tolist()}, levels[:, 1] for the others")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outlier columns={self.outlier_columns.numel()}"
