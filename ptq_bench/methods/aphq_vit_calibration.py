"""The calibration APHQ-ViT and its QDrop baseline share (GoatWu/APHQ-ViT @ 84c9fde, ``--calibrate``).

The fork keeps AdaLog's pipeline (utils/calibrator.py, utils/wrap_net.py; :class:`ptq_bench.methods.adalog.AdaLog`):
layer by layer in module order, the FP model runs the calibration set, the layer's inputs and output are
captured and its grids searched; qkv/fc1 search a per-channel input grid first and fold it into the LayerNorm
(only when w = a). Unlike AdaLog every grid is uniform and asymmetric: weights per output channel, Linear inputs
per tensor (the head's at qhead_a_bit = a), Q, K, V and the post-Softmax map per head, the post-GELU input per
tensor, the patch-embedding input unquantized (qconv_a_bit = 8: quant_layers/conv.py ``quant_input`` returns its
input for n_bits >= 8). The searches are :mod:`ptq_bench.methods.aphq_vit_search`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptq_bench.errors import ConfigError
from ptq_bench.methods.adalog import AdaLog
from ptq_bench.methods.adalog_search import SearchSettings
from ptq_bench.methods.aphq_vit_search import (
    AphqLinearSearch,
    PercentileConvSearch,
    UpperLowerMatMulSearch,
)
from ptq_bench.models.placement import QuantizerSpec


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
    matmul_search = UpperLowerMatMulSearch
    conv_search = PercentileConvSearch

    def placement(self) -> dict[str, QuantizerSpec | None]:
        """AdaLog's table with uniform grids in place of its log quantizers: per head on the post-Softmax map, the
        per-tensor activation grid after GELU."""
        table = {role: spec for role, spec in super().placement().items() if role != "post_gelu"}
        return table | {"post_softmax": QuantizerSpec("uniform", "a", {"granularity": "channel", "channel_dim": 1})}

    def settings(self) -> SearchSettings:
        o = self.options
        return SearchSettings(eq_n=o.eq_n, search_round=o.search_round, fpcs=False, steps=1,
                              batch_size=o.calib_batch_size, memory_bytes=int(o.search_memory_gb * 2**30))
