"""Quantized layers in the Q/DQ reference form an int8 compiler lowers: q(x) → dq → linear/conv with dq(int8 weight).

The forward is written with ``torch.ops.quantized_decomposed`` quantize/dequantize ops around ``F.linear`` and
``F.conv2d`` (the form of PT2E's reference representation, pytorch/ao ``torchao/quantization/pt2e``); inductor with
``freezing`` pattern-matches it into oneDNN's int8 ``qlinear``/``qconv`` kernels (:mod:`ptq_bench.deploy.x86`).
In eager mode the same graph computes in float what the kernel computes in integers. An input grid of fewer than
256 levels is clamped to its range in float first: a following quantize fused into the previous kernel's output
keeps only the uint8 range [0, 255]. A weight stored with a per-channel offset o (asymmetric 8-bit grids,
:mod:`ptq_bench.deploy.sites`) adds back s·o·Σx̂ over each output's receptive field, in float.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
import torch.nn.functional as F
from torch import nn

from ptq_bench.deploy.sites import InputGrid, WeightInt8

_ops = torch.ops.quantized_decomposed


class _Int8Layer(nn.Module):
    """Shared state: the input grid, the int8 weight with its scales, the bias and the offset correction."""

    def __init__(self, grid: InputGrid, weight: WeightInt8, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmax = grid.scale, grid.zero_point, grid.qmax
        low, high = -grid.zero_point * grid.scale, (grid.qmax - grid.zero_point) * grid.scale
        self.bounds = None if grid.qmax == 255 else (low, high)
        self.register_buffer("weight_int8", weight.values)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_zero_point", torch.zeros_like(weight.scale, dtype=torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        correction = weight.scale * weight.offset
        self.register_buffer("offset_scale", correction if bool(weight.offset.any()) else None)

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
        x = self.dequantized_input(x)
        y = F.linear(x, self.dequantized_weight(), self.bias)
        if self.offset_scale is not None:
            y = y + x.sum(-1, keepdim=True) * self.offset_scale
        return y


class Int8Conv2d(_Int8Layer):
    """A Conv2d (groups 1) on a uint8 per-tensor input grid and an int8 per-channel weight."""

    def __init__(self, conv: nn.Conv2d, grid: InputGrid, weight: WeightInt8) -> None:
        super().__init__(grid, weight, conv.bias)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.register_buffer("window", torch.ones(1, *conv.weight.shape[1:]) if self.offset_scale is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dequantized_input(x)
        y = F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation)
        if self.offset_scale is not None:
            y = y + F.conv2d(x, self.window, None, self.stride, self.padding, self.dilation) * self.offset_scale.reshape(1, -1, 1, 1)
        return y
