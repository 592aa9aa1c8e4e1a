"""APHQ-ViT's average perturbation Hessian (Wu et al., CVPR 2025, Sec. 3.2; GoatWu/APHQ-ViT @ 84c9fde).

For a module m of the FP model the diagonal Hessian of the task loss w.r.t. m's output is approximated by the change
of the gradient under a small perturbation of that output: H ≈ |g(y + ε) - g(y - ε)| with ε = 1e-6 on every element,
g the gradient of KL(softmax(f(x)/T) ‖ softmax(f_y(x)/T)) (``batchmean``, T = 20) w.r.t. y, the target the FP
model's own unperturbed prediction (utils/block_recon.py ``init_block_perturb_hessian``, utils/mlp_recon.py). The
"average" is the mean over the calibration samples (``use_mean_hessian``): one (1, *y.shape[1:]) weight.
The reconstruction loss is then mean((ŷ - y)²·H) (:func:`aph_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError

EPSILON = 1e-6


def prediction_targets(fp_model: nn.Module, data: CalibrationData, batch_size: int, temperature: float) -> list[torch.Tensor]:
    """softmax(f(x)/T) of each calibration batch (the KL targets, ``raw_pred_softmaxs``)."""
    if not data.logits:
        raise ConfigError("the perturbation Hessian needs a task whose forward returns class logits")
    with torch.no_grad():
        return [F.softmax(data.forward(fp_model, batch) / temperature, dim=-1) for batch in data.batches(batch_size)]


def perturbation_hessian(
    fp_model: nn.Module, module: nn.Module, data: CalibrationData, batch_size: int, temperature: float,
    targets: list[torch.Tensor], mean: bool = True,
) -> torch.Tensor:
    """|g₊ - g₋| of ``module``'s output over the calibration data (batches of ``batch_size``, ``targets`` from
    :func:`prediction_targets`), averaged over the samples when ``mean``. ``fp_model`` needs no parameter gradients."""
    plus = _perturbed_gradients(fp_model, module, data, batch_size, temperature, targets, EPSILON)
    minus = _perturbed_gradients(fp_model, module, data, batch_size, temperature, targets, -EPSILON)
    hessian = (plus - minus).abs()
    return hessian.mean(dim=0, keepdim=True) if mean else hessian


def _perturbed_gradients(
    fp_model: nn.Module, module: nn.Module, data: CalibrationData, batch_size: int, temperature: float,
    targets: list[torch.Tensor], shift: float,
) -> torch.Tensor:
    """The KL gradient w.r.t. ``module``'s output with ``shift`` added to every element of it (``x + 1·ε``, or
    ``x - 1·ε`` for a negative shift, as the official forwards write it), concatenated over the batches."""
    leaves: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        leaves.append(leaf)
        ones = torch.ones_like(leaf)
        return leaf + ones * shift if shift > 0 else leaf - ones * -shift

    handle = module.register_forward_hook(hook)
    try:
        for batch, target in zip(data.batches(batch_size), targets):
            logits = data.forward(fp_model, batch) / temperature
            F.kl_div(F.log_softmax(logits, dim=-1), target, reduction="batchmean").backward()
    finally:
        handle.remove()
    return torch.cat([leaf.grad for leaf in leaves])  # type: ignore[misc]


def aph_loss(output: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """mean((ŷ - y)²·|H|) (``LossFunction`` with ``hessian_perturb``)."""
    return ((output - target).pow(2) * hessian.abs()).mean()
