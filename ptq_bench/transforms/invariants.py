"""Run-time check of transforms that must keep the FP function (LayerNorm→Linear folds, MOSF, any reparameterization).

``with keeps_fp_function(model, data, "RepQ-ViT reparameterization"): ...`` runs a slice of the calibration data
through the model with every quantizer off before and after the transform, comparing each transformer block's
output in forward order (and the model's output when it is a tensor). A relative difference above
:data:`RELATIVE_TOLERANCE` stops the run with one line naming the transform and the first block where the outputs
part: a fold that assumed a pre-norm block on a post-norm one, say, never reaches a record. The cost is two forward
passes of :data:`SAMPLES` samples. The context yields an :class:`InvariantCheck` whose :meth:`~InvariantCheck.record`
is what the run's record shows of the transform (the largest difference measured, what was folded).

Padded windows (mmdet's Swin, :mod:`ptq_bench.architectures.mmdet_swin`): the official detection code pads the
LayerNorm output with zeros before qkv, so a fold moves the padded tokens' projection. A module that pads so offers
``zero_token_projection()`` and ``padding_held(projection)``; both traces hold its padded positions at their
projection before the transform (proving the fold on every real token), and one more trace without the hold measures
how far the official padding moved the FP model (``padded_fp_relative_error``, recorded, not checked).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import InvariantError
from ptq_bench.models.prepare import find_blocks, quantizers_off

#: float32 folds differ from the original by ~1e-6 relative (RepQ-ViT on DeiT-T: 1.1e-6); a wrong fold by O(1).
RELATIVE_TOLERANCE = 1e-3
#: Calibration samples the check runs (the first ones).
SAMPLES = 2

Trace = list[tuple[str, torch.Tensor]]


def _trace(model: nn.Module, data: CalibrationData, batch: Any) -> Trace:
    """Block outputs in call order, then the model output if it is a tensor, all with quantizers off."""
    trace: Trace = []
    def record(name: str, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            trace.append((name, output.detach().clone()))

    handles = [block.register_forward_hook(lambda _m, _a, out, name=name: record(name, out)) for name, block in find_blocks(model)]
    try:
        with torch.no_grad(), quantizers_off(model):
            output = data.forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if isinstance(output, torch.Tensor):
        trace.append(("model output", output.detach().clone()))
    return trace


def _padding_holders(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if callable(getattr(m, "padding_held", None))]


@contextmanager
def _held(holders: list[nn.Module], projections: list[torch.Tensor]) -> Iterator[None]:
    with ExitStack() as stack:
        for module, projection in zip(holders, projections):
            stack.enter_context(module.padding_held(projection))
        yield


def _largest_error(before: Trace, after: Trace) -> float:
    return max((relative_error(ref, value) for (_, ref), (_, value) in zip(before, after)), default=0.0)


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm().clamp_min(1e-12)).item()


@dataclass
class InvariantCheck:
    """One checked transform: its name and the largest relative difference of the FP outputs it caused (NaN until
    the check ran)."""

    transform: str
    max_relative_error: float = math.nan
    #: with zero-padded windows (module docstring): the largest difference without the hold; None without them
    padded_relative_error: float | None = None

    def record(self, **details: Any) -> dict[str, Any]:
        """The record's entry: the transform, the difference measured, the tolerance and ``details`` (what changed)."""
        padded = {} if self.padded_relative_error is None else {
            "padded_fp_relative_error": self.padded_relative_error,
            "padding": "zeros through qkv as the official code; held at the pre-transform projection for the check"}
        return {"transform": self.transform, "fp_relative_error": self.max_relative_error,
                "tolerance": RELATIVE_TOLERANCE, "samples": SAMPLES, **padded, **details}


@contextmanager
def keeps_fp_function(model: nn.Module, data: CalibrationData, transform: str) -> Iterator[InvariantCheck]:
    """Raise :class:`InvariantError` if the code inside the context changed the model's FP function; the yielded
    check holds the largest difference measured once the context exits."""
    check = InvariantCheck(transform)
    batch = data.batch(0, min(SAMPLES, len(data)))
    holders = _padding_holders(model)
    with quantizers_off(model):
        projections = [module.zero_token_projection() for module in holders]
    with _held(holders, projections):
        before = _trace(model, data, batch)
    yield check
    with _held(holders, projections):
        after = _trace(model, data, batch)
    if holders:
        check.padded_relative_error = _largest_error(before, _trace(model, data, batch))
    errors = []
    for (name, reference), (_, value) in zip(before, after):
        error = relative_error(reference, value)
        if not error <= RELATIVE_TOLERANCE:  # NaN fails too
            raise InvariantError(
                f"{transform} changed the FP function: outputs part at '{name}' "
                f"(relative error {error:.2e} > {RELATIVE_TOLERANCE:g} with quantizers off)"
            )
        errors.append(error)
    check.max_relative_error = max(errors, default=0.0)
