"""Naive MinMax PTQ: per-output-channel min-max weights, per-tensor min-max activations, uniform everywhere
(the post-Softmax map included). The usual "Min-Max" baseline row of ViT PTQ tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.models import calibrating
from ptq_bench.models.placement import QuantizerSpec


@dataclass(frozen=True)
class MinMaxOptions:
    patch_embed_input_bits: Optional[int]  # None: the activation bit-width; e.g. 8 as RepQ-ViT does


@METHODS.register("minmax")
class MinMax(Method):
    name = "minmax"
    accepts_layer_bits = True
    Options = MinMaxOptions

    def placement(self) -> dict[str, QuantizerSpec | None]:
        per_tensor = {"granularity": "tensor", "observer": "minmax"}
        patch_bits = self.options.patch_embed_input_bits
        return {
            "weight": QuantizerSpec("uniform", "w", {"granularity": "channel", "channel_dim": 0, "observer": "minmax"}),
            "patch_embed": QuantizerSpec("uniform", "a" if patch_bits is None else patch_bits, per_tensor),
            "activation": QuantizerSpec("uniform", "a", per_tensor),
        }

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        self.place_quantizers_(model)
        with torch.no_grad(), calibrating(model):
            data.run(model)
        return model
