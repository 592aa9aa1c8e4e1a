"""MOSF, DopQ-ViT's choice of the per-tensor scale for reparameterized post-LayerNorm activations.

DopQ-ViT (arXiv 2408.03291) keeps RepQ-ViT's channel-wise → layer-wise scale reparameterization but replaces its
target scale s̃ = mean_c(s_c), which outlier channels drag upward. What the abstracts establish (docs/methods/
dopq_vit.md lists the sources): v1 "search for the optimal scaling factor ... compensates abnormal channels and
realizes accurate quantization for most channels"; v2 "median as the optimal scaling factor"; v3 "MAD-guided optimal
scaling factor ... without additional calculations". The formulas were not readable; this module implements the
harness reading:

* target rules ``(scales, zero_points) -> (s̃, z̃)``: ``mean`` (RepQ-ViT), ``median`` (v2), ``mosf`` (the median,
  i.e. the minimizer of the mean absolute deviation Σ|s_c − s̃|, taken over the channels that are not MAD outliers);
* outlier channels: |s_c − med(s)| > κ·MAD(s), MAD(s) = med|s_c − med(s)|;
* compensation (which channels the reparameterization rescales): ``mad`` rescales only the outlier channels (the
  "abnormal channels"); the others keep their LayerNorm scale and are quantized directly with s̃ after an exact
  zero-point shift (folded into the biases), ``all`` rescales every channel (RepQ-ViT, exact for any s̃), ``none``
  rescales and shifts nothing (plain layer-wise quantization with s̃).

Every variant is expressed as *effective* per-channel parameters (s′_c, z′_c) handed to the standard RepQ-ViT
reparameterization with target (s̃, z̃): a channel with s′_c = s̃ gets r₁ = 1 (its weight column is untouched), and
z′_c = z_c·s_c/s̃ keeps its clipping minimum −z_c·s_c, so the reparameterization only shifts it.

Measured (tests/test_dopq_vit.py, planted outlier channels, 4 bits, qkv-output error): with ``all`` the scale s̃ is
irrelevant but the zero point is not: the median's integer z̃ reproduces every channel grid exactly, the mean's
fractional z̃ shifts them (+1.2% error). ``mad`` was *worse* than ``all`` (inliers clipped or coarsened at s̃), so the
method defaults to ``all``; ``mad`` stays available for the ablation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.models.prepare import layernorm_linear_pairs
from ptq_bench.quant.layers import QuantLinear
from ptq_bench.transforms.reparam import TargetFn, mean_target, reparameterize_layernorm_

Compensation = Literal["mad", "all", "none"]

#: Default MAD multiplier for abnormal channels (harness choice; the paper's value is unknown).
DEFAULT_KAPPA = 3.0


def median_target(scales: torch.Tensor, zero_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DopQ-ViT v2's rule: s̃ = median(s), z̃ = median(z) (lower median for an even count; it minimizes Σ|s_c − s̃|)."""
    return scales.median(), zero_points.median()


def mad_outliers(scales: torch.Tensor, kappa: float = DEFAULT_KAPPA) -> torch.Tensor:
    """Boolean mask of the channels whose scale lies more than κ·MAD from the median."""
    deviation = (scales - scales.median()).abs()
    mad = deviation.median()
    return deviation > kappa * mad


def mosf_target(scales: torch.Tensor, zero_points: torch.Tensor, kappa: float = DEFAULT_KAPPA) -> tuple[torch.Tensor, torch.Tensor]:
    """MAD-guided rule: the median (minimum mean absolute deviation) of the scales of the non-outlier channels."""
    inliers = ~mad_outliers(scales, kappa)
    return median_target(scales[inliers], zero_points[inliers])


def target_rule(name: str, kappa: float = DEFAULT_KAPPA) -> TargetFn:
    """The target rule called ``name`` (``mosf``, ``mean`` or ``median``)."""
    if name == "mean":
        return mean_target  # RepQ-ViT's rule
    if name == "median":
        return median_target
    if name == "mosf":
        return lambda s, z: mosf_target(s, z, kappa)
    raise ConfigError(f"unknown scale_factor rule '{name}' (mosf, mean, median)")


def compensated_channels(scales: torch.Tensor, compensation: Compensation, kappa: float = DEFAULT_KAPPA) -> torch.Tensor:
    """Mask of the channels the reparameterization rescales (r₁ = s_c/s̃); the rest keep r₁ = 1."""
    if compensation == "all":
        return torch.ones_like(scales, dtype=torch.bool)
    if compensation == "none":
        return torch.zeros_like(scales, dtype=torch.bool)
    if compensation == "mad":
        return mad_outliers(scales, kappa)
    raise ConfigError(f"unknown compensation '{compensation}' (mad, all, none)")


def effective_channel_params(
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    target: tuple[torch.Tensor, torch.Tensor],
    compensation: Compensation,
    kappa: float = DEFAULT_KAPPA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (s′, z′) that make a RepQ-ViT reparameterization towards ``target`` implement ``compensation``.

    Rescaled channels keep (s_c, z_c). Others get s′ = s̃ (so r₁ = 1) and z′ = z_c·s_c/s̃ (``mad``: the channel is
    shifted so that its clipping minimum lands on the target's) or z′ = z̃ (``none``: no shift at all).
    """
    s_t, z_t = target
    rescale = compensated_channels(scales, compensation, kappa)
    s_t = s_t.expand_as(scales)
    unshifted_zero = z_t.expand_as(zero_points) if compensation == "none" else zero_points * scales / s_t
    return torch.where(rescale, scales, s_t), torch.where(rescale, zero_points, unshifted_zero)


@torch.no_grad()
def mosf_reparameterize_(
    model: nn.Module,
    rule: str = "mosf",
    compensation: Compensation = "all",
    kappa: float = DEFAULT_KAPPA,
    skip_post_norm: bool = False,
) -> list[QuantLinear]:
    """Reparameterize every calibrated per-channel post-LayerNorm quantizer to per tensor, in place.

    The target (s̃, z̃) comes from ``rule`` applied to the calibrated channel parameters; the channels then get
    their effective parameters (:func:`effective_channel_params`) and RepQ-ViT's fold
    (:func:`ptq_bench.transforms.reparam.reparameterize_layernorm_`) does the rest. Returns the edited Linears,
    whose weight quantizers must be calibrated again. ``skip_post_norm`` leaves blocks that are not pre-norm alone.
    """
    rule_fn = target_rule(rule, kappa)
    targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for pair in layernorm_linear_pairs(model, skip_post_norm):
        quantizer = getattr(pair.linears[0], "input_quantizer", None) if len(pair.linears) == 1 else None
        if quantizer is None or not quantizer.foldable or not quantizer.calibrated:
            continue  # reparameterize_layernorm_ reports the exact problem
        scales, zero_points = quantizer.scale.reshape(-1), quantizer.zero_point.reshape(-1)
        target = rule_fn(scales, zero_points)
        s_eff, z_eff = effective_channel_params(scales, zero_points, target, compensation, kappa)
        quantizer.set_params(s_eff.reshape(quantizer.scale.shape), z_eff.reshape(quantizer.zero_point.shape))
        targets[quantizer.scale.data_ptr()] = target
    # reparameterize_layernorm_ calls the target function with views of each quantizer's scale buffer: key by storage
    return reparameterize_layernorm_(model, lambda scales, _zero_points: targets[scales.data_ptr()], skip_post_norm)
