"""ERQ (Zhong et al., ICML 2024 "ERQ: Error Reduction for Post-Training Quantization of Vision Transformers";
TPAMI 2025 extension): RepQ-ViT's quantizers and reparameterization, then per layer activation-error reduction
(Aqer) and weight-error reduction (Wqer) by closed-form ridge regressions (:mod:`ptq_bench.transforms.ridge`).

Recipe as the official code runs it (zysxmu/ERQ @ 2f5b4ce test_quant_expand.py ``main``; quant/quant_model.py):

1. quantizers: RepQ-ViT's table (:func:`ptq_bench.methods.repq_vit.repq_placement`) except that the
   patch-embedding input is not quantized (ERQ's QuantConv2d has no input quantizer), weights search ERQ's ten
   percentiles (``erq_weight`` observer), qkv/fc1 weights get two grids per row (``erq_two_part``) and Swin's
   patch-merging reduction input is per tensor, left out of the reparameterization (only qkv/fc1 inputs are per
   channel in quant_model.py; ``reparameterization`` edits norm1/norm2 only);
2. activation quantizers calibrate on the first ``act_calib_size`` images with the weights in FP
   (``set_quant_state(input_quant=True, weight_quant=False)``; ``calib_data[:32]``);
3. RepQ-ViT's LayerNorm→Linear scale reparameterization (norm1→qkv, norm2→fc1);
4. one FP forward of all calibration images; for each Linear, with its quantized FP input x̄ and FP output:
   Aqer (λ = 0.1·coe; 0.1 for the head, whose input is 2-D), then its weight quantizer calibrates on the updated
   weight, then Wqer (λ = 0.1·coe, rounding refinement of ``refine_steps`` flips, rows in blocks of ``row_block``);
   the patch-embedding conv gets no Aqer and a Wqer on its im2col input without refinement (λ = coe).
   Each layer's update depends only on its own FP input and output, so it runs as the forward reaches it (a layer
   called more than once per forward, e.g. a detector head shared by the FPN levels, on the rows of all its calls,
   after the pass: the official code, classification only, has no such layer);
5. the final weights are quantized once more by their weight quantizers at inference (the official
   ``set_quant_state(True, True)`` after Wqer); biases stay FP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.architectures import architecture_for
from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.methods.repq_vit import per_tensor_reductions_, repq_placement
from ptq_bench.models import calibrating, quantizers_off
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.erq import TwoPartWeightQuantizer, fake_quantize
from ptq_bench.quant.layers import QuantConv2d, QuantLinear
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms import mean_target, reparameterize_layernorm_
from ptq_bench.transforms.invariants import keeps_fp_function
from ptq_bench.transforms.reparam import folded_pairs
from ptq_bench.transforms.ridge import Grid, activation_error_ridge, progressive_quantize, with_ones

#: Aqer's λ for a Linear with a 2-D input (the classifier head), hard-coded in ``replace_W``
HEAD_AQER_LAMBDA = 0.1


@dataclass(frozen=True)
class ERQOptions:
    coe: int  # official --coe: λ = 0.1·coe (Linears), coe (patch-embedding conv)
    act_calib_size: int  # images the activation quantizers calibrate on (calib_data[:32])
    two_part_weights: bool  # qkv and fc1 weights on erq_two_part (quant_model.py)
    refine_steps: int  # Wqer rounding refinement: greedy flips per row block and round (0: plain rounding)
    row_block: int  # Wqer processes output rows in blocks of this size (500; swin_base 100 in the official code)


@METHODS.register("erq")
class ERQ(Method):
    name = "erq"
    Options = ERQOptions
    #: 1 (2026-12-05): a Swin patch-merging reduction's input per tensor and outside the LayerNorm fold, as the
    #: official code has it (timm Swin and the mmdet detectors' backbones); results before it differ
    revision = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        o: ERQOptions = self.options
        if o.coe <= 0 or o.act_calib_size < 1 or o.refine_steps < 0 or o.row_block < 1:
            raise ConfigError(f"erq: coe must be > 0, act_calib_size and row_block >= 1, refine_steps >= 0 (got {o})")
        weight = self.quantizer_table()["weight"]
        if weight is None or weight.name != "uniform":
            raise ConfigError("erq: Wqer rounds on a uniform weight grid (method.quantizers.weight must be 'uniform')")

    def needs(self) -> frozenset[str]:
        return frozenset({"layernorm_pairs"})

    def placement(self) -> dict[str, QuantizerSpec | None]:
        table = repq_placement("log_sqrt2")
        table["weight"] = QuantizerSpec("uniform", "w", {"granularity": "channel", "channel_dim": 0, "observer": "erq_weight"})
        table["patch_embed"] = None
        return table

    def foldable_roles(self) -> frozenset[str]:
        return frozenset({"post_layernorm"})

    @torch.no_grad()
    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        self.place_quantizers_(model)
        pairs = per_tensor_reductions_(model, self)  # the norm → Linear pairs to fold
        if self.options.two_part_weights:
            self._two_part_weights_(model)
        layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
        if any(isinstance(m, QuantConv2d) and (m.groups != 1 or m.dilation != (1, 1)) for m in layers):
            raise ConfigError("erq: Wqer unfolds plain convolutions only (groups 1, dilation 1)")
        weight_quantizers = [m.weight_quantizer for m in layers if m.weight_quantizer is not None]
        for quantizer in weight_quantizers:
            quantizer.enabled = False
        with calibrating(model):
            data.run(model, limit=self.options.act_calib_size)
        with keeps_fp_function(model, data, "RepQ-ViT LayerNorm→Linear reparameterization") as check:
            edited = reparameterize_layernorm_(model, mean_target, pairs=pairs)
        self.transforms.append(check.record(folded=folded_pairs(model, edited)))
        self._reduced: set[int] = set()
        self._pooled = {id(layer): [] for layer in _called_more_than_once(model, layers, data)}
        handles = [layer.register_forward_hook(self._reduce_errors_hook) for layer in layers]
        try:
            with quantizers_off(model):
                data.run(model)
        finally:
            for handle in handles:
                handle.remove()
        for layer in layers:
            if self._pooled.get(id(layer)):
                self._reduce_errors_(layer, *_concatenated(self._pooled.pop(id(layer))))
        for quantizer in weight_quantizers:
            quantizer.enabled = True
        return model

    def _two_part_weights_(self, model: nn.Module) -> None:
        """qkv and fc1 (the Linears after norm1 and norm2 in the blocks) get the two-part weight quantizer."""
        adapter = architecture_for(model)
        for name, block in adapter.blocks(model):
            for pair in adapter.block_pairs(name, block):
                for linear in pair.linears:
                    quantizer = QuantizerSpec("erq_two_part", "w").build(self.bits).to(linear.weight.device)
                    quantizer.role = "weight"
                    linear.weight_quantizer = quantizer
                    linear.refresh_weight()

    def _reduce_errors_hook(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        """Aqer and Wqer of ``layer`` from its first call (the official ``store_input[0]``); later calls pass. A layer
        the task calls several times per forward (a detector's head on each FPN level) pools the rows of every call
        and is reduced after the pass."""
        if id(layer) in self._reduced:
            return
        x = inputs[0]
        x_q = layer.input_quantizer.quantize(x) if layer.input_quantizer is not None else x
        rows = _input_rows(layer, x_q), output.reshape(-1, output.shape[-1]) if isinstance(layer, QuantLinear) else None
        if id(layer) in self._pooled:
            self._pooled[id(layer)].append((*rows, x_q.ndim == 2))
            return
        self._reduced.add(id(layer))
        self._reduce_errors_(layer, *rows, x_q.ndim == 2)

    def _reduce_errors_(self, layer: nn.Module, x_rows: torch.Tensor, y_rows: torch.Tensor | None, two_d: bool) -> None:
        """Aqer (Linears) and Wqer of ``layer`` from its quantized FP input rows and FP output rows (None: a conv)."""
        if isinstance(layer, QuantLinear):
            self._linear_(layer, x_rows, y_rows, two_d)
        else:
            self._conv_(layer, x_rows)
        layer.refresh_weight()

    def _linear_(self, layer: QuantLinear, x_flat: torch.Tensor, y_flat: torch.Tensor, two_d: bool) -> None:
        lam = 0.1 * self.options.coe
        aqer_lam = HEAD_AQER_LAMBDA if two_d else lam
        weight, bias = activation_error_ridge(layer.weight, layer.bias, x_flat, y_flat, aqer_lam)
        _fit(layer.weight_quantizer, weight)
        new_w, new_b = self._wqer(weight, bias, x_flat, layer.weight_quantizer, lam, self.options.refine_steps)
        layer.weight.data = weight.clone().copy_(new_w)  # the official ``w.copy_(new_w)`` keeps the weight's layout
        if bias is not None:
            layer.bias.data = new_b.squeeze()

    def _conv_(self, layer: QuantConv2d, cols: torch.Tensor) -> None:
        out = layer.weight.shape[0]
        _fit(layer.weight_quantizer, layer.weight)
        new_w, new_b = self._wqer(layer.weight.reshape(out, -1), layer.bias, cols, layer.weight_quantizer, 0.1 * self.options.coe * 10, 0)
        layer.weight.data = new_w.reshape(layer.weight.shape)
        if new_b is not None:
            layer.bias.data = new_b.squeeze()

    def _wqer(self, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, quantizer: Quantizer, lam: float,
              steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Wqer on a 2-D (out, in) weight with its input rows ``x``: the new weight and bias (None without one)."""
        if bias is None:
            return progressive_quantize(weight, x, _grid(quantizer), lam, self.options.row_block, steps), None
        wb = torch.cat((weight, bias.unsqueeze(1)), dim=1)
        new = progressive_quantize(wb, with_ones(x), _grid(quantizer), lam, self.options.row_block, steps)
        return torch.split(new, [new.shape[1] - 1, 1], dim=1)


def _input_rows(layer: nn.Module, x_q: torch.Tensor) -> torch.Tensor:
    """A Linear's input as rows of features; a conv's as its im2col rows (patches)."""
    if isinstance(layer, QuantLinear):
        return x_q.reshape(-1, x_q.shape[-1])
    kernel = layer.weight.shape[2]
    cols = F.unfold(x_q, kernel, stride=layer.stride[0], padding=layer.padding[0])
    return cols.transpose(1, 2).reshape(-1, layer.weight[0].numel())


def _called_more_than_once(model: nn.Module, layers: list[nn.Module], data: CalibrationData) -> list[nn.Module]:
    """The layers one forward of the first calibration sample calls more than once (none in a ViT; a detector's
    shared heads on every FPN level)."""
    calls: dict[int, int] = {}

    def count(layer: nn.Module, _inputs: Any, _output: Any) -> None:
        calls[id(layer)] = calls.get(id(layer), 0) + 1

    with quantizers_off(model):
        data.probe(model, [layer.register_forward_hook(count) for layer in layers])
    return [layer for layer in layers if calls.get(id(layer), 0) > 1]


def _concatenated(calls: list[tuple[torch.Tensor, torch.Tensor | None, bool]]) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The input and output rows of every call of a layer, stacked (the head λ rule from the first call)."""
    outputs = [y for _, y, _ in calls]
    return torch.cat([x for x, _, _ in calls]), None if outputs[0] is None else torch.cat(outputs), calls[0][2]


def _fit(quantizer: Quantizer, weight: torch.Tensor) -> None:
    """Calibrate ``quantizer`` on ``weight`` (the official re-calibration pass fits only the weight quantizers)."""
    quantizer.calibrate(weight.detach())
    quantizer.calibrated = True
    quantizer.params_changed()


def _grid(quantizer: Quantizer) -> Grid:
    """The weight quantizer's grid on (out, cols) values, with a given rounding."""
    if isinstance(quantizer, TwoPartWeightQuantizer):
        return quantizer.quantize_with
    if not isinstance(quantizer, UniformQuantizer) or quantizer.granularity == "token":
        raise ConfigError(f"erq: Wqer needs a calibrated uniform weight grid, got {type(quantizer).__name__}")
    scale, zero_point = quantizer.scale.reshape(-1, 1), quantizer.zero_point.reshape(-1, 1)
    return lambda values, rounding: fake_quantize(values, scale, zero_point, quantizer.qmin, quantizer.qmax, rounding)
