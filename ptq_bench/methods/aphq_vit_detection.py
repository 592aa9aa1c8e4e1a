"""QDrop and APHQ-ViT on an mmdet Swin detector, as the detection fork runs them (GoatWu/APHQ-ViT @ 84c9fde,
Object-Detection/tools/test.py with quant_configs/4bit.py; quant_utils/{calibrator,mlp_recon,block_recon}.py).

The fork differs from the classification code in every stage; what is followed here:

* **Data.** Calibration and reconstruction images are consumed one at a time (batch 1; ``method.batch_size`` must
  be 1). The search uses the first ``search_size`` images (the config's calib_size = 1), the reconstructions all
  of them (optim_size = 256; ``calib_size`` here).
* **MLP reconstruction** (APHQ-ViT): every SwinBlock's FFN gets ReLU, and block by block its fc1/fc2 are retrained
  on the FP (GELU) model's FFN inputs, one image per step in turn (``it % n``), with the per-image RPN perturbation
  Hessian (:mod:`ptq_bench.transforms.aph_detection`) in the loss Σ_tokens((ŷ - y)²·H)/10 + w·Σ_tokens((ŷ_c - y)²·H)/10
  (mean over the rest); ub of the clamp is the ``mlp_pct`` percentile of the positive fc2 inputs of the first 128
  images. Code over paper: the fork never clears the ``-ε`` perturbation of an FFN after its Hessian (it resets the
  flags on the block, not on the MLP), so from then on that FFN's output in the FP teacher is shifted by -1e-3,
  for the later FFNs' captures and Hessians and for the whole block reconstruction. That is reproduced.
* **Calibration**: every Conv2d and Linear of the detector (backbone, FPN, RPN, RoI heads) and the two attention
  matmuls; one forward of each search image per layer, all of a layer's calls kept (a Linear's and a matmul's
  concatenated, a conv's as a list: the RPN convs run once per FPN level; a window attention's qkv on the LayerNorm
  output padded with zeros, rolled, cut into windows, as mmdet's and the fork's Swin run it, so that with one search
  image its input search scores the first window, as the fork's does); the searches of
  :mod:`ptq_bench.methods.aphq_vit_detection_search`. A conv's input is quantized per tensor at a bits (the
  patch embedding's at 8 bits, which the fork's conv leaves float).
* **Block reconstruction**: units PatchEmbed, every SwinBlock, PatchMerging and the FPN, in module order (the RPN and
  RoI heads keep their calibrated grids and nearest rounding). One image per step in turn; the unit input mixed per
  element from the quantized and FP model's inputs with probability ``drop_prob``; inside the unit only the Linear
  inputs drop quantization (the fork's ``set_qdrop`` and ``init_training`` reach neither the conv inputs nor the
  matmul operands). Loss: for a backbone unit Σ (ŷ - y)²·H with the unit's RPN perturbation Hessian (APHQ-ViT) or
  the mean squared error (QDrop, ``optim_metric = 'mse'``); for the FPN the mean squared error over all levels;
  divided by its first value and doubled, plus the rounding regularizer, as in the classification code. The masks
  come from one generator in the fork's order and layouts (the fork draws ``rand_like`` from its global generator):
  per unit first the seeds of its loader passes (2, 4 with a Hessian), then per step the input mix and each Linear
  input in call order, the patch merging's over the fork's channel order.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.adalog_search import positive_percentile
from ptq_bench.quant.layers import QuantConv2d, QuantLinear
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.aph_detection import EPSILON, hessian_loss, perturbation_hessians, rpn_targets
from ptq_bench.transforms.block_capture import BlockInputs
from ptq_bench.transforms.detector_units import UnitCalls, capture_unit_calls, mixed_unit_input, run_unit
from ptq_bench.transforms.qdrop import MaskDraw, dropping_activations, mask_like, skip_loader_seeds
from ptq_bench.transforms.reconstruction import ReconStep, frozen_parameters, reconstruct_block
from ptq_bench.transforms.unit_training import UnitTraining, official_gradients, train_unit

log = logging.getLogger(__name__)

#: images whose fc2 inputs give the MLP clamp's percentile (``positive_percentile``: ``tensor[:128]``)
PERCENTILE_IMAGES = 128


# ------------------------------------------------------------------------------------------------ calibration


def layer_calls(model: nn.Module, layer: nn.Module, data: CalibrationData) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Every call of ``layer`` in the FP forward of each calibration image: per argument the list of its tensors
    over the calls, and the list of outputs (``QuantCalibrator`` hooks, batch 1). A window attention's qkv sees the
    zero-padded, rolled windows (``(windows, ws², C)``), as the fork's ``WindowAttention.qkv`` does."""
    inputs: list[list[torch.Tensor]] = []
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        for k, a in enumerate(args):
            if k == len(inputs):
                inputs.append([])
            inputs[k].append(a.detach())
        outputs.append(output.detach())

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for i in range(len(data)):
                data.forward(model, data.batch(i, i + 1))
    finally:
        handle.remove()
    if not outputs:
        raise ConfigError(f"a {type(layer).__name__} of the detector was not called on the calibration images")
    return inputs, outputs


