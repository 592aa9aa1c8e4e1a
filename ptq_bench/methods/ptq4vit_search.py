"""PTQ4ViT's per-layer scale search, with every candidate of a chunk evaluated in one tensor operation.

Each function follows the ``calibration_step2`` of one official layer class (hahnyuan/PTQ4ViT @ b42c790):
* :func:`search_linear`: quant_layers/linear.py ``PTQSLBatchingQuantLinear`` and ``PostGeluPTQSLBatchingQuantLinear``;
* :func:`search_matmul`: quant_layers/matmul.py ``PTQSLBatchingQuantMatMul`` and ``SoSPTQSLBatchingQuantMatMul``;
* :func:`search_conv`: quant_layers/conv.py ``ChannelwiseBatchingQuantConv2d`` and ``BatchingEasyQuantConv2d``.

Candidate scores use the official "similarity" (higher is better), reduced in the official order: the metric
over the feature axis, a mean over the token axes, a sum over samples, and the first argmax. Candidate
stacks use the official memory layout (e.g. the weights of k candidates stacked as k·out rows of a single
``F.linear``), so the arithmetic is the same as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ptq_bench.methods.base import BitWidth
from ptq_bench.methods.ptq4vit_capture import Recording
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul
from ptq_bench.quant.twin_uniform import (
    TwinGeluQuantizer,
    TwinSoftmaxQuantizer,
    interval_quant,
    signed_qmax,
    twin_gelu_quant,
    twin_softmax_quant,
)
from ptq_bench.quant.uniform import UniformQuantizer

ScoreFn = Callable[[slice, slice], torch.Tensor]


@dataclass(frozen=True)
class SearchSettings:
    metric: str  # "hessian" or "cosine"
    eq_alpha: float
    eq_beta: float
    eq_n: int
    search_round: int
    n_split: int
    chunk_numel: int  # elements allowed in one candidate stack

    def factors(self, device: torch.device) -> torch.Tensor:
        """α + i(β-α)/n for i < n, on ``device``. The official code builds n+1 values but evaluates only the first n."""
        step = self.eq_beta - self.eq_alpha
        return torch.tensor([self.eq_alpha + i * step / self.eq_n for i in range(self.eq_n)], device=device)

    def splits(self, device: torch.device) -> torch.Tensor:
        """Split-point candidates 2^-i, i < n_split (``SoSPTQSLBatchingQuantMatMul.calibration_step2``), on ``device``."""
        return torch.tensor([2.0 ** (-i) for i in range(self.n_split)], device=device)


def init_interval(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The official min-max initialisation, max / (2^(b-1) - 0.5)."""
    return x / (signed_qmax(bits) - 0.5)


def similarity(raw: torch.Tensor, sim: torch.Tensor, grad: Optional[torch.Tensor], metric: str, dim: Optional[int]) -> torch.Tensor:
    """The official ``_get_similarity``. Hessian: -(g·(O-Ô))², averaged over ``dim`` (not reduced when None).
    Cosine: cosine similarity along ``dim``.

    ``sim`` is a scratch tensor of the full (broadcast) shape and is overwritten: the Hessian terms are built
    in place as (g·(Ô-O))², which is bit-identical to the official (g·(O-Ô))² and the negation after the mean.
    """
    if metric == "cosine":
        return F.cosine_similarity(raw, sim, dim=-1 if dim is None else dim)
    assert grad is not None, "the hessian metric needs recorded gradients"
    value = sim.sub_(raw).mul_(grad).square_()
    return value.neg_() if dim is None else value.mean(dim=dim).neg_()


