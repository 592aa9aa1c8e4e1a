"""APHQ-ViT's per-layer calibration searches of the detection fork (GoatWu/APHQ-ViT @ 84c9fde, an mmdet 2 fork).

Each class follows one official layer class of Object-Detection/tools/quant_layers/<file>.py operation for operation,
so that on the same tensors the chosen grids are the official ones bit for bit (tests/test_aphq_detection_search.py
against oracles/aphq_detection_layers.py). The fork calibrates on one image (calib_size = 1, batch 1); how it drives
these (quant_utils/calibrator.py, wrap_net.py, quant_configs/4bit.py) is in :mod:`ptq_bench.methods.aphq_vit_detection`.
What differs from the classification searches (:mod:`ptq_bench.methods.aphq_vit_search`):

* :class:`DetectionLinearSearch`, linear.py ``AsymmetricallyBatchingQuantLinear`` and
  ``AsymmetricallyChannelWiseBatchingQuantLinear``: only the two self-error searches (weight, then input; the
  output-error rounds are commented out, so ``search_round`` is unused), percentile candidates from the 0.999
  quantile (classification: 0.9), chunks of a fixed 8 candidates, and calib_size = 1: the input search scores only
  the first row of the stacked calls (``raw_input[0:1]``: a window-attention Linear's first window, a RoI head's first
  RoI) while its candidates come from all rows. ``post_relu`` (the fork's ``fix_zp_zero``, fc2 under MLP
  reconstruction) only acts in the per-channel search (zero points 0, eq_n scales); the per-tensor search, the only
  one fc2 runs, ignores it.
* :class:`DetectionConvSearch`, conv.py ``AsymmetricallyBatchingQuantConv2d``: the conv's calls are a list (an RPN
  conv runs once per FPN level); weight grid per output channel by its own quantization error (classification:
  upper/lower bound searches on the output), input grid per tensor by the inputs' own error summed over the calls.
  At a bits >= 8 (the patch embedding) neither happens to the input: ``quant_input`` returns it unchanged and the
  input search is skipped (:attr:`DetectionConvSearch.input_quantized`).
* :class:`DetectionMatMulSearch`, matmul.py ``AsymmetricallyBatchingQuantMatMul``: the classification search but for
  its candidates: the per-head bounds are the quantiles at 0.999 + (0.99999 - 0.999)·(i/(eq_n-1))^0.1 and 1
  themselves (classification: eq_n + 1 points evenly between the 0.99 and 0.99999 quantiles).
"""

from __future__ import annotations

import torch
from torch import nn

from ptq_bench.methods.adalog_search import (
    ConvSearch,
    SearchSettings,
    affine_into,
    parallel_eq_n,
    quantile_mean,
    squared_error_,
)
from ptq_bench.methods.aphq_vit_search import AphqLinearSearch, UpperLowerMatMulSearch

#: the detection Linear's chunk of candidates (``_initialize_calib_parameters``: parallel_eq_n = 8)
LINEAR_CHUNK = 8


def percentile_steps(eq_n: int, l: float, r: float, k: float) -> torch.Tensor:
    """eq_n + 1 percentiles l + (r - l)·(i/(eq_n-1))^k, i < eq_n, and 1 (float32, as the official list)."""
    return torch.tensor([l + (r - l) * (i / (eq_n - 1)) ** k for i in range(eq_n)] + [1.0])


