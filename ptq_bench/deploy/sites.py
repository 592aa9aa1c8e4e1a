"""Which quantized sites an int8 backend can run, from each quantizer's own grid (:meth:`Quantizer.export`).

A Linear or Conv2d site runs in int8 when both its grids are affine and static with integer zero points: the input
per tensor on at most 256 levels (carried as uint8: q - qmin, zero point z - qmin), the weight per tensor or per
output channel with at most 8 bits. The integer weight is read off the method's own fake-quantized weight
(``layer.quantized_weight()``, so AdaRound-style learned roundings come along) as k = ŵ / s and stored as
int8 k - o with a per-channel integer offset o: o = 0 when k fits [-128, 127] (every symmetric grid, every
asymmetric grid of at most 7 bits: |q - z| <= 2^b - 1), otherwise (asymmetric 8 bits, 256 values of q - z)
o = min(k) + 128, and the layer adds back the exact float term s·o·Σx̂ (:mod:`ptq_bench.deploy.int8_layers`).
Every other site stays float with its fake quantizers, so its values are the method's, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptq_bench.quant.base import QuantGrid, Quantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul

#: Largest level count of an int8 tensor.
INT8_LEVELS = 256
#: What an attention matmul is told: the x86 backend lowers Q/DQ around weights (Linear, Conv), not act × act.
MATMUL_REASON = "activation x activation matmul: no int8 kernel for it in this backend (operands fake-quantized, matmul in float)"


@dataclass(frozen=True)
class InputGrid:
    """A per-tensor activation grid carried as uint8 on [0, ``qmax``] with zero point ``zero_point``."""

    scale: float
    zero_point: int
    qmax: int


@dataclass(frozen=True)
class WeightInt8:
    """An int8 weight: ŵ = ``scale``·(``values`` + ``offset``) per output channel (dim 0)."""

    values: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


@dataclass(frozen=True)
class Site:
    """One quantized layer: ``runs`` ``int8`` (with its ``input_grid`` and ``weight``) or ``float`` (``reason``)."""

    layer: str
    op: str
    runs: str
    reason: str = ""
    input_grid: InputGrid | None = None
    weight: WeightInt8 | None = None

    def record(self) -> dict[str, str]:
        return {"layer": self.layer, "op": self.op, "runs": self.runs, **({"reason": self.reason} if self.reason else {})}


def _grid_refusal(quantizer: Quantizer | None, what: str) -> tuple[QuantGrid | None, str]:
    """The quantizer's grid, or why no int8 kernel can run it."""
    if quantizer is None or not quantizer.enabled:
        return None, f"{what} not quantized"
    grid = quantizer.export()
    name = type(quantizer).__name__
    if grid.kind == "non_uniform":
        return None, f"{what}: non-uniform grid ({name}{': ' + grid.note if grid.note else ''})"
    if grid.kind == "dynamic_affine":
        return None, f"{what}: dynamic grid computed at run time ({name}{': ' + grid.note if grid.note else ''})"
    if grid.bits > 8:
        return None, f"{what}: {grid.bits} bits, more than int8 holds"
    if not grid.integer_zero_point:
        return None, f"{what}: fractional zero point ({name})"
    return grid, ""


def input_grid(quantizer: Quantizer | None) -> tuple[InputGrid | None, str]:
    """The uint8 form of an input quantizer's grid, or why there is none."""
    grid, reason = _grid_refusal(quantizer, "input")
    if grid is None:
        return None, reason
    if grid.scale.numel() > 1 or grid.zero_point.numel() > 1:
        return None, "input: per-channel activation grid (the int8 kernels take one input scale)"
    span = grid.qmax - grid.qmin
    zero_point = int(grid.zero_point.reshape(-1)[0].item()) - grid.qmin
    if span >= INT8_LEVELS or not 0 <= zero_point <= span:
        return None, f"input: zero point {zero_point + grid.qmin} outside the grid [{grid.qmin}, {grid.qmax}]"
    return InputGrid(float(grid.scale.reshape(-1)[0].item()), zero_point, span), ""


def weight_int8(layer: nn.Module) -> tuple[WeightInt8 | None, str]:
    """The layer's fake-quantized weight as int8 values, per-channel scales and offsets, or why not."""
    grid, reason = _grid_refusal(layer.weight_quantizer, "weight")
    if grid is None:
        return None, reason
    out_channels = layer.weight.shape[0]
    if grid.axis is not None and grid.axis % layer.weight.ndim != 0:
        return None, f"weight: grid per index of dim {grid.axis}, not per output channel"
    with torch.no_grad():
        weight = layer.quantized_weight().detach().float()
        scale = grid.scale.detach().float().reshape(-1).expand(out_channels).contiguous()
        per_channel = scale.reshape(-1, *[1] * (weight.ndim - 1))
        k = torch.round(weight / per_channel)
        if not torch.allclose(k * per_channel, weight, rtol=1e-5, atol=1e-7 * float(scale.max())):
            return None, "weight: the fake-quantized weight is not on its exported grid"
        rows = k.reshape(out_channels, -1)
        low, high = rows.amin(1), rows.amax(1)
        offset = torch.where((low >= -128) & (high <= 127), torch.zeros_like(low), low + 128)
        if bool((high - offset > 127).any()):
            return None, "weight: more than 256 integer values in a channel"
    values = (k - offset.reshape(per_channel.shape)).to(torch.int8)
    return WeightInt8(values, scale, offset), ""


def plan(model: nn.Module) -> list[Site]:
    """Every quantized layer of ``model`` (a method's fake-quant model), in module order, with what it runs."""
    sites = []
    for name, layer in model.named_modules():
        if isinstance(layer, QuantMatMul):
            operands = [q for q in (layer.quantizer_a, layer.quantizer_b) if q is not None and q.enabled]
            if operands:
                notes = [f"{q.role} {reason}" for q in operands for _, reason in [_grid_refusal(q, "operand")] if reason]
                sites.append(Site(name, "matmul", "float", "; ".join([MATMUL_REASON, *notes])))
            continue
        if not isinstance(layer, (QuantLinear, QuantConv2d)):
            continue
        op = "linear" if isinstance(layer, QuantLinear) else "conv2d"
        if op == "conv2d" and (layer.groups != 1 or layer.padding_mode != "zeros"):
            sites.append(Site(name, op, "float", f"convolution with groups={layer.groups}, padding_mode={layer.padding_mode}"))
            continue
        grid, reason = input_grid(layer.input_quantizer)
        weight, weight_reason = weight_int8(layer) if grid is not None else (None, "")
        if grid is None or weight is None:
            sites.append(Site(name, op, "float", reason or weight_reason))
        else:
            sites.append(Site(name, op, "int8", input_grid=grid, weight=weight))
    return sites
