"""APHQ-ViT's per-layer calibration search (GoatWu/APHQ-ViT @ 84c9fde, a fork of AdaLog's code base).

The official calibration (``--calibrate``, utils/calibrator.py) runs AdaLog's layer-by-layer pipeline with uniform
grids everywhere and no FPCS; the searches differ from AdaLog's where the fork changed them:

* :class:`AphqLinearSearch`, quant_layers/linear.py ``AsymmetricallyBatchingQuantLinear``: AdaLog's percentile
  search without FPCS (self-error searches on the percentile candidates, then ``search_round`` rounds of output
  searches on the same candidates), with up to min(16, 2^w) weight zero points (AdaLog: min(16, 2^(w-1))) and the
  chunk formula 16·input + 16·output;
* :class:`UpperLowerMatMulSearch`, quant_layers/matmul.py ``AsymmetricallyBatchingQuantMatMul`` (both matmuls, the
  post-Softmax map too): per-head upper and lower bounds, each on eq_n + 1 points between the 0.99 and 0.99999
  quantiles (their mirrors below), searched together, then ``search_round`` × (upper with the lower fixed, lower
  with the upper fixed) per operand; the best candidate by ``argmax``;
* :class:`PercentileConvSearch`, quant_layers/conv.py ``AsymmetricallyBatchingQuantConv2d``: per-output-channel
  weight bounds at the percentiles 0.99 + 0.0099·(i/(eq_n-1))^0.5 and 1, then one round of upper/lower searches
  (the input is not quantized at qconv_a_bit = 8, where the official loop stops after one round).

Only the first eq_n of the eq_n + 1 candidates are ever scored (the official chunk loops stop at eq_n).
"""

from __future__ import annotations

import torch

from ptq_bench.methods.adalog_search import (
    ConvSearch,
    LinearSearch,
    MatMulSearch,
    quantile_mean,
)


def _argmax(total: torch.Tensor, topk: int, dim: int) -> torch.Tensor:
    if topk != 1:
        raise ValueError("APHQ-ViT's upper/lower searches keep one candidate")
    return total.argmax(dim=dim, keepdim=True)


def bounds_grid(upper: torch.Tensor, lower: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of the asymmetric grids spanning [lower, upper] with ``levels`` = 2^b levels."""
    scale = ((upper - lower) / (levels - 1)).contiguous()
    return scale, -(lower / scale).round().contiguous()


class AphqLinearSearch(LinearSearch):
    """``AsymmetricallyBatchingQuantLinear`` of the APHQ-ViT fork (search with ``SearchSettings.fpcs`` False)."""

    input_chunk_weight = 16
    weight_zp_levels = 2


class UpperLowerMatMulSearch(MatMulSearch):
    """Both operands of an attention matmul, per head, by alternating upper/lower bound searches."""

    def best(self, total: torch.Tensor, topk: int, dim: int) -> torch.Tensor:
        return _argmax(total, topk, dim)

    def bounds(self, x: torch.Tensor, l: float = 0.99, r: float = 0.99999) -> tuple[torch.Tensor, torch.Tensor]:
        """``calculate_percentile_candidates``: (eq_n + 1, 1, heads, 1, 1) upper and lower bound candidates."""
        pct = torch.tensor([l, r])
        per_head = x.transpose(0, 1).contiguous()
        uppers = quantile_mean(per_head, pct, rows_first=True)
        lowers = quantile_mean(per_head, 1 - pct, rows_first=True)
        steps = torch.linspace(0, 1, steps=self.eq_n + 1, device=x.device)[:, None, None, None, None]
        upper = uppers[0].view(1, 1, -1, 1, 1) + steps * (uppers[1] - uppers[0]).view(1, 1, -1, 1, 1)
        lower = lowers[1].view(1, 1, -1, 1, 1) + steps * (lowers[0] - lowers[1]).view(1, 1, -1, 1, 1)
        return upper, lower

    def _alternate(self, upper: torch.Tensor, lower: torch.Tensor, index: torch.Tensor, levels: int, score) -> torch.Tensor:
        """One round: the upper bounds with the lower at the last best index, then the lower with that upper."""
        for fix_upper in (True, False):
            u = torch.gather(upper, 0, index) if fix_upper else upper
            lo = lower if fix_upper else torch.gather(lower, 0, index)
            index = score(*bounds_grid(u, lo, levels))
        return index

    def search(self) -> None:
        """``AsymmetricallyBatchingQuantMatMul.hyperparameter_searching``."""
        if self.post_softmax:
            raise ValueError("APHQ-ViT quantizes the post-Softmax map with a uniform grid")
        self._start_recording()
        shape = (1, self.heads, 1, 1)
        a_upper, a_lower = self.bounds(self.a)
        b_upper, b_lower = self.bounds(self.b)
        a_scales, a_zps = bounds_grid(a_upper, a_lower, 2 * self.a_n)
        b_scales, b_zps = bounds_grid(b_upper, b_lower, 2 * self.b_n)
        self.a_scale, self.a_zp = a_scales[-2].view(shape), a_zps[-2].view(shape)
        self.b_scale, self.b_zp = b_scales[-2].view(shape), b_zps[-2].view(shape)
        a_index = self.a_scores(a_scales, a_zps)
        b_index = self.b_scores(b_scales, b_zps)
        for _ in range(self.s.search_round):
            a_index = self._alternate(a_upper, a_lower, a_index, 2 * self.a_n, self.a_scores)
            b_index = self._alternate(b_upper, b_lower, b_index, 2 * self.b_n, self.b_scores)


class PercentileConvSearch(ConvSearch):
    """The patch-embedding conv's weight grid by upper/lower percentile bounds (its input stays FP)."""

    def best(self, total: torch.Tensor, topk: int, dim: int) -> torch.Tensor:
        return _argmax(total, topk, dim)

    def bounds(self, l: float = 0.99, r: float = 0.9999, k: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """``calculate_percentile_weight_candidates`` (called with k = 0.5): (eq_n + 1, oc, 1) bounds."""
        pct = torch.tensor([l + (r - l) * (i / (self.eq_n - 1)) ** k for i in range(self.eq_n)] + [1.0])
        w = self.weight.view(self.oc, -1)
        upper = torch.quantile(w, pct.to(w.device), dim=-1).unsqueeze(-1)
        lower = torch.quantile(w, (1 - pct).to(w.device), dim=-1).unsqueeze(-1)
        return upper, lower

    def search(self) -> None:
        """``AsymmetricallyBatchingQuantConv2d.hyperparameter_searching`` with an 8-bit (unquantized) input."""
        levels = 2 * self.w_n
        upper, lower = self.bounds()
        index = self.w_out(*bounds_grid(upper, lower, levels))
        for fix_upper in (True, False):
            u = torch.gather(upper, 0, index) if fix_upper else upper
            lo = lower if fix_upper else torch.gather(lower, 0, index)
            index = self.w_out(*bounds_grid(u, lo, levels))