class DetectionLinearSearch(AphqLinearSearch):
    """linear.py ``AsymmetricallyBatchingQuantLinear`` (:meth:`search`) and, with ``channel_wise``,
    ``AsymmetricallyChannelWiseBatchingQuantLinear`` (:meth:`search_channel_wise`, then :meth:`reparameterized` and
    :meth:`search`). Results: ``w_scale``/``w_zp`` (n_v, rows, 1), ``a_scale``/``a_zp`` (1,) or (in_features,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, out: torch.Tensor, w_bits: int,
                 a_bits: int, settings: SearchSettings, n_v: int = 1, channel_wise: bool = False,
                 post_relu: bool = False) -> None:
        super().__init__(weight, bias, x, out, w_bits, a_bits, settings, n_v=n_v, channel_wise=channel_wise)
        #: the fork's ``fix_zp_zero`` (fc2 with MLP reconstruction): acts in :meth:`search_channel_wise` only
        self.post_relu = post_relu

    repeat_last_input_candidate = True

    def _init_chunks(self) -> None:
        self.par = LINEAR_CHUNK

    def batches(self, n: int):
        """calib_size = 1: the searches see ``x[0:1]`` only."""
        yield from super().batches(min(n, 1))

    def weight_candidates(self, l: float = 0.999, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return super().weight_candidates(l, r)

    def input_candidates(self, l: float = 0.999, r: float = 1.0, fix_zp_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return super().input_candidates(l, r, fix_zp_zero)

    def search(self) -> None:
        """``AsymmetricallyBatchingQuantLinear.hyperparameter_searching``: weight, then input, by own error."""
        self._start_recording()
        self._init_chunks()
        w_candidates, a_candidates = self.weight_candidates(), self.input_candidates()
        self.w_self(*w_candidates)
        self.a_self(*a_candidates)

    def search_channel_wise(self) -> None:
        """``AsymmetricallyChannelWiseBatchingQuantLinear.hyperparameter_searching``: per-channel input only."""
        self._init_chunks()
        self.a_self(*self.input_candidates(fix_zp_zero=self.post_relu))


class DetectionConvSearch(ConvSearch):
    """conv.py ``AsymmetricallyBatchingQuantConv2d`` on the list of a conv's calls ``xs`` (outputs ``outs``).
    Results: ``w_scale``/``w_zp`` (oc, 1); ``a_scale``/``a_zp`` (1, 1, 1, 1) if :attr:`input_quantized`, else None."""

    def __init__(self, conv: nn.Conv2d, xs: list[torch.Tensor], outs: list[torch.Tensor], w_bits: int, a_bits: int,
                 settings: SearchSettings) -> None:
        super().__init__(conv, xs[0], outs[0], w_bits, settings)
        self.x, self.out = xs, outs
        self.a_n = 2 ** (a_bits - 1)
        #: whether the official conv quantizes its input: ``quant_input`` passes it through at a bits >= 8
        self.input_quantized = a_bits < 8
        self.par = parallel_eq_n(self.eq_n, 2 * xs[0].numel() + 2 * outs[0].numel(), settings.memory_bytes)
        self.a_scale: torch.Tensor | None = None
        self.a_zp: torch.Tensor | None = None

    def weight_candidates(self, l: float = 0.999, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return super().weight_candidates(l, r)

    def input_candidates(self, l: float = 0.999, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``calculate_percentile_activation_candidates``: (eq_n, 1, 1, 1, 1) per-tensor grids over all calls."""
        num_zp = self.a_n
        num_scale = int(self.eq_n / num_zp)
        pct = torch.tensor([l, r])
        x = torch.cat([t.reshape(-1) for t in self.x])
        uppers = quantile_mean(x, pct, rows_first=False).view(-1, 1, 1, 1, 1)
        lowers = quantile_mean(x, 1 - pct, rows_first=False).view(-1, 1, 1, 1, 1)
        delta_min = uppers[0:1] - lowers[0:1]
        delta_max = uppers[1:] - lowers[1:]
        splits = torch.linspace(0, 1, steps=num_scale, device=x.device)[:, None, None, None, None] * (delta_max - delta_min)
        scales = ((delta_min + splits).repeat(num_zp, 1, 1, 1, 1) / (2 * self.a_n - 1)).clamp(min=1e-4)
        zp_min, zp_max = int(self.a_n - num_zp / 2), int(self.a_n + num_zp / 2)
        zps = torch.tensor(range(zp_min, zp_max), device=x.device).repeat_interleave(num_scale)[:, None, None, None, None]
        return scales, zps

    def w_self(self, scales: torch.Tensor, zps: torch.Tensor) -> None:
        """``_search_best_w_scale_self``: per output channel, the weight's own quantization error."""
        oc = self.oc
        w = self.weight.view(oc, -1).unsqueeze(0)
        sims = []
        for c in self.chunks():
            s, z = scales[c], zps[c]
            w_sim = affine_into(self.work.get("w", (s.shape[0], *w.shape[1:]), w), w, s, z, 2 * self.w_n - 1)
            error = squared_error_(w_sim.view(-1, *self.weight.shape), self.weight)
            sims.append(torch.mean(error, [2, 3, 4]).neg_())
        index = torch.topk(torch.cat(sims, dim=0), k=1, dim=0)[1].view(1, -1, 1)
        self.w_scale = torch.gather(scales, 0, index).squeeze(0)
        self.w_zp = torch.gather(zps, 0, index).squeeze(0).to(self.w_scale.dtype)

    def a_self(self, scales: torch.Tensor, zps: torch.Tensor) -> None:
        """``_search_best_a_scale_self``: the inputs' own quantization error, mean per call, summed over calls."""
        calls = []
        for x in self.x:
            raw = x.unsqueeze(0)
            sims = []
            for c in self.chunks():
                s, z = scales[c], zps[c]
                x_sim = affine_into(self.work.get("x", (s.shape[0], *x.shape), x), raw, s, z, 2 * self.a_n - 1)
                sims.append(torch.mean(squared_error_(x_sim, raw), dim=[1, 2, 3, 4]).neg_().unsqueeze(0))
            calls.append(torch.cat(sims, dim=1))
        total = torch.cat(calls, dim=0).sum(dim=0, keepdim=False)
        index = torch.topk(total, k=1, dim=0)[1].view(1, 1, 1, 1, 1)
        self.a_scale = torch.gather(scales, 0, index).squeeze(0)
        self.a_zp = torch.gather(zps, 0, index).squeeze(0).to(self.a_scale.dtype)

    def search(self) -> None:
        """``AsymmetricallyBatchingQuantConv2d.hyperparameter_searching``."""
        self.w_self(*self.weight_candidates())
        if self.input_quantized:
            self.a_self(*self.input_candidates())


class DetectionMatMulSearch(UpperLowerMatMulSearch):
    """matmul.py ``AsymmetricallyBatchingQuantMatMul`` of the fork: :class:`UpperLowerMatMulSearch` on its own bound
    candidates. Results: ``a_scale``/``a_zp``/``b_scale``/``b_zp`` (1, heads, 1, 1)."""

    def bounds(self, x: torch.Tensor, l: float = 0.999, r: float = 0.99999, k: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        """``calculate_percentile_candidates``: (eq_n + 1, 1, heads, 1, 1) per-head quantiles as upper bounds, the
        mirrored ones as lower bounds."""
        pct = percentile_steps(self.eq_n, l, r, k)
        per_head = x.transpose(0, 1).contiguous()
        shape = (self.eq_n + 1, 1, -1, 1, 1)
        return quantile_mean(per_head, pct, rows_first=True).view(shape), quantile_mean(per_head, 1 - pct, rows_first=True).view(shape)
