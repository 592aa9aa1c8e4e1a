"""AdaLog's per-layer search: percentile candidates refined by FPCS, for weights, uniform inputs and log grids.

Each class follows one official layer class of GoatWu/AdaLog @ 75a57d2 operation for operation (same candidate
tensors, same reductions, same ``torch.topk`` calls), so that the chosen parameters are the official ones bit for
bit on the same inputs:

* :class:`LinearSearch`: quant_layers/linear.py ``AsymmetricallyBatchingQuantLinear`` (every Linear),
  ``AsymmetricallyChannelWiseBatchingQuantLinear`` (qkv/fc1 when w = a: a per-channel input search, the scale
  reparameterization, then the plain search on the reparameterized input) and ``PostGeluLogBasedBatchingQuantLinear``
  (fc2: the AdaLog log-base and scale search);
* :class:`MatMulSearch`: quant_layers/matmul.py ``AsymmetricallyBatchingQuantMatMul`` (Q·Kᵀ, per-head scales) and
  ``PostSoftmaxAsymmetricallyBatchingQuantMatMul`` (attn·V: AdaLog q search on the map, per-head V scales);
* :class:`ConvSearch`: quant_layers/conv.py ``AsymmetricallyBatchingQuantConv2d`` (patch embedding; its input
  is not quantized at qconv_a_bit = 8).

Scores are the official "similarity" -(O - Ô)² (higher is better; here negated after its reductions). Uniform grids
are asymmetric: x̂ = (clamp(round(x/s) + z, 0, 2^b - 1) - z)·s. Candidate stacks are evaluated in chunks of ``parallel_eq_n``
candidates, sized from a memory budget by the official formula (``_initialize_calib_parameters``); the official
code sizes them from the GPU's memory, the oracle from a fake 8 GiB device.

FPCS (``weight_fpcs``/``activation_fpcs``/``_fpcs``, paper Sec. 3.4): from eq_n percentile candidates keep the top
``fpcs_width``, then for ``steps - 1`` rounds put eq_n/fpcs_width points around each survivor with a spacing that
shrinks by 1/(eq_n/fpcs_width - 0.5) per round; the last round keeps the best one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ptq_bench.quant.adalog import ADALOG_R, LOG_FLOOR, adalog_dequant, adalog_tables, table_denominator


@dataclass(frozen=True)
class SearchSettings:
    eq_n: int  # candidates per search (configs: 128)
    search_round: int  # rounds of alternating searches (configs: 3)
    fpcs: bool  # FPCS refinement (configs: True); False: one search over the percentile candidates
    steps: int  # FPCS rounds (configs: 6)
    batch_size: int  # calib_batch_size: samples per similarity batch (configs: 32)
    memory_bytes: int  # the official "GPU memory" the candidate chunks are sized from
    fpcs_width: int = 16  # survivors per FPCS round of the uniform searches (the code's default)
    r: int = ADALOG_R
    #: scratch buffers the run's searches share (not a setting: no part of comparisons)
    work: "Workspace" = field(default_factory=lambda: Workspace(), compare=False, repr=False)


def affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """The official asymmetric uniform fake quantizer (quantizers/uniform.py, evaluation path)."""
    return (torch.round(x / scale) + zero_point).clamp(0, qmax).sub(zero_point).mul(scale)


#: Q·Kᵀ candidates: the fixed Kᵀ's columns (tokens) are zero-padded to a multiple of this for the bmm (MKL runs an odd
#: column count such as 197 at half speed; each output column is the same dot product, checked bit for bit)
GEMM_COLUMNS = 16
#: weight candidates' output columns per addmm at least (far from small-matrix GEMM paths)
GEMM_MIN_COLUMNS = 256


def parallel_eq_n(eq_n: int, numel: int, memory_bytes: int) -> int:
    """Candidates per chunk (``_initialize_calib_parameters``): memory/2 split into 4-byte elements per ``numel``."""
    memory = memory_bytes // 2
    par = int((memory / 4) // max(numel, 1))
    par = max(par, 1)
    return math.ceil(eq_n * 1.0 / math.ceil(eq_n * 1.0 / par))


def quantile_mean(x: torch.Tensor, pct: torch.Tensor, rows_first: bool) -> torch.Tensor:
    """torch.quantile over the last dimension of ``x`` viewed as (mb, -1) per leading row, averaged over the mb
    pieces; mb doubles while torch.quantile refuses the size (the official ``tensor_too_large`` loop)."""
    mb = 1
    while True:
        try:
            view = x.view(x.shape[0], mb, -1) if rows_first else x.reshape(-1).view(mb, -1)
            return torch.quantile(view, pct.to(x.device), dim=-1).mean(dim=-1)
        except RuntimeError:
            mb *= 2
            if mb > x.numel():
                raise


def positive_percentile(tensor: torch.Tensor, q: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Percentiles of the positive entries (``PostGeluLogBasedBatchingQuantLinear.positive_percentile``): the
    sorted positives' element at rank ceil(count·q) - 1, 0 where there is none."""
    positive = torch.where(tensor > 0, tensor, torch.tensor(float("nan"), device=tensor.device))
    ordered, _ = positive.sort(dim=dim)
    counts = (~torch.isnan(ordered)).sum(dim=dim, keepdim=True).float()
    q = q.reshape(q.numel(), *[1] * tensor.ndim)
    ranks = ((counts * q).ceil().long() - 1).clamp(min=0)
    expanded = ordered.unsqueeze(0).expand(q.numel(), *ordered.shape)
    result = torch.gather(expanded, dim + 1, ranks).squeeze(dim + 1)
    return result.masked_fill_(torch.isnan(result), 0)


def search_table(bits: int, r: int, device: torch.device) -> torch.Tensor:
    """The float32 fractional table the official searches use (``self.table``): 2^(-j/r) rounded to multiples of
    1/(4·2^(b-1) - 2), j < 120."""
    table = torch.tensor([2 ** (-j / float(r)) for j in range(120)])
    step = 1.0 / table_denominator(bits)
    return (torch.round(table / step) * step).to(device)


def table_dequant(codes: torch.Tensor, q: torch.Tensor, bits: int, r: float, table: torch.Tensor) -> torch.Tensor:
    """The searches' de-quantization of unclamped codes, as written in the official searches:
    2^-floor(e·q/r)·table[(e·q) mod r], 0 for e ≥ 2^b."""
    mask = codes >= 2**bits
    codes = codes.clamp_(0, 2**bits - 1)
    product = codes * q
    column = torch.remainder(product, r).round_().long()
    value = torch.pow(2, product.div_(r).floor_().mul_(-1)).mul_(torch.take(table, column))
    return value.masked_fill_(mask, 0)


