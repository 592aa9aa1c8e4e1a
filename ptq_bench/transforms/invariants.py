"""Run-time check of transforms that must keep the FP function (LayerNorm→Linear folds, MOSF, any reparameterization).

``with keeps_fp_function(model, data, "RepQ-ViT reparameterization"): ...`` runs a slice of the calibration data
through the model with every quantizer off before and after the transform, comparing each transformer block's
output in forward order (and the model's output when it is a tensor). A relative difference above
:data:`RELATIVE_TOLERANCE` stops the run with one line naming the transform and the first block where the outputs
part: a fold that assumed a pre-norm block on a post-norm one, say, never reaches a record. The cost is two forward
passes of :data:`SAMPLES` samples. The context yields an :class:`InvariantCheck` whose :meth:`~InvariantCheck.record`
is what the run's record shows of the transform (the largest difference measured, what was folded).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
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


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm().clamp_min(1e-12)).item()


@dataclass
class InvariantCheck:
    """One checked transform: its name and the largest relative difference of the FP outputs it caused (NaN until
    the check ran)."""

    transform: str
    max_relative_error: float = math.nan

    def record(self, **details: Any) -> dict[str, Any]:
        """The record's entry: the transform, the difference measured, the tolerance and ``details`` (what changed)."""
        return {"transform": self.transform, "fp_relative_error": self.max_relative_error,
                "tolerance": RELATIVE_TOLERANCE, "samples": SAMPLES, **details}


@contextmanager
def keeps_fp_function(model: nn.Module, data: CalibrationData, transform: str) -> Iterator[InvariantCheck]:
    """Raise :class:`InvariantError` if the code inside the context changed the model's FP function; the yielded
    check holds the largest difference measured once the context exits."""
    check = InvariantCheck(transform)
    batch = data.batch(0, min(SAMPLES, len(data)))
    before = _trace(model, data, batch)
    yield check
    after = _trace(model, data, batch)
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
