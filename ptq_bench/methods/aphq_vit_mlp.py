"""APHQ-ViT's MLP reconstruction alone: the full-precision model with every MLP's GELU swapped to ReLU and fc1/fc2
retrained (Sec. 3.3), nothing quantized: the "MLP Recon." column of the official READMEs (GoatWu/APHQ-ViT @ 84c9fde
README.md and Object-Detection/README.md).

The official code evaluates this model right after the stage (test_quant.py, "Validating after model
reconstruction ..."; the detection fork's tools/test.py likewise) before it wraps any quantizer. The stage is
:mod:`ptq_bench.transforms.aph_mlp` on a classifier and
:func:`ptq_bench.methods.aphq_vit_detection.reconstruct_detector_mlps_` on a detector, the same calls and seeds as
``aphq_vit`` makes before its calibration, so this row equals the FP model inside an ``aphq_vit`` run of the same
options. Which clamp percentile the README column used is not said: the configs differ only there (0.98 in
configs/4bit/best.py, the default; 0.99 in 3bit/best.py: ``method.mlp_pct=0.99``; 0.999 in the detection
quant_configs/4bit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.aphq_vit_detection import reconstruct_detector_mlps_
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.methods.qdrop import fp_copy
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.transforms.aph_mlp import MLPReconstruction, reconstruct_mlps_


@dataclass(frozen=True)
class AphqMlpOptions:
    """The MLP reconstruction's settings (conf/method/aphq_vit_mlp.yaml; the names and values of aphq_vit.yaml)."""

    batch_size: int
    temperature: float
    mlp_iters: int
    mlp_lr: float
    mlp_quant_weight: float
    mlp_pct: float

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"option batch_size must be >= 1, got {self.batch_size}")
        if self.temperature <= 0:
            raise ConfigError(f"option temperature must be > 0, got {self.temperature}")
        if self.mlp_iters < 0:
            raise ConfigError(f"option mlp_iters must be >= 0, got {self.mlp_iters}")
        if not 0.0 < self.mlp_pct <= 1.0:
            raise ConfigError(f"option mlp_pct must be in (0, 1], got {self.mlp_pct}")


@METHODS.register("aphq_vit_mlp")
class AphqVitMlp(Method):
    """The FP model after APHQ-ViT's MLP reconstruction (module docstring); no quantizer is placed."""

    name = "aphq_vit_mlp"
    Options = AphqMlpOptions
    uses_bits = False
    accepts_quantizers = False

    def placement(self) -> dict[str, QuantizerSpec | None]:
        return {}

    def needs(self) -> frozenset[str]:
        return frozenset({"blocks"})

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        o: AphqMlpOptions = self.options
        detector = not data.uniform_shapes  # the detection fork's stage, one image per step
        if detector and o.batch_size != 1:
            raise ConfigError(f"{self.name} on a detector takes one image at a time, as the official detection code "
                              f"does: set method.batch_size=1 (got {o.batch_size})")
        fp_model = fp_copy(model)
        if detector:
            losses = reconstruct_detector_mlps_(model, fp_model, data, o.mlp_iters, o.mlp_lr, o.mlp_quant_weight,
                                                o.mlp_pct, self.progress)
        else:
            cfg = MLPReconstruction(o.mlp_iters, o.mlp_lr, o.mlp_quant_weight, o.mlp_pct, o.batch_size, o.temperature)
            losses = reconstruct_mlps_(model, fp_model, data, cfg, torch.Generator().manual_seed(self.seed), self.progress)
        self.transforms.append({"transform": "APHQ-ViT MLP reconstruction (GELU -> ReLU, FP)", "mlps": len(losses),
                                "final_losses": losses})
        return model
