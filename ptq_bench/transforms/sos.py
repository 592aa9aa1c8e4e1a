"""I&S-ViT's reconstruction units and their weight training (stages 1 and 3 of its smooth optimization strategy,
SOS; Zhong et al., arXiv 2311.10126), as the official code runs them (zysxmu/IaS-ViT @ 9300cea
quant/block_recon.py ``block_reconstruction``, quant/layer_recon.py ``layer_reconstruction``, test_quant.py
``recon_model``):

* units, in forward order: the patch-embedding conv, every transformer block, Swin's patch-merging reductions and
  the classifier head (the layers whose ``ignore_reconstruction`` test_quant.py clears);
* each unit trains every parameter it holds except the LayerNorm affines (the quantizer parameters are frozen in the
  official code, buffers here) with Adam at ``lr`` and ``CosineAnnealingLR(T_max=iters, eta_min=0)``, one step per
  iteration on ``randperm(n)[:batch_size]`` of the cached inputs, minimizing ``lp_loss``: ‖ŷ - y‖² summed over dim 1,
  averaged over the rest (dim 1 of the official timm 0.4.12 layout: the tokens of a Swin block or reduction output,
  which timm 1.x shapes (B, H, W, C); :func:`token_loss`);
* uniform quantizers differentiate their literal expression (``UniformQuantizer.literal_gradient``), as the
  official ``round_ste`` graph does, so that every gradient equals the official one bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ptq_bench.models import find_blocks
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.block_capture import Samples
from ptq_bench.transforms.reconstruction import ReconStep, reconstruct_block


def lp_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖ŷ - y‖² summed over dim 1, averaged over the rest (quant/quantizer.py ``lp_loss``, p = 2)."""
    return (output - target).abs().pow(2).sum(1).mean()


#: the layers outside the blocks that test_quant.py reconstructs (``ignore_reconstruction = False``), as timm names
#: them (also inside a wrapper; timm 1.x Swin's head is ``head.fc``); a detector's (mmdet) are left out: their inputs
#: differ in size from batch to batch
LAYER_UNITS = re.compile(r"(.*\.)?(patch_embed\.proj|head|head\.fc|layers\.\d+\.downsample\.reduction)")


def _layer_unit(name: str, module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and LAYER_UNITS.fullmatch(name) is not None


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every reconstruction unit of ``model`` in module order (forward order for timm's ViT, DeiT
    and Swin): blocks (:func:`ptq_bench.models.find_blocks`) and the layers :func:`_layer_unit` names."""
    blocks = dict(find_blocks(model))
    units: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{b}.") for b, _ in units if b in blocks):
            continue
        if name in blocks or _layer_unit(name, module):
            units.append((name, module))
    return units


def token_loss(unit: nn.Module, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`lp_loss` with a channels-last map flattened to tokens: timm 1.x Swin blocks and patch-merging reductions
    give (B, H, W, C) where the official code's timm 0.4.12 Swin gives the same values as (B, H·W, C), so its loss
    sums over the H·W tokens (not over H alone, which would scale the loss by W and change Adam's steps in rounding).
    A convolution's (B, C, H, W) output keeps its layout (the official sum is over its channels)."""
    if output.dim() == 4 and not isinstance(unit, nn.Conv2d):
        return lp_loss(output.flatten(1, 2), target.flatten(1, 2))
    return lp_loss(output, target)


def unit_loss(unit: nn.Module, inputs: Samples, targets: Samples) -> torch.Tensor:
    """:func:`token_loss` of ``unit`` on a batch; for :class:`~ptq_bench.transforms.block_capture.BlockInputs` (a
    detector's images of different sizes) the loss of each group of equal shape, weighted by its samples (the official
    code has no detector)."""
    if isinstance(inputs, torch.Tensor):
        return token_loss(unit, unit(inputs), targets)  # type: ignore[arg-type]
    total = torch.zeros(())
    for positions, x, extra in inputs.groups():
        target = torch.cat([targets.tensors[p] for p in positions])  # type: ignore[union-attr]
        total = total.to(x.device) + token_loss(unit, unit(x, *extra), target) * len(positions)
    return total / len(inputs)


def acting_quantizers(unit: nn.Module) -> list[Quantizer]:
    """The quantizers of ``unit`` that act now (enabled)."""
    return [m for m in unit.modules() if isinstance(m, Quantizer) and m.enabled]


def trainable_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``unit`` but the LayerNorm affines (the official code freezes those and the quantizers')."""
    frozen = {id(p) for m in unit.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    return [p for p in unit.parameters() if id(p) not in frozen]


@contextmanager
def literal_gradients(unit: nn.Module) -> Iterator[None]:
    """Inside the context the uniform quantizers of ``unit`` differentiate their literal expression."""
    quantizers = [m for m in unit.modules() if isinstance(m, UniformQuantizer)]
    for q in quantizers:
        q.literal_gradient = True
    try:
        yield
    finally:
        for q in quantizers:
            q.literal_gradient = False


def train_unit(unit: nn.Module, inputs: Samples, targets: Samples, iters: int, batch_size: int, lr: float,
               generator: torch.Generator, desc: str = "", progress: bool = False) -> list[float]:
    """``iters`` Adam steps on :func:`trainable_parameters` of ``unit`` (which must be the only parameters of its
    model that require grad); returns the loss of each step."""
    params = trainable_parameters(unit)
    for p in params:
        p.requires_grad_(True)
    try:
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
        step = ReconStep(optimizer, torch.arange(inputs.shape[0], device=inputs.device), after=schedule.step,
                         always_shuffle=True)
        with literal_gradients(unit):
            return reconstruct_block(unit, inputs, targets, [step], iters, batch_size, generator,
                                     lambda idx: unit_loss(unit, inputs[idx], targets[idx]), desc=desc, progress=progress)
    finally:
        for p in params:
            p.requires_grad_(False)


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """Every quantized Linear and Conv2d of ``model``."""
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