def code_levels(q: torch.Tensor, bits: int, r: float, table: torch.Tensor) -> torch.Tensor:
    """(k, 2^b + 1): :func:`table_dequant` of every code 0..2^b-1 for each of the k bases ``q``, and a final 0 (the
    value of codes ≥ 2^b); the same elementwise operations on the same exact integers, so the same values."""
    codes = torch.arange(2**bits, dtype=torch.float32, device=q.device).view(-1, 1)
    levels = table_dequant(codes, q.reshape(1, -1), bits, r, table).transpose(0, 1)
    return torch.cat([levels, levels.new_zeros(levels.shape[0], 1)], dim=1)


def dequant_codes(codes: torch.Tensor, levels: torch.Tensor, work: "Workspace", dim: int) -> torch.Tensor:
    """:func:`table_dequant` of ``codes`` whose candidate axis ``dim`` holds k candidates, by one lookup in their rows of
    ``levels`` ((k, 2^b + 1), :func:`code_levels`, possibly scaled and shifted per candidate): an int32 index and one
    ``index_select`` into reused buffers (``codes`` is overwritten)."""
    k, width = levels.shape
    shape = [1] * codes.ndim
    shape[dim] = k
    offsets = (torch.arange(k, dtype=codes.dtype, device=codes.device) * width).view(shape)
    index = work.get("index", codes.shape, codes, torch.int32)
    index.copy_(codes.clamp_(0, width - 1).add_(offsets))
    out = work.get("levels", codes.shape, codes)
    torch.index_select(levels.reshape(-1), 0, index.view(-1), out=out.view(-1))
    return out


def affine_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """:func:`affine` of ``x`` under candidate grids that broadcast to ``out``'s shape, computed in ``out``: the
    official searches' operations ((round(x/s) + z).clamp(0, qmax) - z)·s in the same order, in place."""
    torch.div(x, scale, out=out).round_().add_(zero_point).clamp_(0, qmax).sub_(zero_point)
    return out.mul_(scale)


