"""Recording FP inputs, outputs and output gradients of layers for PTQ4ViT's parallel calibration.

This follows utils/quant_calib.py (``HessianQuantCalibrator.batching_quant_calib``, hahnyuan/PTQ4ViT):
* pseudo-labels are the FP softmax of one forward pass over the whole calibration set;
* the recorded tensors come from fwd/bwd passes over ``batch_size`` images. The loss is
  ``kl_div(log_softmax(logits), pseudo_label, reduction="batchmean")``. Every layer runs in FP during these passes.

The official code makes one pass per layer. We record groups of layers per pass. This is exact, because the
model is FP in every pass, so all passes see the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.calibration import CalibrationData

NamedLayer = tuple[str, nn.Module]


@dataclass
class Recording:
    """One layer's calibration data: positional inputs, output and dLoss/dOutput, concatenated over batches."""

    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)

    def input(self, index: int = 0) -> torch.Tensor:
        return torch.cat([batch[index] for batch in self.inputs], dim=0)

    def output(self) -> torch.Tensor:
        return torch.cat(self.outputs, dim=0)

    def grad(self) -> Optional[torch.Tensor]:
        return torch.cat(self.grads, dim=0) if self.grads else None


def soft_targets(model: nn.Module, data: CalibrationData) -> torch.Tensor:
    """FP softmax over the whole calibration set in one forward pass (the official ``raw_pred_softmax``)."""
    with torch.no_grad():
        return F.softmax(data.forward(model, data.batch(0, len(data))), dim=-1)


def _bytes_per_image(model: nn.Module, layers: list[NamedLayer], data: CalibrationData) -> dict[str, int]:
    """Bytes one image adds to each layer's recording (inputs, output and output gradient)."""
    sizes: dict[str, int] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            numel = sum(a.numel() for a in args if isinstance(a, torch.Tensor)) + 2 * output.numel()
            sizes[name] = numel * output.element_size()

        return fn

    data.probe(model, [m.register_forward_hook(hook(name)) for name, m in layers])
    return sizes


def capture_groups(model: nn.Module, layers: list[NamedLayer], data: CalibrationData, capture_mb: int) -> Iterator[list[NamedLayer]]:
    """Consecutive groups of layers whose recordings over ``data`` fit in ``capture_mb`` (at least one layer)."""
    sizes = _bytes_per_image(model, layers, data)
    budget = capture_mb * 2**20
    group: list[NamedLayer] = []
    used = 0
    for name, layer in layers:
        need = sizes.get(name, 0) * len(data)
        if group and used + need > budget:
            yield group
            group, used = [], 0
        group.append((name, layer))
        used += need
    if group:
        yield group


def record_layers(
    model: nn.Module,
    layers: list[NamedLayer],
    data: CalibrationData,
    targets: Optional[torch.Tensor],
    batch_size: int,
) -> dict[str, Recording]:
    """Record ``layers`` over ``data`` in batches of ``batch_size``. When ``targets`` is given, also record the
    gradient of the KL loss w.r.t. each output (a backward pass per batch)."""
    records = {name: Recording() for name, _ in layers}

    def hook(record: Recording):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            record.inputs.append([a.detach() for a in args])
            record.outputs.append(output.detach())
            if targets is not None and output.requires_grad:
                output.register_hook(lambda g: record.grads.append(g.detach()))

        return fn

    handles = [m.register_forward_hook(hook(records[name])) for name, m in layers]
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(targets is not None)
        for start, batch in zip(range(0, len(data), batch_size), data.batches(batch_size)):
            if targets is None:
                with torch.no_grad():
                    data.forward(model, batch)
                continue
            with torch.enable_grad():  # callers may quantize under no_grad
                logits = data.forward(model, batch)
                loss = F.kl_div(F.log_softmax(logits, dim=-1), targets[start : start + batch_size], reduction="batchmean")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    for name, record in records.items():
        if not record.outputs:
            raise RuntimeError(f"PTQ4ViT: layer {name} was not called during calibration")
        if targets is not None and len(record.grads) != len(record.outputs):
            raise RuntimeError(f"PTQ4ViT: no gradient reached layer {name}")
    return records
