"""The calibration APHQ-ViT and its QDrop baseline share (GoatWu/APHQ-ViT @ 84c9fde, ``--calibrate``).

The fork keeps AdaLog's pipeline (utils/calibrator.py, utils/wrap_net.py; :class:`ptq_bench.methods.adalog.AdaLog`):
layer by layer in module order, the FP model runs the calibration set, the layer's inputs and output are
captured and its grids searched; qkv/fc1 search a per-channel input grid first and fold it into the LayerNorm
(only when w = a). Unlike AdaLog every grid is uniform and asymmetric: weights per output channel, Linear inputs
per tensor (the head's at qhead_a_bit = a), Q, K, V and the post-Softmax map per head, the post-GELU input per
tensor, the patch-embedding input unquantized (qconv_a_bit = 8: quant_layers/conv.py ``quant_input`` returns its
input for n_bits >= 8). The searches are :mod:`ptq_bench.methods.aphq_vit_search`.

On a detector (``detector``, set by the method before the search) the detection fork's calibration runs instead
(:mod:`ptq_bench.methods.aphq_vit_detection`): every call of a layer kept, its searches
(:mod:`ptq_bench.methods.aphq_vit_detection_search`) and a per-tensor input grid on every conv but the patch
embedding's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.adalog import AdaLog, _install_uniform
from ptq_bench.methods.adalog_search import LinearSearch, SearchSettings
from ptq_bench.methods.aphq_vit_detection import layer_calls
from ptq_bench.methods.aphq_vit_detection_search import DetectionConvSearch, DetectionLinearSearch, DetectionMatMulSearch
from ptq_bench.methods.aphq_vit_search import (
    AphqLinearSearch,
    PercentileConvSearch,
    UpperLowerMatMulSearch,
)
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.quant.layers import QuantConv2d, QuantLinear


@dataclass(frozen=True)
class CalibrationOptions:
    """The calibration settings of configs/{3,4}bit/*.py (values in conf/method/<method>.yaml)."""

    calib_batch_size: int
    eq_n: int
    search_round: int
    search_memory_gb: float

    def __post_init__(self) -> None:
        for key in ("calib_batch_size", "eq_n", "search_round"):
            if getattr(self, key) < 1:
                raise ConfigError(f"option {key} must be >= 1, got {getattr(self, key)}")
        if self.eq_n < 2:
            raise ConfigError(f"option eq_n must be >= 2 (the percentile grids divide by eq_n - 1), got {self.eq_n}")
        if self.search_memory_gb <= 0:
            raise ConfigError(f"option search_memory_gb must be > 0, got {self.search_memory_gb}")


class AphqCalibration(AdaLog):
    """AdaLog's calibration pipeline with APHQ-ViT's uniform grids and searches (registered by its subclasses)."""

    linear_search = AphqLinearSearch
    conv_search = PercentileConvSearch
    #: fc2's input searched as post-ReLU (the fork's ``post_relu``: MLP reconstruction on)
    relu_mlp = False

    @property
    def matmul_search(self) -> type[UpperLowerMatMulSearch]:  # type: ignore[override]
        """The detection fork's percentile candidates on a detector, the classification fork's otherwise."""
        return DetectionMatMulSearch if self.detector else UpperLowerMatMulSearch

    def placement(self) -> dict[str, QuantizerSpec | None]:
        """AdaLog's table with uniform grids in place of its log quantizers: per head on the post-Softmax map, the
        per-tensor activation grid after GELU; on a detector also a per-tensor input grid on every other conv."""
        table = {role: spec for role, spec in super().placement().items() if role != "post_gelu"}
        if self.detector:
            table["conv"] = QuantizerSpec("uniform", "a", {"granularity": "tensor"})
        return table | {"post_softmax": QuantizerSpec("uniform", "a", {"granularity": "channel", "channel_dim": 1})}

    def layer_io(self, model: nn.Module, layer: nn.Module, data: CalibrationData,
                 settings: SearchSettings) -> tuple[list[Any], Any]:
        """On a detector every call of the layer: concatenated, but a conv's kept as lists."""
        if not self.detector:
            return super().layer_io(model, layer, data, settings)
        inputs, outputs = layer_calls(model, layer, data)
        if isinstance(layer, QuantConv2d):
            return inputs, outputs
        return [torch.cat(calls, dim=0) for calls in inputs], torch.cat(outputs, dim=0)

    def _conv(self, layer: QuantConv2d, x: Any, out: Any, settings: SearchSettings) -> None:
        if not self.detector:
            return super()._conv(layer, x, out, settings)
        quantizer = layer.input_quantizer
        search = DetectionConvSearch(layer, x, out, self.bits.w, self.bits.a if quantizer is not None else 8, settings)
        search.search()
        _install_uniform(layer.weight_quantizer, search.w_scale, search.w_zp, layer.weight.shape[:1] + (1,) * (layer.weight.ndim - 1))
        if quantizer is not None:
            _install_uniform(quantizer, search.a_scale, search.a_zp, ())

    def new_linear_search(self, layer: QuantLinear, *args: Any, **kwargs: Any) -> LinearSearch:
        if not self.detector:
            return super().new_linear_search(layer, *args, **kwargs)
        post_relu = self.relu_mlp and layer.input_quantizer is not None and layer.input_quantizer.role == "post_gelu"
        return DetectionLinearSearch(*args, post_relu=post_relu, **kwargs)

    def settings(self) -> SearchSettings:
        o = self.options
        return SearchSettings(eq_n=o.eq_n, search_round=o.search_round, fpcs=False, steps=1,
                              batch_size=1 if self.detector else o.calib_batch_size, memory_bytes=int(o.search_memory_gb * 2**30))