def grid_scores(n_candidates: int, n_samples: int, numel_per_pair: int, chunk_numel: int, score: ScoreFn) -> torch.Tensor:
    """Scores (n_candidates, groups) summed over samples. ``score(samples, candidates)`` evaluates one chunk,
    sized so that about ``chunk_numel`` elements (samples × candidates × ``numel_per_pair``) are live at once."""
    per_sample = max(numel_per_pair, 1)
    samples = max(1, min(n_samples, chunk_numel // per_sample))
    cands = max(1, min(n_candidates, chunk_numel // (samples * per_sample)))
    total: Optional[torch.Tensor] = None
    for s0 in range(0, n_samples, samples):
        s = slice(s0, s0 + samples)
        part = torch.cat([score(s, slice(c0, c0 + cands)) for c0 in range(0, n_candidates, cands)], dim=0)
        total = part if total is None else total + part
    assert total is not None
    return total


def best(candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per group (column), the candidate with the highest score; ties keep the first (as ``torch.argmax``)."""
    index = scores.argmax(dim=0, keepdim=True)
    return torch.gather(candidates, 0, index).squeeze(0)


def _token_mean(value: torch.Tensor, keep_tail: int) -> torch.Tensor:
    """Mean over the axes between the sample axis and the last ``keep_tail`` axes (the official token mean)."""
    axes = list(range(1, value.ndim - keep_tail))
    return value.mean(dim=axes) if axes else value


def _converged(round_index: int, new: tuple[torch.Tensor, ...], old: tuple[torch.Tensor, ...]) -> bool:
    """True when a round reproduced the previous round's scales: every later round would repeat it."""
    return round_index > 0 and all(torch.equal(a, b) for a, b in zip(new, old))


# ---------------------------------------------------------------------------------------------------- linear


def search_linear(layer: QuantLinear, record: Recording, settings: SearchSettings, bits: BitWidth, groups: int) -> None:
    """Alternate the weight-scale search (one scale per group of output rows) and the input-scale search."""
    x, raw, grad = record.input(), record.output(), record.grad()
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else None
    twin = isinstance(layer.input_quantizer, TwinGeluQuantizer)
    out_features, in_features = weight.shape
    rows = out_features // groups
    samples, tokens = x.shape[0], x[0].numel() // in_features

    def quant_input(t: torch.Tensor, interval: torch.Tensor) -> torch.Tensor:
        return twin_gelu_quant(t, interval, bits.a) if twin else interval_quant(t, interval, bits.a)

    def quant_weight(interval: torch.Tensor) -> torch.Tensor:
        return interval_quant(weight.view(groups, rows, in_features), interval.view(groups, 1, 1), bits.w).view_as(weight)

    def weight_scores(a_interval: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        raw_g = raw.unsqueeze(-2).view(*raw.shape[:-1], 1, groups, rows)
        grad_g = grad.unsqueeze(-2).view_as(raw_g) if grad is not None else None

        def score(s: slice, c: slice) -> torch.Tensor:
            k = cands[c].shape[0]
            w_sim = interval_quant(weight.view(1, groups, rows, in_features), cands[c].view(k, groups, 1, 1), bits.w)
            b_sim = bias.repeat(k) if bias is not None else None
            out = F.linear(quant_input(x[s], a_interval), w_sim.view(k * out_features, in_features), b_sim)
            out = out.view(*out.shape[:-1], k, groups, rows)
            value = similarity(raw_g[s], out, grad_g[s] if grad_g is not None else None, settings.metric, dim=-1)
            return _token_mean(value, keep_tail=2).sum(dim=0)

        return grid_scores(cands.shape[0], samples, tokens * out_features, settings.chunk_numel, score)

    def input_scores(w_interval: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        w_sim = quant_weight(w_interval)
        raw_e = raw.unsqueeze(-2)
        grad_e = grad.unsqueeze(-2) if grad is not None else None

        def score(s: slice, c: slice) -> torch.Tensor:
            x_sim = quant_input(x[s].unsqueeze(-2), cands[c].view(-1, 1))  # (samples, *, k, in)
            out = F.linear(x_sim, w_sim, bias)
            value = similarity(raw_e[s], out, grad_e[s] if grad_e is not None else None, settings.metric, dim=-1)
            return _token_mean(value, keep_tail=1).sum(dim=0).unsqueeze(-1)

        return grid_scores(cands.shape[0], samples, tokens * (in_features + out_features), settings.chunk_numel, score)

    w_interval = init_interval(weight.view(groups, -1).abs().amax(dim=1), bits.w)
    a_interval = init_interval(x.max() if twin else x.abs().max(), bits.a).reshape(1)
    factors = settings.factors(weight.device)
    w_cands = factors.view(-1, 1) * w_interval.unsqueeze(0)
    a_cands = factors.view(-1, 1) * a_interval.unsqueeze(0)
    for r in range(settings.search_round):
        new_w = best(w_cands, weight_scores(a_interval, w_cands))
        new_a = best(a_cands, input_scores(new_w, a_cands))
        done = _converged(r, (new_w, new_a), (w_interval, a_interval))
        w_interval, a_interval = new_w, new_a
        if done:
            break
    _install_uniform(layer.weight_quantizer, w_interval.repeat_interleave(rows).view(-1, 1))  # one scale per row
    if twin:
        layer.input_quantizer.set_interval(a_interval)
    else:
        _install_uniform(layer.input_quantizer, a_interval.reshape(()))


# ---------------------------------------------------------------------------------------------------- matmul


def search_matmul(layer: QuantMatMul, record: Recording, settings: SearchSettings, bits: int) -> None:
    """Head-wise scales for both operands; a twin-uniform split for a post-Softmax first operand."""
    a, b, raw, grad = record.input(0), record.input(1), record.output(), record.grad()
    samples, heads, m, inner = a.shape
    n = b.shape[-1]
    twin = isinstance(layer.quantizer_a, TwinSoftmaxQuantizer)

    def run(numel: int, score: ScoreFn, n_cands: int) -> torch.Tensor:
        return grid_scores(n_cands, samples, numel, settings.chunk_numel, score)

    def reduce(s: slice, out: torch.Tensor, per_head: bool) -> torch.Tensor:
        value = similarity(raw[s].unsqueeze(0), out, grad[s].unsqueeze(0) if grad is not None else None, settings.metric, dim=-1)
        return value.mean(dim=3).sum(dim=1) if per_head else value.mean(dim=[2, 3]).sum(dim=1, keepdim=True)

    def a_scores(b_interval: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        b_sim = interval_quant(b, b_interval.view(heads, 1, 1), bits)

        def score(s: slice, c: slice) -> torch.Tensor:
            a_sim = interval_quant(a[s].unsqueeze(0), cands[c].view(-1, 1, heads, 1, 1), bits)
            return reduce(s, a_sim @ b_sim[s].unsqueeze(0), per_head=True)

        return run(heads * m * (inner + n), score, cands.shape[0])

    def split_scores(splits: torch.Tensor) -> torch.Tensor:
        def score(s: slice, c: slice) -> torch.Tensor:
            a_sim = twin_softmax_quant(a[s].unsqueeze(0), splits[c].view(-1, 1, 1, 1, 1), bits)
            return reduce(s, a_sim @ b[s].unsqueeze(0), per_head=False)  # the official split search keeps B in FP

        return run(heads * m * (inner + n), score, splits.shape[0])

    def b_scores(quant_a: Callable[[torch.Tensor], torch.Tensor], cands: torch.Tensor) -> torch.Tensor:
        a_sim = quant_a(a)

        def score(s: slice, c: slice) -> torch.Tensor:
            b_sim = interval_quant(b[s].unsqueeze(0), cands[c].view(-1, 1, heads, 1, 1), bits)
            return reduce(s, a_sim[s].unsqueeze(0) @ b_sim, per_head=True)

        return run(heads * n * (inner + m), score, cands.shape[0])

    factors = settings.factors(b.device).view(-1, 1)
    b_interval = init_interval(b.abs().amax(dim=(0, 2, 3)), bits)
    b_cands = factors * b_interval.unsqueeze(0)
    if twin:
        # The split search ignores B's scale, so every round repeats the first one.
        split_cands = settings.splits(b.device).view(-1, 1)
        split = best(split_cands, split_scores(split_cands)).reshape(())
        b_interval = best(b_cands, b_scores(lambda t: twin_softmax_quant(t, split, bits), b_cands))
        layer.quantizer_a.set_split(split)
    else:
        a_interval = init_interval(a.abs().amax(dim=(0, 2, 3)), bits)
        a_cands = factors * a_interval.unsqueeze(0)
        for r in range(settings.search_round):
            new_a = best(a_cands, a_scores(b_interval, a_cands))
            new_b = best(b_cands, b_scores(lambda t: interval_quant(t, new_a.view(heads, 1, 1), bits), b_cands))
            done = _converged(r, (new_a, new_b), (a_interval, b_interval))
            a_interval, b_interval = new_a, new_b
            if done:
                break
        _install_uniform(layer.quantizer_a, a_interval.view(heads, 1, 1))
    _install_uniform(layer.quantizer_b, b_interval.view(heads, 1, 1))


# ---------------------------------------------------------------------------------------------------- conv


def search_conv(layer: QuantConv2d, record: Recording, settings: SearchSettings, bits: int, channelwise: bool) -> None:
    """Weight-scale search of the patch embedding; its input stays FP, so one round equals three."""
    x, raw, grad = record.input(), record.output(), record.grad()
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else None
    out_channels = weight.shape[0]
    groups = out_channels if channelwise else 1

    def score(s: slice, c: slice) -> torch.Tensor:
        k = cands[c].shape[0]
        w_sim = interval_quant(weight.unsqueeze(0), cands[c].view(k, groups, 1, 1, 1), bits)
        b_sim = bias.repeat(k) if bias is not None else None
        out = layer._conv_forward(x[s], w_sim.reshape(k * out_channels, *weight.shape[1:]), b_sim)
        out = out.view(out.shape[0], k, out_channels, *out.shape[2:])
        raw_s, grad_s = raw[s].unsqueeze(1), grad[s].unsqueeze(1) if grad is not None else None
        if not channelwise:  # BatchingEasyQuantConv2d: the metric runs over channels
            return similarity(raw_s, out, grad_s, settings.metric, dim=-3).mean(dim=[2, 3]).sum(dim=0).unsqueeze(-1)
        if settings.metric == "cosine":  # ChannelwiseBatchingQuantConv2d: cosine over each channel's map
            value = similarity(raw_s.flatten(3), out.flatten(3), None, "cosine", dim=-1)
            return value.sum(dim=0)
        return similarity(raw_s, out, grad_s, settings.metric, dim=None).mean(dim=[3, 4]).sum(dim=0)

    init = weight.abs().amax(dim=(1, 2, 3)) if channelwise else weight.abs().max().reshape(1)
    cands = settings.factors(weight.device).view(-1, 1) * init_interval(init, bits).unsqueeze(0)
    w_interval = best(cands, grid_scores(cands.shape[0], x.shape[0], raw[0].numel(), settings.chunk_numel, score))
    _install_uniform(layer.weight_quantizer, w_interval.expand(out_channels).reshape(-1, 1, 1, 1))


# ---------------------------------------------------------------------------------------------------- install


def _install_uniform(quantizer: UniformQuantizer, scale: torch.Tensor) -> None:
    """Install searched intervals on a symmetric uniform quantizer (zero point 0: PTQ4ViT's signed grid)."""
    quantizer.set_params(scale, torch.zeros_like(scale))