def squared_error_(out: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """(Ô - O)² in place in ``out`` (one pass: aten's unreduced MSE kernel, (a - b)·(a - b), the same values as
    sub_().square_()): the official similarity -(O - Ô)² without its negation, which the callers apply to the
    reduced scores instead (exact: float sums and means are symmetric under negation)."""
    return torch.ops.aten.mse_loss.out(out, raw, 0, out=out)  # reduction 0: none


class Workspace:
    """Scratch tensors reused across candidate chunks: the searches write their large temporaries with ``out=`` or in
    place, since a fresh tensor of a few hundred MB per chunk costs more in page faults than the arithmetic on it."""

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A contiguous ``shape`` view of buffer ``name`` (``like``'s device, ``dtype`` or ``like``'s), grown as needed;
        its contents are undefined."""
        dtype = dtype or like.dtype
        numel = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != like.device:
            flat = self._flat[name] = torch.empty(numel, dtype=dtype, device=like.device)
        return flat[:numel].view(*shape)


def _exact_key(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.detach().cpu().numpy().tobytes()) for t in tensors)


class _Searcher:
    def __init__(self, settings: SearchSettings) -> None:
        self.s = settings
        self.eq_n = settings.eq_n
        self.par = settings.eq_n
        self.work = settings.work
        self._start_recording()

    def _start_recording(self) -> None:
        """Forget the recorded searches (at the start of a layer's search: the data may change between calls)."""
        self._results: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def _recorded(self, strategy: Callable[..., torch.Tensor], name: str, fixed: Sequence[str], found: Sequence[str],
                  candidates: tuple[torch.Tensor, ...], topk: int) -> torch.Tensor:
        """``strategy(*candidates, topk)``, or its recorded result on the same exact inputs.

        Each search of the alternating rounds is a deterministic function of its candidates, ``topk`` and the other
        quantizer's current parameters (the attributes ``fixed``; the layer's data do not change during a search).
        Once the rounds reach a fixed point the official code repeats searches on the same inputs (AdaLog: whole FPCS
        chains, top-k steps included): a repeat returns the recorded index and, for topk = 1, sets the attributes
        ``found`` to the recorded values (the same bits) instead of scoring the candidates again."""
        key = (name, topk, *_exact_key((*candidates, *(getattr(self, attr) for attr in fixed))))
        if key not in self._results:
            index = strategy(*candidates, topk)
            self._results[key] = (index, tuple(getattr(self, attr).clone() for attr in found) if topk == 1 else ())
        index, values = self._results[key]
        for attr, value in zip(found, values):
            setattr(self, attr, value.clone())
        return index

    def chunks(self):
        for p_st in range(0, self.eq_n, self.par):
            yield slice(p_st, min(self.eq_n, p_st + self.par))

    def batches(self, n: int):
        for b_st in range(0, n, self.s.batch_size):
            yield slice(b_st, min(n, b_st + self.s.batch_size))

    def best(self, total: torch.Tensor, topk: int, dim: int) -> torch.Tensor:
        """Indices of the ``topk`` highest scores along ``dim`` (``torch.topk``, as AdaLog's matmul and conv
        searches pick them)."""
        return torch.topk(total, k=topk, dim=dim)[1]

    def fpcs(self, candidates: tuple[torch.Tensor, torch.Tensor], strategy: Callable, dim: int) -> None:
        """FPCS over (scales, zero points) stacked on ``dim`` (0 for weights and matmul operands, -1 for inputs)."""
        width = self.s.fpcs_width
        new_cnt = int(self.eq_n / width)
        scales, zps = candidates
        if dim == 0:
            delta = scales[1:2] - scales[0:1]
        else:
            delta = scales[:, 1:2] - scales[:, 0:1]
        index = strategy(scales, zps, topk=width)
        top_s, top_z = torch.gather(scales, dim, index), torch.gather(zps, dim, index)
        remain = self.s.steps - 1
        while remain > 0:
            lin = torch.linspace(0, 1, steps=new_cnt, device=scales.device)
            if dim == 0:
                offsets = (lin.view(-1, *[1] * (scales.ndim - 1)) - 0.5) * delta
                delta = delta / (new_cnt - 0.5)
                scales = (top_s.unsqueeze(1) + offsets.unsqueeze(0)).reshape(-1, *scales.shape[1:])
            else:
                offsets = (lin[None, :] - 0.5) * delta
                delta = delta / (new_cnt - 0.5)
                scales = (top_s.unsqueeze(-1) + offsets.unsqueeze(-2)).reshape(*scales.shape[:-1], -1).clamp(min=1e-4)
            zps = top_z.repeat_interleave(new_cnt, dim=dim)
            index = strategy(scales, zps, topk=1 if remain == 1 else width)
            if remain > 1:
                top_s, top_z = torch.gather(scales, dim, index), torch.gather(zps, dim, index)
            remain -= 1


# ---------------------------------------------------------------------------------------------------- linear


class LinearSearch(_Searcher):
    """One Linear's search state: its weight/bias, the captured input ``x`` and output ``out``, and the found
    weight (``w_scale``/``w_zp``, shape (n_V, rows, 1)) and input (``a_scale``/``a_zp``) grids."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor, out: torch.Tensor,
                 w_bits: int, a_bits: int, settings: SearchSettings, n_v: int = 1, channel_wise: bool = False) -> None:
        super().__init__(settings)
        self.weight, self.bias, self.x, self.out = weight, bias, x, out
        self.w_bits, self.a_bits = w_bits, a_bits
        self.w_n, self.a_n = 2 ** (w_bits - 1), 2 ** (a_bits - 1)
        self.out_features, self.in_features = weight.shape
        self.n_v, self.rows = n_v, self.out_features // n_v
        self.channel_wise = channel_wise
        dev = weight.device
        self.w_scale = torch.zeros(n_v, self.rows, 1, device=dev)
        self.w_zp = torch.zeros(n_v, self.rows, 1, device=dev)
        size = self.in_features if channel_wise else 1
        self.a_scale = torch.zeros(size, device=dev)
        self.a_zp = torch.zeros(size, device=dev)
        self._init_chunks()

    #: the official chunk-size formula's weight on the input (``_initialize_calib_parameters``: 8 in AdaLog)
    input_chunk_weight = 8
    #: zero-point candidates per weight search: min(16, ``weight_zp_levels``·2^(w-1)) (1 in AdaLog)
    weight_zp_levels = 1
    #: bytes of one row block's candidates in the input searches (kept in cache through the bmm and the error)
    block_bytes = 2**21
    #: whether the input candidates end with a copy of the last grid (the APHQ-ViT detection fork's)
    repeat_last_input_candidate = False
    #: the input quantizer's parameters (what the weight searches depend on besides the layer's data)
    input_parameters: tuple[str, ...] = ("a_scale", "a_zp")

    def _init_chunks(self) -> None:
        b = self.s.batch_size
        numel = self.input_chunk_weight * self.x[:b].numel() + 16 * self.out[:b].numel()
        self.par = parallel_eq_n(self.eq_n, numel, self.s.memory_bytes)

    # -------------------------------------------------------------------------------- current quantizers
    def quant_weight(self) -> torch.Tensor:
        w = self.weight.view(self.n_v, self.rows, self.in_features)
        return affine(w, self.w_scale, self.w_zp, 2 * self.w_n - 1).view(self.out_features, self.in_features)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return affine(x, self.a_scale, self.a_zp, 2 * self.a_n - 1)

    # -------------------------------------------------------------------------------- candidates
    def weight_candidates(self, l: float = 0.9, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        num_zp = min(16, self.weight_zp_levels * self.w_n)
        num_scale = int(self.eq_n / num_zp)
        pct = torch.tensor([l, r])
        w = self.weight.view(self.n_v, self.rows, self.in_features)
        uppers = torch.quantile(w, pct.to(w.device), dim=-1).unsqueeze(-1)
        lowers = torch.quantile(w, (1 - pct).to(w.device), dim=-1).unsqueeze(-1)
        delta_min = uppers[0:1] - lowers[0:1]
        delta_max = uppers[1:] - lowers[1:]
        splits = torch.linspace(0, 1, steps=num_scale, device=w.device)[:, None, None, None] * (delta_max - delta_min)
        scales = (delta_min + splits).repeat(num_zp, 1, 1, 1) / (2 * self.w_n - 1)
        zp_min, zp_max = int(self.w_n - num_zp / 2), int(self.w_n + num_zp / 2)
        zps = torch.tensor(range(zp_min, zp_max), device=w.device).repeat_interleave(num_scale)[:, None, None, None]
        return scales, zps.repeat(1, self.n_v, self.rows, 1)

    def input_candidates(self, l: float = 0.9, r: float = 1.0, fix_zp_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``calculate_percentile_activation_candidates``: num_scale·num_zp grids between the l and r quantile spans
        (with ``fix_zp_zero`` eq_n scales at zero point 0), and a copy of the last grid where
        :attr:`repeat_last_input_candidate` (never scored when num_zp divides eq_n)."""
        num_zp = 1 if fix_zp_zero else min(16, self.a_n * 2)
        num_scale = self.eq_n if fix_zp_zero else int(self.eq_n / num_zp)
        pct = torch.tensor([l, r])
        x = self.x
        if self.channel_wise:
            flat = x.view(-1, x.shape[-1])
            uppers = torch.quantile(flat, pct.to(x.device), dim=0).transpose(0, 1)
            lowers = torch.quantile(flat, (1 - pct).to(x.device), dim=0).transpose(0, 1)
        else:
            uppers = quantile_mean(x, pct, rows_first=False).unsqueeze(0)
            lowers = quantile_mean(x, 1 - pct, rows_first=False).unsqueeze(0)
        delta_min = uppers[:, 0:1] - lowers[:, 0:1]
        delta_max = uppers[:, 1:] - lowers[:, 1:]
        splits = torch.linspace(0, 1, steps=num_scale, device=x.device)[None, :] * (delta_max - delta_min)
        scales = ((delta_min + splits).repeat(1, num_zp) / (2 * self.a_n - 1)).clamp(min=1e-4)
        if fix_zp_zero:
            zps = torch.zeros_like(scales)
        else:
            zp_min, zp_max = int(self.a_n - num_zp / 2), int(self.a_n + num_zp / 2)
            zps = torch.tensor(range(zp_min, zp_max), device=x.device).repeat_interleave(num_scale)[None, :]
            zps = zps.repeat(scales.shape[0], 1)
        if self.repeat_last_input_candidate:
            return torch.cat([scales, scales[..., -1:]], dim=-1), torch.cat([zps, zps[..., -1:]], dim=-1)
        return scales, zps

    # -------------------------------------------------------------------------------- strategies
    def w_self(self, scales: torch.Tensor, zps: torch.Tensor, topk: int = 1) -> torch.Tensor:
        """``_search_best_w_scale_self``: the weight's own quantization error."""
        raw = self.weight.view(self.n_v, self.rows, self.in_features).unsqueeze(0)
        sims = []
        for c in self.chunks():
            s, z = scales[c], zps[c]
            w_sim = affine_into(self.work.get("w", (s.shape[0], *raw.shape[1:]), raw), raw, s, z, 2 * self.w_n - 1)
            sims.append(torch.mean(squared_error_(w_sim, raw), dim=-1, keepdim=False).neg_())
        _, index = torch.topk(torch.cat(sims, dim=0), k=topk, dim=0)
        index = index.reshape(topk, self.n_v, -1, 1)
        if topk == 1:
            self.w_scale = torch.gather(scales, 0, index).squeeze(0)
            self.w_zp = torch.gather(zps, 0, index).squeeze(0).to(self.w_scale.dtype)
        return index.squeeze(0)

    def w_out(self, scales: torch.Tensor, zps: torch.Tensor, topk: int = 1) -> torch.Tensor:
        """:meth:`_w_out`, a repeat answered from the record."""
        return self._recorded(self._w_out, "w_out", self.input_parameters, ("w_scale", "w_zp"), (scales, zps), topk)

    def _w_out(self, scales: torch.Tensor, zps: torch.Tensor, topk: int) -> torch.Tensor:
        """``_search_best_w_scale``: the layer output with the current input quantizer."""
        batch_sims = []
        w = self.weight.view(self.n_v, self.rows, self.in_features).unsqueeze(0)
        for b in self.batches(self.x.shape[0]):
            x = self.quant_input(self.x[b])
            raw = self.out[b].unsqueeze(-2)
            raw = raw.view(*raw.shape[:-1], self.n_v, -1)
            sims = []
            for c in self.chunks():
                s, z = scales[c], zps[c]
                k = s.shape[0]
                errors = torch.cat([self._weight_errors(x, w, raw, s[g], z[g]) for g in self._column_groups(k)], dim=1)
                sims.append(errors.sum(dim=0, keepdim=True).neg_())
            batch_sims.append(torch.cat(sims, dim=1))
        total = torch.cat(batch_sims, dim=0).sum(dim=0, keepdim=False)
        _, index = torch.topk(total, k=topk, dim=0)
        index = index.reshape(topk, self.n_v, -1, 1)
        if topk == 1:
            self.w_scale = torch.gather(scales, 0, index).squeeze(0)
            self.w_zp = torch.gather(zps, 0, index).squeeze(0).to(self.w_scale.dtype)
        return index.squeeze(0)

    def _column_groups(self, k: int) -> list[slice]:
        """Slices of k weight candidates whose output columns (at least ``GEMM_MIN_COLUMNS``) fill about a block."""
        rows = self.x[: self.s.batch_size].numel() // self.in_features
        per = max(1, -(-GEMM_MIN_COLUMNS // self.out_features), self.block_bytes // (4 * rows * self.out_features))
        return [slice(g, min(k, g + per)) for g in range(0, k, per)]

    def _weight_errors(self, x: torch.Tensor, w: torch.Tensor, raw: torch.Tensor, s: torch.Tensor,
                       z: torch.Tensor) -> torch.Tensor:
        """(batch, k, n_v, rows) official errors of k weight candidates (the official's output means over tokens, not
        yet negated): the official F.linear of all candidates' rows at once is an addmm over their output columns,
        here run on a few candidates' columns at a time (each column the same dot product plus bias, checked bit
        for bit), so that their output and error stay in cache; the mean over tokens is per column."""
        k = s.shape[0]
        w_sim = affine_into(self.work.get("w", (k, *w.shape[1:]), w), w, s, z, 2 * self.w_n - 1)
        out = self._linear(x, w_sim.view(-1, self.in_features), self.bias.repeat(k) if self.bias is not None else None)
        error = squared_error_(out.view(*out.shape[:-1], k, self.n_v, -1), raw)
        if error.ndim > 4:
            return torch.mean(error, dim=list(range(1, error.ndim - 3)))
        return error.clone()  # a view of the reused output buffer

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` into a reused buffer: for a contiguous x F.linear runs this addmm (mm without
        a bias) on x flattened to rows, so the values are the same."""
        if not x.is_contiguous():
            return F.linear(x, weight, bias)
        flat = x.view(-1, x.shape[-1])
        out = self.work.get("out", (flat.shape[0], weight.shape[0]), x)
        if bias is None:
            torch.mm(flat, weight.t(), out=out)
        else:
            torch.addmm(bias, flat, weight.t(), out=out)
        return out.view(*x.shape[:-1], weight.shape[0])

    def _input_scores(self, x: torch.Tensor, candidates: Callable[[torch.Tensor], torch.Tensor], k: int,
                      w_sim: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """(1, k) summed official scores of k candidate quantizations of the input ``x`` against the output ``raw``.

        ``candidates(rows)`` gives rows of x quantized under each candidate, (n, C, k). The official F.linear of the
        candidates' (..., k, C) view runs one matmul per row (k × C times C × out), then the bias: here the same
        bmm, rows at a time, so that each block's candidates, outputs and errors stay in cache; the per-row means
        over the output features are reduced further as the official (..., k) scores."""
        features = x.shape[-1]
        flat_x, flat_raw, w_t = x.reshape(-1, features), raw.reshape(-1, 1, raw.shape[-1]), w_sim.t()
        rows = flat_x.shape[0]
        error = self.work.get("row_error", (rows, k), x)
        step = max(1, self.block_bytes // (4 * k * max(features, w_t.shape[1])))
        for start in range(0, rows, step):
            block = slice(start, min(rows, start + step))
            n = block.stop - block.start
            out = torch.bmm(candidates(flat_x[block]).transpose(1, 2), w_t.expand(n, *w_t.shape),
                            out=self.work.get("out", (n, k, w_t.shape[1]), x))
            if self.bias is not None:
                out.add_(self.bias)
            torch.mean(squared_error_(out, flat_raw[block]), dim=-1, out=error[block])
        sim = error.view(*x.shape[:-1], k).neg_()
        if sim.ndim > 2:
            sim = torch.mean(sim, dim=list(range(1, sim.ndim - 1)))
        return torch.sum(sim, dim=0, keepdim=True)

    def a_self(self, scales: torch.Tensor, zps: torch.Tensor, topk: int = 1) -> torch.Tensor:
        """``_search_best_a_scale_self``: the input's own quantization error (per channel or per tensor)."""
        batch_sims = []
        for b in self.batches(self.x.shape[0]):
            x = self.x[b]
            raw = x.unsqueeze(-1)
            sims = []
            for c in self.chunks():
                s, z = scales[:, c], zps[:, c]
                x_sim = affine_into(self.work.get("x", (*x.shape, s.shape[-1]), x), raw, s, z, 2 * self.a_n - 1)
                error = squared_error_(x_sim, raw)
                if error.ndim > 3:
                    error = torch.mean(error, dim=list(range(1, error.ndim - 2)))
                if not self.channel_wise:
                    error = torch.mean(error, dim=1, keepdim=True)
                sims.append(torch.sum(error, dim=0, keepdim=True).neg_())
            batch_sims.append(torch.cat(sims, dim=-1))
        total = torch.cat(batch_sims, dim=0).sum(dim=0, keepdim=False)
        _, index = torch.topk(total, k=topk, dim=-1)
        if topk == 1:
            self.a_scale = torch.gather(scales, -1, index).squeeze(-1)
            self.a_zp = torch.gather(zps, -1, index).squeeze(-1).to(self.a_scale.dtype)
        return index

    def a_out(self, scales: torch.Tensor, zps: torch.Tensor, topk: int = 1) -> torch.Tensor:
        """:meth:`_a_out`, a repeat answered from the record."""
        return self._recorded(self._a_out, "a_out", ("w_scale", "w_zp"), ("a_scale", "a_zp"), (scales, zps), topk)

    def _a_out(self, scales: torch.Tensor, zps: torch.Tensor, topk: int) -> torch.Tensor:
        """``_search_best_a_scale``: the layer output with the current weight quantizer (per-tensor input)."""
        batch_sims = []
        for b in self.batches(self.x.shape[0]):
            x = self.x[b]
            w_sim = self.quant_weight()
            sims = []
            for c in self.chunks():
                s, z = scales[:, c], zps[:, c]
                k = s.shape[-1]

                def candidates(rows: torch.Tensor) -> torch.Tensor:
                    return affine_into(self.work.get("x", (*rows.shape, k), rows), rows.unsqueeze(-1), s, z, 2 * self.a_n - 1)

                sims.append(self._input_scores(x, candidates, k, w_sim, self.out[b]))
            batch_sims.append(torch.cat(sims, dim=1))
        total = torch.cat(batch_sims, dim=0).sum(dim=0, keepdim=True)
        _, index = torch.topk(total, k=topk, dim=-1)
        if topk == 1:
            self.a_scale = torch.gather(scales, -1, index).squeeze(-1)
            self.a_zp = torch.gather(zps, -1, index).squeeze(-1).to(self.a_scale.dtype)
        return index

    # -------------------------------------------------------------------------------- recipes
    def search(self) -> None:
        """``AsymmetricallyBatchingQuantLinear.hyperparameter_searching``."""
        self._start_recording()
        self._init_chunks()
        if self.s.fpcs:
            self.fpcs(self.weight_candidates(), self.w_self, dim=0)
            self.fpcs(self.input_candidates(), self.a_self, dim=-1)
        else:
            w_c, a_c = self.weight_candidates(), self.input_candidates()
            self.w_self(*w_c)
            self.a_self(*a_c)
        for _ in range(self.s.search_round):
            if self.s.fpcs:
                self.fpcs(self.weight_candidates(), self.w_out, dim=0)
                self.fpcs(self.input_candidates(), self.a_out, dim=-1)
            else:
                self.w_out(*w_c)
                self.a_out(*a_c)

    def search_channel_wise(self) -> None:
        """``AsymmetricallyChannelWiseBatchingQuantLinear.hyperparameter_searching``: per-channel input only."""
        self._init_chunks()
        if self.s.fpcs:
            self.fpcs(self.input_candidates(), self.a_self, dim=-1)
        else:
            self.a_self(*self.input_candidates())

    def reparameterized(self, weight: torch.Tensor, bias: Optional[torch.Tensor], ratio: torch.Tensor,
                        shift: torch.Tensor, target_scale: torch.Tensor, target_zp: torch.Tensor) -> None:
        """``reparam``: the new weight/bias, the input mapped to x/r - b, a per-tensor input grid; then the plain
        search (:meth:`search`) runs on these."""
        self.weight, self.bias = weight, bias
        self.x = self.x / ratio - shift
        self.channel_wise = False
        self.a_scale, self.a_zp = target_scale.reshape(1), target_zp.reshape(1)


class PostGeluSearch(LinearSearch):
    """fc2 with the shifted AdaLog input (``PostGeluLogBasedBatchingQuantLinear``); ``q`` is the log base."""

    input_parameters = ("a_scale", "q")  # the shift η is fixed

    def __init__(self, *args, shift: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dev = self.weight.device
        self.shift = torch.tensor([shift], dtype=torch.float32, device=dev)
        self.a_scale = torch.zeros(1, device=dev)
        self.q = torch.tensor([self.s.r], device=dev)
        self.r = float(self.s.r)
        self.table = search_table(self.a_bits, self.s.r, dev)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """``ShiftAdaLogQuantizer.forward`` before the bias fold: AdaLog(x + η) - η with the evaluation tables."""
        t1, t2 = (t.to(x.device) for t in adalog_tables(self.a_bits, int(self.q.item()), self.r))
        return adalog_dequant(x + self.shift, self.a_scale, self.q, self.r, self.a_bits, t1, t2) - self.shift

    def input_candidates(self, l: float = 0.9, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        pct = torch.tensor([l, r], device=self.x.device)
        bc = self.x.shape[0]
        while True:
            try:
                cands = positive_percentile(self.x[:bc].reshape(-1), pct) + self.shift.item()
                break
            except RuntimeError:
                bc = bc // 2
        cands = cands.unsqueeze(0)
        steps = torch.tensor([i / (self.eq_n - 1) for i in range(self.eq_n)], device=self.x.device).view(1, -1)
        return cands, cands[:, 0:1] + (cands[:, 1:] - cands[:, 0:1]) * steps

    def _log_scores(self, scales: torch.Tensor, qs: torch.Tensor, topk: int) -> torch.Tensor:
        """Shared body of ``_search_best_log_base`` and ``_search_best_scale_logbase``: (1, k) scale and q stacks."""
        batch_sims = []
        for b in self.batches(self.x.shape[0]):
            shifted = self.x[b] + self.shift
            w_sim = self.quant_weight()
            sims = []
            for c in self.chunks():
                cur_s, cur_q = (scales[:, c] if scales.shape[-1] > 1 else scales).reshape(-1), qs[:, c].reshape(-1)
                sims.append(self._input_scores(shifted, self._log_candidates(cur_s, cur_q), cur_q.numel(), w_sim, self.out[b]))
            batch_sims.append(torch.cat(sims, dim=1))
        total = torch.cat(batch_sims, dim=0).sum(dim=0, keepdim=True)
        _, index = torch.topk(total, k=topk, dim=-1)
        return index

    def _log_candidates(self, scales: torch.Tensor, qs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Rows of x + η (n, C) → (n, C, k): AdaLog(x + η) - η under k (s, q) candidates (one s or k), as the official
        search computes it: codes round(-log2(clamp((x + η)/s, 1e-15, 1))·r/q), here as (log2(...)·r)/(-q) (negation
        is exact), taken once per distinct s (FPCS survivors share scales), looked up in per-candidate tables of
        level·s - η (the official value·s - η, the same two roundings per level)."""
        k = qs.numel()
        distinct, inverse = torch.unique(scales, return_inverse=True)
        shared = 1 < distinct.numel() < scales.numel()
        grid = distinct if shared else scales
        neg_q = qs.to(scales.dtype).neg()
        levels = code_levels(qs, self.a_bits, self.r, self.table).mul_(scales.view(-1, 1)).sub_(self.shift)

        def candidates(shifted: torch.Tensor) -> torch.Tensor:
            logs = self.work.get("logs", (*shifted.shape, grid.numel()), shifted)
            torch.div(shifted.unsqueeze(-1), grid, out=logs).clamp_(min=LOG_FLOOR, max=1.0).log2_().mul_(self.r)
            codes = self.work.get("codes", (*shifted.shape, k), shifted)
            if shared:
                torch.index_select(logs.view(-1, grid.numel()), 1, inverse, out=codes.view(-1, k)).div_(neg_q).round_()
            else:
                torch.div(logs, neg_q, out=codes).round_()
            return dequant_codes(codes, levels, self.work, dim=-1)

        return candidates

    def log_base(self, qs: torch.Tensor, topk: int) -> torch.Tensor:
        """``_search_best_log_base`` (:meth:`_log_base`), a repeat answered from the record."""
        return self._recorded(self._log_base, "log_base", ("a_scale", "w_scale", "w_zp"), ("q",), (qs,), topk)

    def _log_base(self, qs: torch.Tensor, topk: int) -> torch.Tensor:
        index = self._log_scores(self.a_scale, qs, topk)
        if topk == 1:
            self.q = torch.gather(qs, -1, index).view(1)
        return index

    def scale_log_base(self, scales: torch.Tensor, qs: torch.Tensor, topk: int) -> torch.Tensor:
        """``_search_best_scale_logbase`` (:meth:`_scale_log_base`), a repeat answered from the record."""
        return self._recorded(self._scale_log_base, "scale_log_base", ("w_scale", "w_zp"), ("a_scale", "q"), (scales, qs), topk)

    def _scale_log_base(self, scales: torch.Tensor, qs: torch.Tensor, topk: int) -> torch.Tensor:
        index = self._log_scores(scales, qs, topk)
        if topk == 1:
            self.a_scale = torch.gather(scales, -1, index).squeeze(-1)
            self.q = torch.gather(qs, -1, index).view(1)
        return index

    def activation_fpcs(self, bounds: torch.Tensor, base_num: int = 8, scale_num: int = 16, width: int = 32) -> None:
        """``PostGeluLogBasedBatchingQuantLinear.activation_fpcs``: the best ``base_num`` q, a joint (s, q) grid,
        then FPCS on s."""
        dev = self.x.device
        new_cnt = int(self.eq_n / width)
        qs = torch.tensor([i for i in range(10, 11 + self.eq_n)], device=dev).view(1, -1)
        q_index = self.log_base(qs, topk=base_num)
        fractions = torch.tensor([i / (scale_num - 1) for i in range(scale_num)], device=dev).view(1, -1)
        scales = bounds[:, 0:1] + (bounds[:, 1:] - bounds[:, 0:1]) * fractions
        delta = scales[:, 1:2] - scales[:, 0:1]
        scales = scales.repeat(1, base_num)
        qs = torch.gather(qs, -1, q_index).repeat_interleave(scale_num, dim=-1)
        index = self.scale_log_base(scales, qs, topk=width)
        top_s, top_q = torch.gather(scales, -1, index), torch.gather(qs, -1, index)
        remain = self.s.steps - 1
        while remain > 0:
            offsets = (torch.linspace(0, 1, steps=new_cnt, device=dev)[None, :] - 0.5) * delta
            delta = delta / (new_cnt - 0.5)
            scales = (top_s.unsqueeze(-1) + offsets.unsqueeze(-2)).reshape(*scales.shape[:-1], -1)
            qs = top_q.repeat_interleave(new_cnt, dim=-1)
            index = self.scale_log_base(scales, qs, topk=1 if remain == 1 else width)
            if remain > 1:
                top_s, top_q = torch.gather(scales, -1, index), torch.gather(qs, -1, index)
            remain -= 1

    def search(self) -> None:
        """``PostGeluLogBasedBatchingQuantLinear.hyperparameter_searching`` (fpcs)."""
        if not self.s.fpcs:
            raise NotImplementedError("AdaLog's post-GELU search is implemented with FPCS only (configs: fpcs=True)")
        self._start_recording()
        self._init_chunks()
        self.fpcs(self.weight_candidates(), self.w_self, dim=0)
        bounds, scales = self.input_candidates()
        self.a_scale = scales[:, -2].clone()
        for _ in range(self.s.search_round):
            self.activation_fpcs(bounds)
            self.fpcs(self.weight_candidates(), self.w_out, dim=0)


# ---------------------------------------------------------------------------------------------------- matmul


class MatMulSearch(_Searcher):
    """A·B with per-head (dim 1) uniform grids on both operands, or an AdaLog post-Softmax A (``post_softmax``)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, a_bits: int, b_bits: int,
                 settings: SearchSettings, post_softmax: bool = False) -> None:
        super().__init__(settings)
        self.a, self.b, self.out = a, b, out
        self.heads = a.shape[1]
        self.a_n, self.b_n = 2 ** (a_bits - 1), 2 ** (b_bits - 1)
        self.a_bits = a_bits
        self.post_softmax = post_softmax
        #: A's quantizer parameters (what the searches of B depend on besides the data)
        self.a_parameters = ("q",) if post_softmax else ("a_scale", "a_zp")
        shape = (1, self.heads, 1, 1)
        dev = a.device
        self.a_scale, self.a_zp = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
        self.b_scale, self.b_zp = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
        if post_softmax:
            self.r = float(settings.r)
            self.q = torch.tensor([settings.r], device=dev)
            self.table = search_table(a_bits, settings.r, dev)
        n = a.shape[0]
        numel = 4 * a[:n].numel() + 4 * b[:n].numel() + 8 * out[: settings.batch_size].numel()
        self.par = parallel_eq_n(self.eq_n, numel, settings.memory_bytes)

    def quant_a(self, a: torch.Tensor) -> torch.Tensor:
        if self.post_softmax:  # AdaLogQuantizer.forward with s = 1 and the evaluation tables of the current q
            t1, t2 = (t.to(a.device) for t in adalog_tables(self.a_bits, int(self.q.item()), self.r))
            return adalog_dequant(a, torch.ones(1, 1, 1, 1, device=a.device), self.q, self.r, self.a_bits, t1, t2)
        return affine(a, self.a_scale, self.a_zp, 2 * self.a_n - 1)

    def quant_b(self, b: torch.Tensor) -> torch.Tensor:
        return affine(b, self.b_scale, self.b_zp, 2 * self.b_n - 1)

    def candidates(self, x: torch.Tensor, l: float = 0.9, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``calculate_percentile_candidates``: per-head percentile ranges (the B operand's bit-width for both)."""
        num_zp = min(16, self.b_n)
        num_scale = int(self.eq_n / num_zp)
        pct = torch.tensor([l, r])
        per_head = x.transpose(0, 1).contiguous()
        uppers = quantile_mean(per_head, pct, rows_first=True)
        lowers = quantile_mean(per_head, 1 - pct, rows_first=True)
        delta_min = (uppers[0] - lowers[0]).view(1, 1, -1, 1, 1)
        delta_max = (uppers[1] - lowers[1]).view(1, 1, -1, 1, 1)
        splits = torch.linspace(0, 1, steps=num_scale, device=x.device)[:, None, None, None, None] * (delta_max - delta_min)
        scales = (delta_min + splits).repeat(num_zp, 1, 1, 1, 1) / (2 * self.b_n - 1)
        zp_min, zp_max = int(self.b_n - num_zp / 2), int(self.b_n + num_zp / 2)
        zps = torch.tensor(range(zp_min, zp_max), device=x.device).repeat_interleave(num_scale)[:, None, None, None, None]
        return scales, zps.repeat(1, *scales.shape[1:])

    def _uniform_scores(self, scales: torch.Tensor, zps: torch.Tensor, topk: int, operand: str) -> torch.Tensor:
        batch_sims = []
        for bs in self.batches(self.a.shape[0]):
            a, b = self.a[bs], self.b[bs]
            fixed = self.quant_b(b) if operand == "a" else self.quant_a(a)
            x = a if operand == "a" else b
            qmax = 2 * (self.a_n if operand == "a" else self.b_n) - 1
            sims = [self._operand_scores(x, fixed, self.out[bs], scales[c], zps[c], qmax, operand) for c in self.chunks()]
            batch_sims.append(torch.cat(sims, 0))
        total = torch.cat(batch_sims, dim=1).sum(dim=1, keepdim=False)
        index = self.best(total, topk, 0).view(topk, 1, -1, 1, 1)
        if topk == 1:
            scale = torch.gather(scales, 0, index).view(1, self.heads, 1, 1)
            zp = torch.gather(zps, 0, index).view(1, self.heads, 1, 1).to(scale.dtype)
            if operand == "a":
                self.a_scale, self.a_zp = scale, zp
            else:
                self.b_scale, self.b_zp = scale, zp
        return index

    #: bytes of one block's candidate products (a (batch, head) pair's few candidates: stays in cache through the error)
    block_bytes = 2**21

    def _operand_scores(self, x: torch.Tensor, fixed: torch.Tensor, raw: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                        qmax: int, operand: str) -> torch.Tensor:
        """(k, 1, heads) official scores of k per-head grids (s, z: k × heads values) of one operand ``x`` (batch,
        heads, rows, cols), the other operand ``fixed`` (``_search_best_A_scale``/``_search_best_B_scale``).

        The official broadcast matmul runs one small bmm per candidate, batch and head, on a copy of the fixed
        operand expanded k times; here the candidates are stacked along A's rows (candidates of A, Kᵀ zero-padded)
        or B's columns (candidates of B) of one bmm: the same dot products (checked bit for bit), no copy. It runs one
        (batch, head) pair and a few candidates at a time, so that each block's quantized operand, product and error
        stay in cache; the error is reduced per candidate over the output matrix as in the official (k, batch, heads,
        ...) layout."""
        k, (batch, heads) = s.shape[0], x.shape[:2]
        s, z = s.reshape(k, heads), z.reshape(k, heads)
        rows, cols = (x.shape[2], fixed.shape[-1]) if operand == "a" else (fixed.shape[2], x.shape[-1])
        padded = -(-cols // GEMM_COLUMNS) * GEMM_COLUMNS if operand == "a" else cols
        if operand == "a":
            right = self.work.get("fixed", (batch, heads, fixed.shape[2], padded), x).zero_()
            right[..., :cols] = fixed
        per = max(1, self.block_bytes // (4 * rows * padded))
        means = self.work.get("means", (batch, heads, k), x)
        for b in range(batch):
            for h in range(heads):
                for g in range(0, k, per):
                    c = slice(g, min(k, g + per))
                    if operand == "a":
                        error = self._a_block(x[b, h], right[b, h], raw[b, h], s[c, h], z[c, h], qmax, cols)
                    else:
                        error = self._b_block(x[b, h], fixed[b, h], raw[b, h], s[c, h], z[c, h], qmax)
                    torch.mean(error, dim=[1, 2], out=means[b, h, c])
        return means.permute(2, 0, 1).contiguous().neg_().sum(dim=1, keepdim=True)

    def _a_block(self, x: torch.Tensor, right: torch.Tensor, raw: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                 qmax: int, cols: int) -> torch.Tensor:
        """(n, rows, cols) squared errors of n candidates of A (x: (rows, d)) against ``raw`` times the padded ``right``."""
        n = s.shape[0]
        x_sim = affine_into(self.work.get("x", (n, *x.shape), x), x, s.view(n, 1, 1), z.view(n, 1, 1), qmax)
        out = torch.bmm(x_sim.view(1, -1, x.shape[-1]), right.unsqueeze(0),
                        out=self.work.get("out", (1, n * x.shape[0], right.shape[-1]), x))
        error = self.work.get("error", (n, x.shape[0], cols), x)
        return torch.ops.aten.mse_loss.out(out.view(n, x.shape[0], -1)[..., :cols], raw, 0, out=error)

    def _b_block(self, x: torch.Tensor, fixed: torch.Tensor, raw: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                 qmax: int) -> torch.Tensor:
        """(n, rows, cols) squared errors of n candidates of B (x: (d, cols)) against ``raw``, ``fixed`` times them."""
        n, (d, cols) = s.shape[0], x.shape
        x_sim = affine_into(self.work.get("x", (d, n, cols), x), x.unsqueeze(1), s.view(1, n, 1), z.view(1, n, 1), qmax)
        out = torch.bmm(fixed.unsqueeze(0), x_sim.view(1, d, n * cols), out=self.work.get("out", (1, fixed.shape[0], n * cols), x))
        error = self.work.get("error", (n, fixed.shape[0], cols), x)
        torch.ops.aten.mse_loss.out(out.view(fixed.shape[0], n, cols), raw.unsqueeze(1), 0, out=error.permute(1, 0, 2))
        return error

    def a_scores(self, scales: torch.Tensor, zps: torch.Tensor, topk: int = 1) -> torch.Tensor:
        """``_search_best_A_scale``, a repeat answered from the record."""
        return self._recorded(lambda s, z, k: self._uniform_scores(s, z, k, "a"), "a_scores", ("b_scale", "b_zp"),
                              ("a_scale", "a_zp"), (scales, zps), topk)

    def b_scores(self, scales: torch.Tensor, zps: torch.Tensor, topk: int = 1) -> torch.Tensor:
        """``_search_best_B_scale``, a repeat answered from the record."""
        return self._recorded(lambda s, z, k: self._uniform_scores(s, z, k, "b"), "b_scores", self.a_parameters,
                              ("b_scale", "b_zp"), (scales, zps), topk)

    def a_log_base(self) -> None:
        """``_search_best_A_log_base``: q = 10..10+eq_n-1 on the post-Softmax map (s = 1), one q per tensor."""
        qs = torch.tensor([i for i in range(10, 11 + self.eq_n)], device=self.a.device).view(-1, 1, 1, 1, 1)
        batch_sims = []
        for bs in self.batches(self.a.shape[0]):
            a, b = self.a[bs], self.b[bs]
            b_sim = self.quant_b(b).unsqueeze(0)
            raw = self.out[bs].unsqueeze(0)
            logs = a.squeeze(0).log2().mul_(self.r)
            sims = []
            for c in self.chunks():
                cur_q = qs[c]
                codes = torch.div(logs, cur_q.to(logs.dtype).neg(), out=self.work.get("codes", (cur_q.shape[0], *logs.shape), a))
                a_sim = dequant_codes(codes.round_(), code_levels(cur_q, self.a_bits, self.r, self.table), self.work, dim=0)
                out = a_sim @ b_sim
                sim = torch.mean(squared_error_(out, raw), dim=list(range(2, out.ndim)))
                sims.append(sim.sum(dim=1, keepdim=True).neg_())
            batch_sims.append(torch.cat(sims, 0))
        total = torch.cat(batch_sims, dim=1).sum(dim=1, keepdim=True)
        _, index = torch.topk(total, k=1, dim=0)
        self.q = torch.gather(qs, 0, index.view(1, 1, 1, 1, 1)).view(1)

    def search(self) -> None:
        """``hyperparameter_searching`` of the two official matmul classes (fpcs)."""
        if not self.s.fpcs:
            raise NotImplementedError("AdaLog's matmul search is implemented with FPCS only (configs: fpcs=True)")
        self._start_recording()
        b_c, b_z = self.candidates(self.b)
        self.b_scale, self.b_zp = b_c[-2].view(1, self.heads, 1, 1), b_z[-2].view(1, self.heads, 1, 1).float()
        if self.post_softmax:
            for _ in range(self.s.search_round):
                self.a_log_base()
                self.fpcs(self.candidates(self.b), self.b_scores, dim=0)
            return
        a_c, a_z = self.candidates(self.a)
        self.a_scale, self.a_zp = a_c[-2].view(1, self.heads, 1, 1), a_z[-2].view(1, self.heads, 1, 1).float()
        for _ in range(self.s.search_round):
            self.fpcs(self.candidates(self.a), self.a_scores, dim=0)
            self.fpcs(self.candidates(self.b), self.b_scores, dim=0)


# ---------------------------------------------------------------------------------------------------- conv


class ConvSearch(_Searcher):
    """The patch-embedding conv: per-output-channel weight grid searched on the output; the input stays FP."""

    def __init__(self, conv: torch.nn.Conv2d, x: torch.Tensor, out: torch.Tensor, w_bits: int, settings: SearchSettings) -> None:
        super().__init__(settings)
        self.conv, self.x, self.out = conv, x, out
        self.weight = conv.weight.detach()
        self.bias = conv.bias.detach() if conv.bias is not None else None
        self.w_n = 2 ** (w_bits - 1)
        self.oc = self.weight.shape[0]
        b = settings.batch_size
        self.par = parallel_eq_n(self.eq_n, 2 * x[:b].numel() + 2 * out[:b].numel(), settings.memory_bytes)

    def weight_candidates(self, l: float = 0.9, r: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        num_zp = self.w_n
        num_scale = int(self.eq_n / num_zp)
        pct = torch.tensor([l, r])
        w = self.weight.view(self.oc, -1)
        uppers = torch.quantile(w, pct.to(w.device), dim=-1).unsqueeze(-1)
        lowers = torch.quantile(w, (1 - pct).to(w.device), dim=-1).unsqueeze(-1)
        delta_min = uppers[0:1] - lowers[0:1]
        delta_max = uppers[1:] - lowers[1:]
        splits = torch.linspace(0, 1, steps=num_scale, device=w.device)[:, None, None] * (delta_max - delta_min)
        scales = (delta_min + splits).repeat(num_zp, 1, 1) / (2 * self.w_n - 1)
        zp_min, zp_max = int(self.w_n - num_zp / 2), int(self.w_n + num_zp / 2)
        zps = torch.tensor(range(zp_min, zp_max), device=w.device).repeat_interleave(num_scale)[:, None, None]
        return scales, zps.repeat(1, self.oc, 1)

    def w_out(self, scales: torch.Tensor, zps: torch.Tensor, topk: int = 1) -> torch.Tensor:
        batch_sims = []
        oc, ic, kh, kw = self.weight.shape
        for bs in self.batches(self.x.shape[0]):
            x = self.x[bs]
            raw = self.out[bs].unsqueeze(1)
            sims = []
            for c in self.chunks():
                s, z = scales[c], zps[c]
                k = s.shape[0]
                w = self.weight.view(oc, -1).unsqueeze(0)
                w_sim = affine_into(self.work.get("w", (k, oc, w.shape[-1]), w), w, s, z, 2 * self.w_n - 1)
                b_sim = self.bias.repeat(k) if self.bias is not None else None
                out = F.conv2d(x, w_sim.view(-1, ic, kh, kw), b_sim, self.conv.stride, self.conv.padding, self.conv.dilation,
                               self.conv.groups)
                # the official cat of the k output-channel chunks along a new dim 1 is this view, value for value
                error = squared_error_(out.view(out.shape[0], k, oc, *out.shape[2:]), raw)
                sims.append(torch.sum(torch.mean(error, [3, 4]), dim=0, keepdim=True).neg_())
            batch_sims.append(torch.cat(sims, dim=1))
        total = torch.cat(batch_sims, dim=0).sum(dim=0, keepdim=False)
        index = self.best(total, topk, 0).view(topk, -1, 1)
        if topk == 1:
            self.w_scale = torch.gather(scales, 0, index).squeeze(0)
            self.w_zp = torch.gather(zps, 0, index).squeeze(0).to(self.w_scale.dtype)
        return index

    def search(self) -> None:
        """``AsymmetricallyBatchingQuantConv2d.hyperparameter_searching`` at qconv_a_bit = 8: one FPCS round."""
        scales, zps = self.weight_candidates()
        self.w_scale, self.w_zp = scales[-2], zps[-2].float()
        if self.s.fpcs:
            self.fpcs(self.weight_candidates(), self.w_out, dim=0)
        else:
            self.w_out(scales, zps)
