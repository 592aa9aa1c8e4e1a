"""APHQ-ViT's perturbation Hessian on a detector (GoatWu/APHQ-ViT @ 84c9fde, Object-Detection/tools/quant_utils/
block_recon.py ``init_block_raw_grad``, ``binary_kl``; mlp_recon.py ``init_block_raw_grad``).

The detection fork weighs a unit's reconstruction error by how the *RPN outputs* react to that unit's output: for
each calibration image (batch 1) the FP model runs with ``+ε`` and then ``-ε`` (ε = 1e-3) added to every element of
the unit's output, and the gradient g of

    L = L_cls / sg(L_cls) + L_box / sg(L_box)
    L_cls = Σ_levels binary_KL(sigmoid(cls), p),  L_box = Σ_levels smooth_L1(box·m, box_fp·m)  (means)

w.r.t. that output is taken, with p = sigmoid of the FP model's own RPN scores, box_fp its box deltas and m the
anchors whose FP score exceeds 0.7 (repeated over their four deltas); sg is stop-gradient. The image's Hessian is
H = |g₊ - g₋| scaled to mean 1 (``grad * numel / sum``). Unlike the classification code there is no average over
images: each image keeps its own H.

Only the RPN outputs enter L, so each pass stops once the RPN head has run (the rest of the detector's test forward
cannot change the gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.transforms.block_capture import StopForward

EPSILON = 1e-3
#: anchors whose FP objectness exceeds this take part in the box term
SCORE_THRESHOLD = 0.7

#: one image's RPN outputs: (objectness logits per level, box deltas per level)
RpnOutputs = tuple[list[torch.Tensor], list[torch.Tensor]]


def rpn_head_of(model: nn.Module) -> nn.Module:
    head = getattr(model, "rpn_head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"the detection Hessian needs a two-stage detector with an rpn_head; {type(model).__name__} has none")
    return head


def rpn_outputs(model: nn.Module, data: CalibrationData, index: int) -> RpnOutputs:
    """The RPN head's outputs on calibration image ``index`` (its forward stopped right after the head)."""
    captured: list[Any] = []

    def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        captured.append(output)
        raise StopForward

    handle = rpn_head_of(model).register_forward_hook(hook)
    try:
        data.forward(model, data.batch(index, index + 1))
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ConfigError("the detector's forward did not call its rpn_head")
    cls, box = captured[0]
    return list(cls), list(box)


def rpn_targets(fp_model: nn.Module, data: CalibrationData) -> list[RpnOutputs]:
    """(sigmoid of the FP objectness, FP box deltas) per level, for every calibration image."""
    targets = []
    with torch.no_grad():
        for i in range(len(data)):
            cls, box = rpn_outputs(fp_model, data, i)
            if not any(bool((torch.sigmoid(c) > SCORE_THRESHOLD).any()) for c in cls):
                raise ConfigError(f"calibration image {i}: no RPN objectness above {SCORE_THRESHOLD}, so the detection "
                                  "Hessian's box term is 0/0 (the official code would train on NaN)")
            targets.append(([torch.sigmoid(c) for c in cls], box))
    return targets


def binary_kl(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary KL(target ‖ prob), both clamped to [1e-7, 1 - 1e-7]."""
    p = torch.clamp(prob, min=1e-7, max=1 - 1e-7)
    t = torch.clamp(target, min=1e-7, max=1 - 1e-7)
    return (t * (torch.log(t) - torch.log(p)) + (1 - t) * (torch.log(1 - t) - torch.log(1 - p))).mean()


def rpn_loss(outputs: RpnOutputs, target: RpnOutputs) -> torch.Tensor:
    """L above: each term divided by its own (detached) value."""
    cls_terms, box_terms = [], []
    for cls, box, prob, box_fp in zip(outputs[0], outputs[1], target[0], target[1]):
        cls_terms.append(binary_kl(torch.sigmoid(cls), prob))
        mask = (prob > SCORE_THRESHOLD).repeat_interleave(4, dim=1).contiguous()
        box_terms.append(F.smooth_l1_loss(box * mask, box_fp * mask, reduction="mean"))
    cls_loss, box_loss = sum(cls_terms), sum(box_terms)
    return cls_loss / cls_loss.detach() + box_loss / box_loss.detach()  # type: ignore[union-attr]


def first_tensor(output: Any) -> torch.Tensor:
    """A unit's output tensor (mmdet's PatchEmbed and PatchMerging return it with the feature-map size)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def perturbed_gradients(fp_model: nn.Module, unit: nn.Module, data: CalibrationData, targets: list[RpnOutputs],
                        shift: float) -> list[torch.Tensor]:
    """g of every image with ``shift`` added to each element of ``unit``'s output (``x + 1·ε`` / ``x - 1·ε``)."""
    grads: list[torch.Tensor] = []
    for i, target in enumerate(targets):
        leaves: list[torch.Tensor] = []

        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            leaf = first_tensor(output).detach().requires_grad_(True)
            leaves.append(leaf)
            ones = torch.ones_like(leaf)
            return _replace_first(output, leaf + ones * shift if shift > 0 else leaf - ones * -shift)

        handle = unit.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                rpn_loss(rpn_outputs(fp_model, data, i), target).backward()
        finally:
            handle.remove()
        if len(leaves) != 1:
            raise ConfigError(f"the detection Hessian needs a unit called once per image; {type(unit).__name__} ran {len(leaves)} times")
        grads.append(leaves[0].grad)  # type: ignore[arg-type]
    return grads


def perturbation_hessians(fp_model: nn.Module, unit: nn.Module, data: CalibrationData,
                          targets: list[RpnOutputs]) -> list[torch.Tensor]:
    """|g₊ - g₋| of every image, each scaled to mean 1 (module docstring)."""
    plus = perturbed_gradients(fp_model, unit, data, targets, EPSILON)
    minus = perturbed_gradients(fp_model, unit, data, targets, -EPSILON)
    hessians = []
    for i, (p, m) in enumerate(zip(plus, minus)):
        h = (p - m).abs()
        total = h.sum()
        if not torch.isfinite(total) or total == 0:
            raise ConfigError(f"the detection Hessian of {type(unit).__name__} on calibration image {i} is {total.item():.3g}: "
                              "it cannot be scaled to mean 1")
        hessians.append(h * h.numel() / total)
    return hessians


def hessian_loss(output: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Σ (ŷ - y)²·|H| over every element (``LossFunction`` with ``hessian_perturb`` in the detection fork)."""
    return ((output - target).pow(2) * hessian.abs()).sum()
