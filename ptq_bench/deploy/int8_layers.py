"""Quantized layers in the Q/DQ reference form an int8 compiler lowers: q(x) → dq → linear/conv with dq(int8 weight).

The forward is written with ``torch.ops.quantized_decomposed`` quantize/dequantize ops around ``F.linear`` and
``F.conv2d`` (the form of PT2E's reference representation, pytorch/ao ``torchao/quantization/pt2e``); inductor with
``freezing`` pattern-matches it into oneDNN's int8 ``qlinear``/``qconv`` kernels (:mod:`ptq_bench.deploy.x86`).
In eager mode the same graph computes in float what the kernel computes in integers. An input grid of fewer than
256 levels is clamped to its range in float first: a following quantize fused into the previous kernel's output
keeps only the uint8 range [0, 255]. A weight stored with a per-channel offset o (asymmetric 8-bit grids,
:mod:`ptq_bench.deploy.sites`) adds back s·o·Σx̂ over each output's receptive field (:class:`_Int8Layer`).
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
import torch.nn.functional as F
from torch import nn

from ptq_bench.deploy.sites import InputGrid, WeightInt8

_ops = torch.ops.quantized_decomposed


class _Int8Layer(nn.Module):
    """Shared state: the input grid, the int8 weight with its scales, the bias and the offset correction.

    With offsets, the weight gets one more output channel of ones (scale 1, bias 0): the int8 kernel then computes
    Σx̂ over each output's receptive field in the same pass (exactly: integer accumulation), and the layer adds
    s·o times it to the other channels. Measured on deit_tiny MinMax W8A8: 0.63 of FP latency against 0.73 for a
    separate float reduction."""

    def __init__(self, grid: InputGrid, weight: WeightInt8, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmax = grid.scale, grid.zero_point, grid.qmax
        low, high = -grid.zero_point * grid.scale, (grid.qmax - grid.zero_point) * grid.scale
        self.bounds = None if grid.qmax == 255 else (low, high)
        values, scale = weight.values, weight.scale
        self.out_channels = values.shape[0]
        bias = None if bias is None else bias.detach().clone()
        offset = bool(weight.offset.any())
        if offset:
            values = torch.cat([values, torch.ones_like(values[:1])])
            scale = torch.cat([scale, torch.ones_like(scale[:1])])
            bias = None if bias is None else torch.cat([bias, torch.zeros_like(bias[:1])])
        self.register_buffer("weight_int8", values)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros_like(scale, dtype=torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("offset_scale", weight.scale * weight.offset if offset else None)

    def dequantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.bounds is not None:
            x = x.clamp(*self.bounds)
        q = _ops.quantize_per_tensor.default(x, self.scale, self.zero_point, 0, 255, torch.uint8)
        return _ops.dequantize_per_tensor.default(q, self.scale, self.zero_point, 0, 255, torch.uint8)

    def dequantized_weight(self) -> torch.Tensor:
        return _ops.dequantize_per_channel.default(
            self.weight_int8, self.weight_scale, self.weight_zero_point, 0, -128, 127, torch.int8)


class Int8Linear(_Int8Layer):
    """A Linear on a uint8 per-tensor input grid and an int8 per-channel weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.dequantized_input(x), self.dequantized_weight(), self.bias)
        if self.offset_scale is None:
            return y
        return y[..., : self.out_channels] + y[..., self.out_channels :] * self.offset_scale


class Int8Conv2d(_Int8Layer):
    """A Conv2d (groups 1) on a uint8 per-tensor input grid and an int8 per-channel weight."""

    def __init__(self, conv: nn.Conv2d, grid: InputGrid, weight: WeightInt8) -> None:
        super().__init__(grid, weight, conv.bias)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(self.dequantized_input(x), self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation)
        if self.offset_scale is None:
            return y
        return y[:, : self.out_channels] + y[:, self.out_channels :] * self.offset_scale.reshape(1, -1, 1, 1)
