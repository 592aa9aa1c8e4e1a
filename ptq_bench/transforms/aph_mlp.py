"""APHQ-ViT's MLP reconstruction (Sec. 3.3; GoatWu/APHQ-ViT @ 84c9fde, utils/mlp_recon.py ``MLPReconstructor``).

Before calibration every block's MLP activation is swapped from GELU to ReLU and fc1/fc2 are retrained so that the
ReLU MLP reproduces the FP (GELU) MLP's output, block by block on the FP model's MLP inputs:

    loss = Σ_tokens ((ŷ - y)²·H)/10 + ``quant_weight``·Σ_tokens ((ŷ_c - y)²·H)/10   (averaged over the rest)

ŷ the ReLU MLP's output, ŷ_c the same with fc2's input clamped to [0, ub] (ub the ``pct`` percentile of the positive
FP GELU outputs: what a post-ReLU 0-based grid keeps), y the FP output, H the MLP output's average perturbation
Hessian (:mod:`ptq_bench.transforms.aph`) scaled to unit root mean square. Adam at ``lr``, cosine to 0, batches of
``batch_size`` drawn as ``randperm(n)[:batch_size]``. The official optimizer also holds norm2's weight and bias,
which get no gradient (the MLP input is fixed), so they do not change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.adalog_search import positive_percentile
from ptq_bench.models import find_blocks
from ptq_bench.transforms.aph import perturbation_hessian, prediction_targets
from ptq_bench.transforms.block_capture import block_outputs, capture_block_inputs
from ptq_bench.transforms.qdrop import skip_loader_seeds
from ptq_bench.transforms.reconstruction import ReconStep, reconstruct_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MLPReconstruction:
    iters: int
    lr: float
    quant_weight: float
    pct: float
    batch_size: int
    temperature: float


def block_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every transformer block's MLP (``block.mlp`` with ``fc1``, ``act``, ``fc2``), in forward order."""
    mlps = []
    for name, block in find_blocks(model):
        mlp = getattr(block, "mlp", None)
        if not all(isinstance(getattr(mlp, a, None), nn.Module) for a in ("fc1", "act", "fc2")):
            raise ConfigError(f"MLP reconstruction: block {name} has no timm-style mlp (fc1, act, fc2)")
        mlps.append((name, mlp))
    return mlps


def swap_to_relu_(model: nn.Module) -> None:
    """GELU → ReLU in every block's MLP (test_quant.py ``--reconstruct-mlp``)."""
    for _, mlp in block_mlps(model):
        mlp.act = nn.ReLU()


def unit_rms(hessian: torch.Tensor, name: str) -> torch.Tensor:
    """``hessian`` scaled to unit root mean square (the fork's normalization), refused where that is not finite.

    The shift of every element of an MLP output is cancelled by the LayerNorms after it, so the perturbation Hessian
    is float rounding noise; with logits near zero (an untrained model) it falls to about 1e-20, its squares underflow
    and the scale overflows: the official code then trains NaN weights (seen on a tiny Swin with timm's init)."""
    scaled = hessian * torch.sqrt(hessian.numel() / hessian.pow(2).sum())
    if not torch.isfinite(scaled).all():
        raise ConfigError(f"MLP reconstruction of block {name}: the perturbation Hessian (max {hessian.abs().max().item():.3g}) "
                          "is too small to scale to unit RMS in float32 (the official code would train NaN weights)")
    return scaled


def positive_quantile(x: torch.Tensor, pct: float) -> float:
    """``mlp_recon.positive_percentile``: the ``pct`` percentile of the positive entries (rank ceil(count·pct) - 1)."""
    return positive_percentile(x.reshape(-1), torch.tensor([pct], device=x.device)).item()


def reconstruct_mlps_(model: nn.Module, fp_model: nn.Module, data: CalibrationData, cfg: MLPReconstruction,
                      generator: torch.Generator, progress: bool = False) -> list[float]:
    """Swap every MLP of ``model`` to ReLU and retrain it against ``fp_model``'s GELU MLP; returns the final losses
    (``progress``: a bar per MLP's iterations; each MLP's first and last loss are logged)."""
    swap_to_relu_(model)
    fp_mlps = dict(block_mlps(fp_model))
    targets = prediction_targets(fp_model, data, cfg.batch_size, cfg.temperature)
    finals = []
    for name, mlp in block_mlps(model):
        fp_mlp = fp_mlps[name]
        x = capture_block_inputs(fp_model, fp_mlp, data, cfg.batch_size)
        if not isinstance(x, torch.Tensor):
            raise ConfigError("MLP reconstruction needs MLP inputs of one shape")
        y = block_outputs(fp_mlp, x, cfg.batch_size)
        fc2_in = capture_block_inputs(fp_model, fp_mlp.fc2, data, cfg.batch_size)
        hessian = unit_rms(perturbation_hessian(fp_model, fp_mlp, data, cfg.batch_size, cfg.temperature, targets), name)
        skip_loader_seeds(generator, 3)  # the official passes: inputs/outputs, then the two perturbed ones
        ub = positive_quantile(fc2_in, cfg.pct)
        history = _train(mlp, x, y, hessian, ub, cfg, generator, f"MLP reconstruction {name}", progress)
        if history:
            log.info("MLP reconstruction %s: loss %.4g -> %.4g", name, history[0], history[-1])
        finals.append(history[-1] if history else float("nan"))
    return finals


def _train(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, hessian: torch.Tensor, ub: float,
           cfg: MLPReconstruction, generator: torch.Generator, desc: str, progress: bool) -> list[float]:
    params = [p for m in (mlp.fc1, mlp.fc2) for p in (m.weight, m.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iters, eta_min=0.0)
    weight = hessian.abs()

    def objective(idx: torch.Tensor) -> torch.Tensor:
        inp, target = x[idx], y[idx]
        rec = ((mlp(inp) - target).pow(2) * weight).sum(1).mean() / 10
        clamped = mlp.fc2(torch.clamp(mlp.act(mlp.fc1(inp)), 0, ub))
        quant = ((clamped - target).pow(2) * weight).sum(1).mean() / 10
        return rec + quant * cfg.quant_weight

    step = ReconStep(optimizer, torch.arange(x.shape[0], device=x.device), after=schedule.step, always_shuffle=True)
    try:
        return reconstruct_block(mlp, x, y, [step], cfg.iters, cfg.batch_size, generator, objective, desc, progress)
    finally:
        for p in params:
            p.requires_grad_(False)
