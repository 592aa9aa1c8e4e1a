"""What the deploy section measures: output agreement, side-by-side latency and model bytes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ptq_bench.quant.base import Quantizer


class Recorder(nn.Module):
    """Calls ``model`` and keeps each output (on the CPU) and the first input, so two models evaluated on the same
    batches can be compared output for output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.outputs: list[torch.Tensor] = []
        self.first_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_input is None:
            self.first_input = x.detach()
        out = self.model(x)
        self.outputs.append(out.detach().float().cpu())
        return out


def agreement(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement (%) and logit differences of ``outputs`` against ``reference`` (same batches, in order)."""
    a, b = torch.cat(outputs), torch.cat(reference)
    diff = (a - b).abs()
    return {
        "top1_agreement": 100.0 * (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "cosine": torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item(),
        "reference_max_abs": b.abs().max().item(),
    }


def latency(models: dict[str, Callable[[torch.Tensor], Any]], batch: torch.Tensor, repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Milliseconds per batch of each model, measured interleaved (one call of each per round) so that both see the
    same machine load: median, 25th and 75th percentile, min and max over ``repeats`` rounds after ``warmup``."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                if round_ >= warmup:
                    times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: _summary(values) for name, values in times.items()}


def _summary(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_ms": statistics.median(values), "p25_ms": quartiles[0], "p75_ms": quartiles[2],
            "min_ms": min(values), "max_ms": max(values), "repeats": len(values)}


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each tensor once), quantizers' own state excluded: what the
    weights take as stored (int8 weights one byte per value, float tensors four)."""
    quantizer_tensors = {id(t) for m in model.modules() if isinstance(m, Quantizer) for t in (*m.parameters(), *m.buffers())}
    seen: dict[int, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in quantizer_tensors:
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
