"""Calibration data as methods see it: N samples, batches of them, and the task's one way to run the model.

A task adapter builds a :class:`CalibrationData` from its samples (images for classification, data samples for
detection) and its ``forward(model, batch)``. Methods never call ``model(x)`` themselves: every forward pass of a
calibration, a block capture or a reconstruction goes through :meth:`CalibrationData.forward`, so a method written
for classification runs unchanged on a detector whose forward needs a data preprocessor and a dict batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Forward = Callable[[nn.Module, Any], Any]


def _default_collate(samples: Any) -> Any:
    return samples


@dataclass
class CalibrationData:
    """``samples`` (a tensor with the samples on dim 0, or any sliceable sequence), ``forward(model, batch)``.

    ``collate`` turns a slice of ``samples`` into a batch that ``forward`` accepts (default: the slice itself).
    ``logits`` says whether ``forward`` returns class logits (PTQ4ViT's Hessian objective needs them).
    ``identity`` is what the record stores about the samples (indices, content hash).
    ``uniform_shapes`` says whether every layer sees inputs of one shape (apart from the batch dim) in every batch, so
    that a layer's inputs recorded over batches can be stacked; False for detection (images of different sizes, heads
    applied to every FPN level).
    """

    samples: Any
    forward_fn: Forward
    collate: Callable[[Any], Any] = _default_collate
    logits: bool = False
    identity: dict[str, Any] = field(default_factory=dict)
    uniform_shapes: bool = True

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, start: int, stop: int) -> Any:
        """Samples ``start:stop`` as one batch."""
        return self.collate(self.samples[start:stop])

    def batches(self, batch_size: int | None = None, limit: int | None = None) -> Iterator[Any]:
        """Consecutive batches of ``batch_size`` (None: one batch of everything) over the first ``limit`` samples."""
        count = len(self) if limit is None else min(int(limit), len(self))
        step = count if batch_size is None else int(batch_size)
        for start in range(0, count, max(step, 1)):
            yield self.batch(start, min(start + step, count))

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run ``model`` on ``batch`` the task's way (the only place a method's model is called)."""
        return self.forward_fn(model, batch)

    def probe(self, model: nn.Module, handles: list[RemovableHandle]) -> None:
        """One forward of the first sample without gradients, read through the hooks ``handles`` belong to (shapes,
        sizes, call counts); the hooks are removed afterwards, also on an error."""
        try:
            with torch.no_grad():
                self.forward(model, self.batch(0, 1))
        finally:
            for handle in handles:
                handle.remove()

    def run(self, model: nn.Module, batch_size: int | None = None, limit: int | None = None) -> None:
        """Forward every batch (outputs discarded): the calibration pass of quantizers that fit on first use."""
        for batch in self.batches(batch_size, limit):
            self.forward(model, batch)

    def fingerprint(self) -> str:
        """A content hash of the samples (device independent), for resume checks of long methods."""
        if "sha256" in self.identity:
            return str(self.identity["sha256"])
        if isinstance(self.samples, torch.Tensor):
            return tensor_sha256(self.samples)
        raise TypeError("calibration samples that are not one tensor need identity['sha256'] from their task")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (moved to the CPU, contiguous)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def image_calibration(images: torch.Tensor, identity: dict[str, Any] | None = None) -> CalibrationData:
    """Calibration on a tensor of images whose forward is ``model(images)`` (timm classifiers; tests)."""
    return CalibrationData(images, call_model, logits=True, identity=dict(identity or {}))


def call_model(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The plain forward ``model(batch)``."""
    return model(batch)

