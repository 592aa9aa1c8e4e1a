"""APHQ-ViT (Wu et al., CVPR 2025, arXiv 2504.02508), following GoatWu/APHQ-ViT @ 84c9fde.

configs/{3,4}bit/best.py with ``test_quant.py --reconstruct-mlp --calibrate --optimize`` (the README's command):

1. MLP reconstruction (:mod:`ptq_bench.transforms.aph_mlp`): GELU → ReLU in every block, fc1/fc2 retrained on the
   FP model's MLP inputs with the average-perturbation-Hessian-weighted error (Sec. 3.3).
2. Calibration (:mod:`ptq_bench.methods.aphq_vit_calibration`) of the ReLU model.
3. QDrop's block reconstruction (:mod:`ptq_bench.methods.qdrop`) against the original GELU model, with the
   average perturbation Hessian loss mean((ŷ - y)²·H) (:mod:`ptq_bench.transforms.aph`, Sec. 3.2; ``optim_metric =
   'hessian_perturb'``, ``use_mean_hessian = True``, T = ``temperature``) for every unit but the head (its KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.aphq_vit_detection import reconstruct_detector_mlps_
from ptq_bench.methods.base import METHODS
from ptq_bench.methods.qdrop import QDrop, QDropOptions, RecLoss
from ptq_bench.transforms.aph import aph_loss, perturbation_hessian, prediction_targets
from ptq_bench.transforms.aph_mlp import MLPReconstruction, reconstruct_mlps_


@dataclass(frozen=True)
class AphqVitOptions(QDropOptions):
    """QDrop's options plus the Hessian temperature and the MLP reconstruction (conf/method/aphq_vit.yaml)."""

    temperature: float
    reconstruct_mlp: bool
    mlp_iters: int
    mlp_lr: float
    mlp_quant_weight: float
    mlp_pct: float
    mlp_pct_3bit: float

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError(f"option temperature must be > 0, got {self.temperature}")
        if self.mlp_iters < 0:
            raise ConfigError(f"option mlp_iters must be >= 0, got {self.mlp_iters}")
        for key in ("mlp_pct", "mlp_pct_3bit"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"option {key} must be in (0, 1], got {getattr(self, key)}")


@METHODS.register("aphq_vit")
class AphqVit(QDrop):
    """APHQ-ViT: MLP reconstruction, calibration, QDrop reconstruction with the average perturbation Hessian loss."""

    name = "aphq_vit"
    Options = AphqVitOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._targets: list[torch.Tensor] | None = None

    @property
    def mlp_pct(self) -> float:
        """The clamp percentile of fc2's input: configs/3bit/best.py's at 3 bits, the 2- and 4-bit configs' otherwise
        (the config file is chosen by the weight bits)."""
        o: AphqVitOptions = self.options
        return o.mlp_pct_3bit if self.bits.w == 3 else o.mlp_pct

    def prepare_fp_(self, model: nn.Module, fp_model: nn.Module, data: CalibrationData,
                    generator: torch.Generator | None = None) -> None:
        o: AphqVitOptions = self.options
        self._targets = None
        if not o.reconstruct_mlp:
            return
        cfg = MLPReconstruction(o.mlp_iters, o.mlp_lr, o.mlp_quant_weight, self.mlp_pct, o.batch_size, o.temperature)
        reconstruct_mlps_(model, fp_model, data, cfg, generator or torch.Generator().manual_seed(self.seed), self.progress)

    detection_hessian = True

    @property
    def relu_mlp(self) -> bool:  # type: ignore[override]
        return self.options.reconstruct_mlp

    def prepare_fp_detector_(self, model: nn.Module, fp_model: nn.Module, data: CalibrationData) -> None:
        o: AphqVitOptions = self.options
        if o.reconstruct_mlp:
            reconstruct_detector_mlps_(model, fp_model, data, o.mlp_iters, o.mlp_lr, o.mlp_quant_weight, self.mlp_pct, self.progress)

    def capture_passes(self, name: str) -> int:
        return super().capture_passes(name) + 2  # the two perturbed passes (the head's too, unused)

    def unit_loss(self, name: str, fp_model: nn.Module, fp_unit: nn.Module, data: CalibrationData) -> RecLoss:
        if name == "head":
            return super().unit_loss(name, fp_model, fp_unit, data)
        o: AphqVitOptions = self.options
        if self._targets is None:
            self._targets = prediction_targets(fp_model, data, o.batch_size, o.temperature)
        hessian = perturbation_hessian(fp_model, fp_unit, data, o.batch_size, o.temperature, self._targets)
        return lambda out, target, idx: aph_loss(out, target, hessian)