# ------------------------------------------------------------------------------------------------ units


def _mmdet_types() -> tuple[type, ...]:
    from mmdet.models.backbones.swin import SwinBlock
    from mmdet.models.layers.transformer.utils import PatchEmbed, PatchMerging
    from mmdet.models.necks import FPN

    return PatchEmbed, SwinBlock, PatchMerging, FPN


def detector_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fork's reconstruction units (``types_of_block``) in module order: PatchEmbed, SwinBlock, PatchMerging, FPN."""
    types = _mmdet_types()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, types)]


def is_neck(unit: nn.Module) -> bool:
    return isinstance(unit, _mmdet_types()[3])


def swin_ffns(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """Every SwinBlock's MLP: mmcv ``FFN.layers`` = [Sequential(fc1, act, drop), fc2, drop] (the fork's ``mlp``)."""
    swin_block = _mmdet_types()[1]
    ffns = []
    for name, module in model.named_modules():
        if isinstance(module, swin_block):
            layers = getattr(module.ffn, "layers", None)
            if not (isinstance(layers, nn.Sequential) and len(layers) >= 2 and isinstance(layers[0], nn.Sequential)
                    and isinstance(layers[0][0], nn.Linear) and isinstance(layers[1], nn.Linear)):
                raise ConfigError(f"MLP reconstruction: {name}.ffn is not a 2-layer mmcv FFN")
            ffns.append((f"{name}.ffn.layers", layers))
    return ffns


# ------------------------------------------------------------------------------------------------ MLP reconstruction


def reconstruct_detector_mlps_(model: nn.Module, fp_model: nn.Module, data: CalibrationData, iters: int, lr: float,
                               quant_weight: float, pct: float, progress: bool = False) -> list[float]:
    """``MLPReconstructor.reconstruct_model`` on a detector (module docstring); returns each FFN's final loss."""
    ffns = swin_ffns(model)
    for _, layers in ffns:
        layers[0][1] = nn.ReLU()
    fp_ffns = dict(swin_ffns(fp_model))
    targets = rpn_targets(fp_model, data)
    finals = []
    for name, layers in tqdm(ffns, desc="MLP reconstruction", disable=not progress):
        fp_layers = fp_ffns[name]
        calls = capture_unit_calls(fp_model, fp_layers, data)
        fc2_inputs = capture_unit_calls(fp_model, fp_layers[1], data, limit=PERCENTILE_IMAGES).inputs
        hessians = perturbation_hessians(fp_model, fp_layers, data, targets)
        fp_layers.register_forward_hook(_shifted_down)  # the fork's perturbation left on (module docstring)
        flat = torch.cat([x.reshape(-1) for x in fc2_inputs])  # type: ignore[union-attr]
        ub = positive_percentile(flat, torch.tensor([pct], device=flat.device)).item()
        finals.append(_train_ffn(layers, calls, hessians, ub, iters, lr, quant_weight))
        log.info("MLP reconstruction %s: ub %.4g, final loss %.4g", name, ub, finals[-1])
    return finals


def _shifted_down(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output - torch.ones_like(output) * EPSILON


def _train_ffn(layers: nn.Sequential, calls: UnitCalls, hessians: list[torch.Tensor], ub: float, iters: int,
               lr: float, quant_weight: float) -> float:
    fc1, act, fc2 = layers[0][0], layers[0][1], layers[1]
    params = [p for m in (fc1, fc2) for p in (m.weight, m.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)

    def objective(idx: torch.Tensor) -> torch.Tensor:
        i = int(idx[0])
        x, y, h = calls.inputs[i], calls.outputs[i][0], hessians[i].abs()
        rec = ((layers(x) - y).pow(2) * h).sum(1).mean() / 10
        quant = ((fc2(torch.clamp(act(fc1(x)), 0, ub)) - y).pow(2) * h).sum(1).mean() / 10
        return rec + quant * quant_weight

    n = len(calls)
    step = ReconStep(optimizer, torch.arange(n), after=schedule.step, in_order=True)
    try:
        history = reconstruct_block(layers, _counter(calls), _counter(calls), [step], iters, 1, torch.Generator(), objective)
    finally:
        for p in params:
            p.requires_grad_(False)
    return history[-1] if history else float("nan")


def _counter(calls: UnitCalls) -> BlockInputs:
    """The samples as the training loop counts them (its objective reads the calls itself)."""
    first = [x if isinstance(x, torch.Tensor) else x[0] for x in calls.inputs]
    return BlockInputs(first, [()] * len(first))


# ------------------------------------------------------------------------------------------------ block reconstruction


def _fork_masks(unit: nn.Module) -> MaskDraw:
    """The QDrop masks laid out as the fork draws them (``rand_like`` of the tensor its quantizer sees; a window
    attention's qkv input is the fork's padded, rolled windows already): a patch merging's reduction input over the
    fork's channel order (x0, x1, x2, x3 concatenated), put in ours (nn.Unfold's)."""
    merging = {id(module.reduction.input_quantizer) for module in unit.modules()
               if isinstance(module, _mmdet_types()[2]) and getattr(module.reduction, "input_quantizer", None) is not None}

    def draw(quantizer: nn.Module, x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
        if id(quantizer) not in merging:
            return mask_like(x, prob, generator)
        draws = torch.empty_like(x).uniform_(generator=generator)  # the fork's concat order, put in nn.Unfold's
        lead, channels = x.shape[:-1], x.shape[-1] // 4
        return draws.view(*lead, 4, channels)[..., [0, 2, 1, 3], :].transpose(-1, -2).reshape(x.shape) < prob

    return draw


def has_quantized_layers(module: nn.Module) -> bool:
    """Whether ``module`` holds a quantized Linear or Conv2d (a unit worth reconstructing)."""
    return any(isinstance(m, (QuantLinear, QuantConv2d)) for m in module.modules())


def _linear_inputs(unit: nn.Module, activations: list[UniformQuantizer]) -> list[UniformQuantizer]:
    """The activation quantizers on a Linear's input (the only ones the fork's QDrop drops)."""
    acting = {id(q) for q in activations}
    return [m.input_quantizer for m in unit.modules()
            if isinstance(m, QuantLinear) and m.input_quantizer is not None and id(m.input_quantizer) in acting]


def reconstruct_detector_(model: nn.Module, fp_model: nn.Module, data: CalibrationData, training: UnitTraining,
                          drop_prob: float, hessian: bool, generator: torch.Generator, desc: str,
                          progress: bool = False) -> None:
    """``BlockReconstructor.reconstruct_model`` on a detector (qdrop mode, activation steps learned)."""
    targets = rpn_targets(fp_model, data) if hessian else None
    device = next(model.parameters()).device
    masks = generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(generator.initial_seed())
    fp_units = dict(detector_units(fp_model))
    with frozen_parameters(model):
        units = [(name, unit) for name, unit in detector_units(model) if has_quantized_layers(unit)]
        if not units:
            raise ConfigError(f"{desc}: the detector has no PatchEmbed, SwinBlock, PatchMerging or FPN to reconstruct")
        for name, unit in tqdm(units, desc=f"{desc} units", disable=not progress):
            fp_unit = fp_units[name]
            fp_calls = capture_unit_calls(fp_model, fp_unit, data)
            q_inputs = capture_unit_calls(model, unit, data).inputs
            neck = is_neck(unit)
            hessians = perturbation_hessians(fp_model, fp_unit, data, targets) if targets is not None and not neck else None
            # the fork's passes over its loader before the unit trains (FP input/output, quantized input, the two
            # perturbed passes of a Hessian unit): one base seed each from the generator its masks draw from
            skip_loader_seeds(masks, 2 + (2 if hessians is not None else 0))
            history = _train_unit(unit, fp_calls, q_inputs, hessians, neck, training, drop_prob, masks, f"{desc} {name}", progress)
            log.info("%s %s: loss %.4g -> %.4g", desc, name, history[0], history[-1])


def _train_unit(unit: nn.Module, fp_calls: UnitCalls, q_inputs: list[Any], hessians: list[torch.Tensor] | None,
                neck: bool, training: UnitTraining, drop_prob: float, masks: torch.Generator, desc: str,
                progress: bool) -> list[float]:
    """One unit's steps; ``masks`` draws the QDrop masks (a generator on the unit's device)."""
    activations = [q for q in unit.modules() if isinstance(q, UniformQuantizer) and q.role != "weight" and q.enabled]
    state = {"count": 0, "init": 1.0}

    def rec_loss(out: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, ...], i: int) -> torch.Tensor:
        if neck:
            return (torch.cat([t.reshape(-1) for t in out]) - torch.cat([t.reshape(-1) for t in target])).abs().pow(2).mean()
        if hessians is not None:
            return hessian_loss(out[0], target[0], hessians[i])
        return (out[0] - target[0]).abs().pow(2).mean()

    def normalized(idx: torch.Tensor) -> torch.Tensor:
        i = int(idx[0])
        state["count"] += 1
        x = mixed_unit_input(q_inputs[i], fp_calls.inputs[i], drop_prob, masks)
        rec = rec_loss(run_unit(unit, x, fp_calls.extras[i]), fp_calls.outputs[i], i)
        if state["count"] == 1:
            state["init"] = rec.item()
        return rec * 2 / state["init"]

    counter = _counter(fp_calls)
    with official_gradients(activations):
        return train_unit(unit, counter, counter, normalized, activations, training, masks, desc, progress,
                          during=dropping_activations(_linear_inputs(unit, activations), drop_prob, masks,
                                                     _fork_masks(unit)))
