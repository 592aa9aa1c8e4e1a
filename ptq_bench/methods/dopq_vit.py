"""DopQ-ViT (Yang et al., arXiv 2408.03291): RepQ-ViT's framework with TanQ for the post-Softmax map, MOSF for the
per-tensor scale of reparameterized post-LayerNorm activations, and block-wise reconstruction.

No official code exists and the method section could not be read; docs/methods/dopq_vit.md separates what the
sources establish from the harness choices below. Recipe:

1. quantizers as in RepQ-ViT (:func:`ptq_bench.methods.repq_vit.repq_quantizer`), except the post-Softmax map
   (``softmax_quantizer``: tanq, or any other post-Softmax quantizer of the registry);
2. one calibration forward on the first ``init_calib_size`` images (RepQ-ViT's 32), TanQ choosing its shape;
3. post-LayerNorm reparameterization with ``scale_factor`` (mosf | mean | median) and ``compensation``
   (mad | all | none; :mod:`ptq_bench.transforms.mosf`), then refitting the edited weight quantizers;
4. optional (``reconstruction``) block-wise reconstruction on all calibration images: per block, the step sizes of
   the block's uniform quantizers (weights per channel, activations per tensor) are trained with Adam to match the
   FP block output given the quantized model's block input (BRECQ-style MSE). TanQ/log shapes stay fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.methods.options import keyed_when_on
from ptq_bench.methods.repq_vit import repq_placement
from ptq_bench.models import calibrating, find_blocks, set_quantizers_enabled
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear
from ptq_bench.transforms.invariants import keeps_fp_function
from ptq_bench.transforms.mosf import mosf_reparameterize_
from ptq_bench.transforms.reparam import folded_pairs
from ptq_bench.transforms.block_capture import block_outputs, capture_block_inputs
from ptq_bench.transforms.compiled_loss import compiled_losses
from ptq_bench.transforms.reconstruction import ReconStep, clamp_scales_, frozen_parameters, learnable_scales, reconstruct_block


@dataclass(frozen=True)
class DopQViTOptions:
    """conf/method/dopq_vit.yaml gives every value and its source."""

    softmax_quantizer: str
    scale_factor: Literal["mosf", "mean", "median"]
    compensation: Literal["mad", "all", "none"]
    kappa: float
    tanq_alphas: tuple[float, ...]
    tanq_centers: tuple[float, ...]
    tanq_granularity: Literal["tensor", "head"]
    init_calib_size: int
    post_norm: Literal["refuse", "skip"]
    reconstruction: bool
    iters: int
    batch_size: int
    lr: float
    compile: bool = keyed_when_on()  # each training step's forward and loss through torch.compile

    def __post_init__(self) -> None:
        if self.init_calib_size < 1 or self.iters < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("dopq_vit: init_calib_size and batch_size must be >= 1, iters >= 0 and lr > 0")


@METHODS.register("dopq_vit")
class DopQViT(Method):
    name = "dopq_vit"
    accepts_layer_bits = True
    Options = DopQViTOptions
    role_options = {"post_softmax": "softmax_quantizer"}

    def needs(self) -> frozenset[str]:
        needs = {"layernorm_pairs"} if self.options.post_norm == "refuse" else set()
        return frozenset(needs | {"blocks"} if self.reconstructs else needs)

    @property
    def reconstructs(self) -> bool:
        return self.options.reconstruction and self.options.iters > 0

    def placement(self) -> dict[str, QuantizerSpec | None]:
        o = self.options
        tanq = {"alphas": o.tanq_alphas, "centers": o.tanq_centers, "granularity": o.tanq_granularity}
        return repq_placement(o.softmax_quantizer, {"tanq": tanq})

    def foldable_roles(self) -> frozenset[str]:
        return frozenset({"post_layernorm"})

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        o = self.options
        self.place_quantizers_(model)
        with torch.no_grad(), calibrating(model):
            data.run(model, limit=o.init_calib_size)
            with keeps_fp_function(model, data, f"DopQ-ViT {o.scale_factor} reparameterization") as check:
                edited = mosf_reparameterize_(model, o.scale_factor, o.compensation, o.kappa, o.post_norm == "skip")
            self.transforms.append(check.record(folded=folded_pairs(model, edited)))
            for linear in edited:
                linear.quantized_weight()  # refit the reset weight quantizer on the reparameterized weight
        if self.reconstructs:
            self.reconstruct_(model, data)
        model.eval()
        return model

    def reconstruct_(self, model: nn.Module, data: CalibrationData) -> None:
        """Block-wise reconstruction of the uniform quantizers' step sizes, block after block (``compile``: each
        training step's forward and loss through torch.compile, one graph shared by the blocks)."""
        o = self.options
        generator = torch.Generator().manual_seed(self.seed)
        blocks = find_blocks(model)
        with compiled_losses(o.compile, "DopQ-ViT reconstruction") as compiled:
            for index, (name, block) in enumerate(blocks):
                set_quantizers_enabled(model, False)  # FP target: FP block on the FP model's block input
                target = block_outputs(block, capture_block_inputs(model, block, data, o.batch_size), o.batch_size)
                set_quantizers_enabled(model, True)
                inputs = capture_block_inputs(model, block, data, o.batch_size)
                learned = [(m, attr) for m in block.modules() if isinstance(m, Quantizer) and m.calibrated
                           for attr, kind in m.learnable_parameters().items() if kind == "step_size"]
                with frozen_parameters(block), learnable_scales(learned) as scales:
                    # Adam's step is about its learning rate: each scale's rate is relative to its mean magnitude
                    optimizer = torch.optim.Adam([{"params": [s], "lr": o.lr * float(s.detach().abs().mean())} for s in scales])
                    step = ReconStep(optimizer, torch.arange(len(data)), before=lambda: clamp_scales_(scales))
                    reconstruct_block(
                        block, inputs, target, [step], o.iters, o.batch_size, generator,
                        desc=f"dopq recon {index + 1}/{len(blocks)} {name}", progress=self.progress, compile=compiled,
                    )  # fmt: skip
                for layer in block.modules():
                    if isinstance(layer, (QuantLinear, QuantConv2d)):
                        layer.refresh_weight()
