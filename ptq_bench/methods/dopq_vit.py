"""DopQ-ViT (Yang et al., arXiv 2408.03291): RepQ-ViT's framework with TanQ for the post-Softmax map, MOSF for the
per-tensor scale of reparameterized post-LayerNorm activations, and block-wise reconstruction.

No official code exists and the method section could not be read; docs/methods/dopq_vit.md separates what the
sources establish from the harness choices below. Recipe:

1. quantizers as in RepQ-ViT (:class:`ptq_bench.methods.repq_vit.RepQViT`), except the post-Softmax map
   (``softmax_quantizer``: tanq | log2 | log_sqrt2 | uniform);
2. one calibration forward on the first ``init_calib_size`` images (RepQ-ViT's 32), TanQ choosing its shape;
3. post-LayerNorm reparameterization with ``scale_factor`` (mosf | mean | median) and ``compensation``
   (mad | all | none; :mod:`ptq_bench.transforms.mosf`), then refitting the edited weight quantizers;
4. optional (``reconstruction``) block-wise reconstruction on all calibration images: per block, the step sizes of
   the block's uniform quantizers (weights per channel, activations per tensor) are trained with Adam to match the
   FP block output given the quantized model's block input (BRECQ-style MSE). TanQ/log shapes stay fixed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS, BitWidth, Method
from ptq_bench.methods.repq_vit import RepQViT
from ptq_bench.models import QuantSite, calibrating, prepare_, set_quantizers_enabled
from ptq_bench.quant import Quantizer, UniformQuantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear
from ptq_bench.quant.tanq import DEFAULT_ALPHAS, DEFAULT_CENTERS, TanQuantizer
from ptq_bench.transforms.mosf import DEFAULT_KAPPA, mosf_reparameterize_
from ptq_bench.transforms.reconstruction import ReconStep, block_outputs, capture_block_inputs, find_blocks, reconstruct_block

SOFTMAX_QUANTIZERS = ("tanq", "log2", "log_sqrt2", "uniform")
SCALE_FACTORS = ("mosf", "mean", "median")
COMPENSATIONS = ("mad", "all", "none")


@METHODS.register("dopq_vit")
class DopQViT(Method):
    name = "dopq_vit"

    def __init__(
        self,
        bits: BitWidth,
        softmax_quantizer: str = "tanq",
        scale_factor: str = "mosf",
        compensation: str = "all",
        kappa: float = DEFAULT_KAPPA,
        tanq_alphas: Sequence[float] = DEFAULT_ALPHAS,
        tanq_centers: Sequence[float] = DEFAULT_CENTERS,
        tanq_granularity: str = "tensor",
        init_calib_size: int = 32,
        reconstruction: bool = True,
        iters: int = 1000,
        batch_size: int = 32,
        lr: float = 1e-3,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(bits)
        for option, value, allowed in (
            ("softmax_quantizer", softmax_quantizer, SOFTMAX_QUANTIZERS),
            ("scale_factor", scale_factor, SCALE_FACTORS),
            ("compensation", compensation, COMPENSATIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"dopq_vit: {option} must be one of {', '.join(allowed)}, got {value!r}")
        if init_calib_size < 1 or iters < 0 or batch_size < 1 or lr <= 0:
            raise ConfigError("dopq_vit: init_calib_size and batch_size must be >= 1, iters >= 0 and lr > 0")
        self.softmax_quantizer = softmax_quantizer
        self.scale_factor, self.compensation, self.kappa = scale_factor, compensation, float(kappa)
        self.tanq_options = {"alphas": tuple(tanq_alphas), "centers": tuple(tanq_centers), "granularity": tanq_granularity}
        TanQuantizer(2, **self.tanq_options)  # validate the TanQ options now, not mid-calibration
        self.init_calib_size = init_calib_size
        self.reconstruction, self.iters, self.batch_size, self.lr = reconstruction, iters, batch_size, lr
        self.seed, self.progress = seed, progress
        self.repq = RepQViT(bits, softmax_quantizer="log_sqrt2" if softmax_quantizer == "tanq" else softmax_quantizer)

    def make_quantizer(self, site: QuantSite) -> Quantizer:
        if site.role == "post_softmax" and self.softmax_quantizer == "tanq":
            return TanQuantizer(self.bits.a, **self.tanq_options)
        return self.repq.make_quantizer(site)

    def quantize(self, model: nn.Module, calib_images: torch.Tensor) -> nn.Module:
        prepare_(model, self.make_quantizer)
        with torch.no_grad(), calibrating(model):
            model(calib_images[: self.init_calib_size])
            for linear in mosf_reparameterize_(model, self.scale_factor, self.compensation, self.kappa):  # type: ignore[arg-type]
                linear.quantized_weight()  # refit the reset weight quantizer on the reparameterized weight
        if self.reconstruction and self.iters > 0:
            self.reconstruct_(model, calib_images)
        model.eval()
        return model

    def reconstruct_(self, model: nn.Module, images: torch.Tensor) -> None:
        """Block-wise reconstruction of the uniform quantizers' step sizes, block after block."""
        generator = torch.Generator().manual_seed(self.seed)
        blocks = find_blocks(model)
        for index, (name, block) in enumerate(blocks):
            set_quantizers_enabled(model, False)  # FP target: FP block on the FP model's block input
            target = block_outputs(block, capture_block_inputs(model, block, images, self.batch_size), self.batch_size)
            set_quantizers_enabled(model, True)
            inputs = capture_block_inputs(model, block, images, self.batch_size)
            with _learnable_step_sizes(block) as groups:
                optimizer = torch.optim.Adam([{"params": [s], "lr": self.lr * unit} for s, unit in groups])
                step = ReconStep(optimizer, torch.arange(images.shape[0]), before=lambda: _keep_positive(groups))
                desc = f"dopq recon {index + 1}/{len(blocks)} {name}"
                reconstruct_block(block, inputs, target, [step], self.iters, self.batch_size, generator, desc=desc, progress=self.progress)


def _keep_positive(groups: list[tuple[torch.Tensor, float]]) -> None:
    with torch.no_grad():
        for scale, _ in groups:
            scale.clamp_(min=1e-8)


class _learnable_step_sizes:
    """Make the scales of a block's calibrated uniform quantizers trainable (LSQ-style, through round_ste).

    Yields (scale tensor, its mean magnitude): Adam's step is about its learning rate, so each group's rate is
    scaled by the magnitude of its scales (a relative learning rate). On exit the scales become plain buffers
    again and the quantized-weight caches are refreshed.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.quantizers = [
            m for m in block.modules() if isinstance(m, UniformQuantizer) and m.calibrated and m.granularity != "token"
        ]
        self.layers = [m for m in block.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
        self.requires_grad = {id(p): p.requires_grad for p in block.parameters()}

    def __enter__(self) -> list[tuple[torch.Tensor, float]]:
        for parameter in self.block.parameters():
            parameter.requires_grad_(False)
        groups = []
        for quantizer in self.quantizers:
            quantizer.scale = quantizer.scale.detach().clone().requires_grad_(True)
            groups.append((quantizer.scale, float(quantizer.scale.detach().abs().mean())))
        return groups

    def __exit__(self, *exc: Optional[BaseException]) -> None:
        for quantizer in self.quantizers:
            quantizer.scale = quantizer.scale.detach()
            quantizer.params_changed()
        for parameter in self.block.parameters():
            parameter.requires_grad_(self.requires_grad[id(parameter)])
        for layer in self.layers:
            layer.refresh_weight()
