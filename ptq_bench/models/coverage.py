"""Coverage: every quantizer a method created observed data during calibration and ran during evaluation.

A swapped-in quantized layer can be bypassed: torch's fused transformer fast path reads weights directly, and a
module may call a submodule's weight instead of the submodule. The model then runs partly in FP while its record
names a bit-width. :func:`check_calibrated` (after calibration) and :func:`tracking_calls` / :func:`check_ran`
(around evaluation) turn that into a one-line error before any record is written; :func:`quantized_modules` lists
what was quantized for the record.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ptq_bench.errors import CoverageError, NumericalError
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul

QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul)
#: Shown with a coverage error: what usually makes a quantized module silent.
LIKELY_CAUSE = "a fused fast path or a module that reads a weight directly bypasses them"


def _quantizers(layer: nn.Module) -> dict[str, Quantizer]:
    return {name: q for name, q in layer.named_children() if isinstance(q, Quantizer)}


def quantized_modules(model: nn.Module) -> list[dict[str, Any]]:
    """Every quantized layer with its enabled quantizers: ``{"module", "kind", "quantizers": {slot: {role, bits, quantizer}}}``."""
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        slots = {
            slot: {"role": q.role, "bits": q.bits, "quantizer": type(q).__name__}
            for slot, q in _quantizers(layer).items()
            if q.enabled
        }
        if slots:
            rows.append({"module": name, "kind": type(layer).__name__, "quantizers": slots})
    return rows


def _summary(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_calibrated(model: nn.Module, hint: str | None = None) -> None:
    """Raise one line naming the enabled quantizers that never observed data (their layer never ran), or whose
    calibrated parameters are not finite; ``hint``: the task's likeliest reason for a layer that never ran."""
    silent = [
        f"{name}.{slot}"
        for name, layer in model.named_modules()
        if isinstance(layer, QUANT_LAYERS)
        for slot, q in _quantizers(layer).items()
        if q.enabled and not q.calibrated
    ]
    if silent:
        cause = f"{hint}; otherwise {LIKELY_CAUSE}" if hint else LIKELY_CAUSE
        raise CoverageError(f"{len(silent)} quantizer(s) never observed data during calibration: {_summary(silent)} ({cause})")
    broken = [
        name
        for name, module in model.named_modules()
        if isinstance(module, Quantizer) and module.enabled
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if broken:
        raise NumericalError(f"calibration gave NaN or Inf quantizer parameters: {_summary(sorted(set(broken)))}")


@contextmanager
def tracking_calls(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the forward calls of every quantized layer while the context is open."""
    counts: dict[str, int] = {}
    handles = []
    for name, layer in model.named_modules():
        if isinstance(layer, QUANT_LAYERS) and any(q.enabled for q in _quantizers(layer).values()):
            counts[name] = 0
            handles.append(layer.register_forward_pre_hook(lambda _m, _a, name=name: counts.__setitem__(name, counts[name] + 1)))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def check_ran(counts: dict[str, int]) -> None:
    """Raise one line naming the quantized layers that never ran while their calls were tracked."""
    silent = [name for name, calls in counts.items() if calls == 0]
    if silent:
        raise CoverageError(f"{len(silent)} quantized module(s) never ran during evaluation: {_summary(silent)} ({LIKELY_CAUSE})")
