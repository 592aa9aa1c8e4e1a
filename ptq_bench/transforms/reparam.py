"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT, arXiv 2212.08254, Sec. 4.2).

A LayerNorm output quantized per channel with scales s and zero points z is turned into one quantized per tensor
with (s̃, z̃) by rescaling and shifting each channel, and folding the inverse change into the next Linear:

    r = s / s̃,   b = (-z·s) / r - (-z̃·s̃)
    LayerNorm:   γ ← γ / r,          β ← β / r - b
    next Linear: W ← W · r (columns),   bias ← bias + W·b  (with the updated W)

so the FP function is unchanged and, on the new per-tensor grid, each channel keeps its own step size. How
(s̃, z̃) is chosen is a pluggable ``target_fn(scales, zero_points)``: RepQ-ViT takes the channel means
(:func:`mean_target`); DopQ-ViT plugs its MOSF rule in. Follows zkkli/RepQ-ViT classification/test_quant.py
("Scale reparameterization" block), operation for operation, so the folded weights match the official ones bit
for bit; like the official code, z̃ is *not* rounded (the mean of integer zero points).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ptq_bench.architectures import NormLinearPair
from ptq_bench.models.prepare import layernorm_linear_pairs
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.layers import QuantLinear

TargetFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mean_target(scales: torch.Tensor, zero_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's target: the mean channel scale and the mean channel zero point."""
    return scales.mean(), zero_points.mean()


def channel_transform(
    scales: torch.Tensor, zero_points: torch.Tensor, target_scale: torch.Tensor, target_zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel factor r and shift b mapping each channel's grid onto the per-tensor target grid."""
    channel_min = -zero_points * scales
    target_min = -target_zero_point * target_scale
    ratio = scales / target_scale
    return ratio, channel_min / ratio - target_min


def _fold_into_layernorm_(norm: nn.LayerNorm, ratio: torch.Tensor, shift: torch.Tensor) -> None:
    if norm.weight is None or norm.bias is None:
        raise ValueError("scale reparameterization needs a LayerNorm with an affine weight and bias")
    norm.weight.data = norm.weight.data / ratio
    norm.bias.data = norm.bias.data / ratio - shift


def _fold_into_linear_(linear: nn.Linear, ratio: torch.Tensor, shift: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data * ratio
    compensation = torch.mm(linear.weight.data, shift.reshape(-1, 1)).reshape(-1)
    if linear.bias is None:
        linear.bias = nn.Parameter(compensation)  # e.g. Swin's bias-free patch-merging reduction
    else:
        linear.bias.data = linear.bias.data + compensation


def _channel_quantizer(linear: nn.Module, norm_name: str) -> Quantizer:
    quantizer = getattr(linear, "input_quantizer", None)
    if not isinstance(linear, QuantLinear) or quantizer is None:
        raise ValueError(f"the Linear after {norm_name} needs an input quantizer (prepare the model first)")
    if not quantizer.foldable:
        raise ValueError(f"the input quantizer after {norm_name} must be a uniform grid per channel (last dim)")
    if not quantizer.calibrated:
        raise ValueError(f"the input quantizer after {norm_name} is not calibrated yet")
    return quantizer


def folded_pairs(model: nn.Module, edited: list[QuantLinear]) -> list[str]:
    """``"<norm> → <linear>"`` for each edited Linear (module names of ``model``), for the record."""
    names = {id(module): name for name, module in model.named_modules()}
    norm_of = {id(linear): pair.norm_name for pair in layernorm_linear_pairs(model, skip_post_norm=True) for linear in pair.linears}
    return [f"{norm_of.get(id(linear), '?')} → {names[id(linear)]}" for linear in edited]


@torch.no_grad()
def reparameterize_layernorm_(model: nn.Module, target_fn: TargetFn = mean_target, skip_post_norm: bool = False,
                              pairs: Sequence[NormLinearPair] | None = None) -> list[QuantLinear]:
    """Fold every per-channel post-LayerNorm quantizer into a per-tensor one, in place.

    For each LayerNorm → Linear pair (:func:`layernorm_linear_pairs`), the Linear's calibrated per-channel input
    quantizer becomes per tensor with ``target_fn``'s (s̃, z̃), the LayerNorm affine and the Linear's weight and
    bias absorb the change, and the Linear's weight quantizer is reset (its weight changed). Returns the edited
    Linears, whose weight quantizers the caller must calibrate again. ``skip_post_norm`` leaves blocks that are not
    known pre-norm alone (their inputs were quantized per tensor: the architecture gives them the generic role).
    ``pairs``: fold only these (a subset of :func:`layernorm_linear_pairs`; I&S-ViT leaves Swin's reductions alone).
    """
    edited: list[QuantLinear] = []
    for pair in layernorm_linear_pairs(model, skip_post_norm) if pairs is None else pairs:
        if len(pair.linears) != 1:
            raise ValueError(f"{pair.norm_name} feeds {len(pair.linears)} Linears; only one is supported")
        linear = pair.linears[0]
        quantizer = _channel_quantizer(linear, pair.norm_name)
        scales, zero_points = quantizer.scale.reshape(-1), quantizer.zero_point.reshape(-1)
        target_scale, target_zero_point = target_fn(scales, zero_points)
        ratio, shift = channel_transform(scales, zero_points, target_scale, target_zero_point)
        _fold_into_layernorm_(pair.norm, ratio, shift)
        _fold_into_linear_(linear, ratio, shift)
        quantizer.fold_to_tensor_(target_scale, target_zero_point)
        linear.refresh_weight()
        if linear.weight_quantizer is not None:
            linear.weight_quantizer.reset()
        edited.append(linear)
    return edited
