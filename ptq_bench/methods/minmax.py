"""Naive MinMax PTQ: per-output-channel min-max weights, per-tensor min-max activations, uniform everywhere
(the post-Softmax map included). The usual "Min-Max" baseline row of ViT PTQ tables."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ptq_bench.methods.base import METHODS, BitWidth, Method
from ptq_bench.models import QuantSite, calibrating, prepare_
from ptq_bench.quant import Quantizer, UniformQuantizer


@METHODS.register("minmax")
class MinMax(Method):
    name = "minmax"

    def __init__(self, bits: BitWidth, patch_embed_input_bits: Optional[int] = None) -> None:
        super().__init__(bits)
        self.patch_embed_input_bits = patch_embed_input_bits

    def make_quantizer(self, site: QuantSite) -> Quantizer:
        if site.is_weight:
            return UniformQuantizer(self.bits.w, granularity="channel", channel_dim=0, observer="minmax")
        bits = self.bits.a
        if site.role == "patch_embed" and self.patch_embed_input_bits is not None:
            bits = self.patch_embed_input_bits
        return UniformQuantizer(bits, granularity="tensor", observer="minmax")

    def quantize(self, model: nn.Module, calib_images: torch.Tensor) -> nn.Module:
        prepare_(model, self.make_quantizer)
        with torch.no_grad(), calibrating(model):
            model(calib_images)
        return model
