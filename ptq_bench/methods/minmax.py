"""Naive MinMax PTQ: per-output-channel min-max weights, per-tensor min-max activations, uniform everywhere
(the post-Softmax map included). The usual "Min-Max" baseline row of ViT PTQ tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.models import QuantSite, calibrating, prepare_
from ptq_bench.quant import Quantizer, UniformQuantizer


@dataclass(frozen=True)
class MinMaxOptions:
    patch_embed_input_bits: Optional[int]  # None: the activation bit-width; e.g. 8 as RepQ-ViT does


@METHODS.register("minmax")
class MinMax(Method):
    name = "minmax"
    Options = MinMaxOptions

    def make_quantizer(self, site: QuantSite) -> Quantizer:
        if site.is_weight:
            return UniformQuantizer(self.bits.w, granularity="channel", channel_dim=0, observer="minmax")
        bits = self.bits.a
        if site.role == "patch_embed" and self.options.patch_embed_input_bits is not None:
            bits = self.options.patch_embed_input_bits
        return UniformQuantizer(bits, granularity="tensor", observer="minmax")

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        prepare_(model, self.make_quantizer)
        with torch.no_grad(), calibrating(model):
            data.run(model)
        return model
