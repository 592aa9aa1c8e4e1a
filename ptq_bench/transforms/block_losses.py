"""Per-sample block output errors (the BRECQ-style loss of a block reconstruction, AIQViT Eq. 10)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch
from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.transforms.block_capture import Samples

Loss = Literal["mse", "fro"]


def batch_losses(block: nn.Module, inputs: Samples, targets: Samples, loss: Loss) -> torch.Tensor:
    """Per-sample loss of ``block`` on a batch of ``inputs`` against ``targets`` (in the order of the samples)."""
    if isinstance(inputs, torch.Tensor):
        return sample_losses(block(inputs), targets, loss)  # type: ignore[arg-type]
    values: list[Optional[torch.Tensor]] = [None] * len(inputs)
    for positions, x, extra in inputs.groups():
        target = torch.cat([targets.tensors[p] for p in positions])  # type: ignore[union-attr]
        for p, value in zip(positions, sample_losses(block(x, *extra), target, loss)):
            values[p] = value
    return torch.stack(values)  # type: ignore[arg-type]


def sample_losses(output: torch.Tensor, target: torch.Tensor, loss: Loss) -> torch.Tensor:
    """Per-sample error: mean squared error (``mse``) or Frobenius norm of the difference (``fro``, Eq. 10 as printed)."""
    diff = (output - target).flatten(1)
    if loss == "mse":
        return diff.pow(2).mean(dim=1)
    if loss == "fro":
        return diff.norm(dim=1)
    raise ConfigError(f"unknown reconstruction loss '{loss}' (mse, fro)")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode; each one's own training flag is restored on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def evaluate_losses(
    block: nn.Module, inputs: Samples, targets: Samples, indices: torch.Tensor, batch_size: int, loss: Loss
) -> torch.Tensor:
    """Per-sample loss of ``block`` on ``inputs[indices]`` in eval mode (no grad)."""
    with eval_mode(block), torch.no_grad():
        chunks = [batch_losses(block, inputs[idx], targets[idx], loss) for idx in indices.split(batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0)
