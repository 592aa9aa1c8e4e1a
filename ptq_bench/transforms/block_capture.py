"""A transformer block's calibration inputs and outputs, captured through the task's forward.

:func:`capture_block_inputs` runs the calibration data through the model up to ``block`` and keeps what the block
received; blocks called with extra arguments (mmdet Swin's ``hw_shape``) on samples of different shapes give
:class:`BlockInputs`. :func:`block_outputs` runs a block on captured inputs (the FP targets of a reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError


class StopForward(Exception):
    """Raised by a capture hook once what it wanted is recorded: the rest of the forward is not needed."""


def forward_until_stopped(model: nn.Module, data: CalibrationData, batch_size: int, handle: Any) -> None:
    """Run every calibration batch of ``batch_size`` through the task's forward, each stopped by the capture hook
    behind ``handle`` (raising :class:`StopForward`); the hook is removed on every exit."""
    try:
        with torch.no_grad():
            for batch in data.batches(batch_size):
                try:
                    data.forward(model, batch)
                except StopForward:
                    pass
    finally:
        handle.remove()


@dataclass
class BlockInputs:
    """Per-sample inputs of a block called as ``block(x, *extra)`` (mmdet's Swin: ``extra = (hw_shape,)``).

    Detection images differ in size, so their block inputs cannot be concatenated: each sample keeps its own tensor
    (batch dim 1) and extra positional arguments, and a batch of samples runs through the block in groups of equal
    shape and extras (:func:`run_block`, :func:`batch_losses`). Indexing with a tensor or list of sample indices or a
    slice gives the selected samples; ``shape[0]`` and ``device`` are those of a tensor of samples.
    """

    tensors: list[torch.Tensor]
    extras: list[tuple]

    @classmethod
    def from_batches(cls, batches: Sequence[tuple[torch.Tensor, tuple]]) -> "BlockInputs":
        tensors, extras = [], []
        for x, extra in batches:
            tensors.extend(x.split(1))
            extras.extend([extra] * x.shape[0])
        return cls(tensors, extras)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self)])

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def __getitem__(self, index: Any) -> "BlockInputs":
        picks = range(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).reshape(-1).tolist()
        return BlockInputs([self.tensors[i] for i in picks], [self.extras[i] for i in picks])

    def groups(self) -> list[tuple[list[int], torch.Tensor, tuple]]:
        """(positions, their tensors concatenated, their extras) for each run-able group of equal shape and extras."""
        grouped: dict[tuple, list[int]] = {}
        for i, (x, extra) in enumerate(zip(self.tensors, self.extras)):
            grouped.setdefault((tuple(x.shape[1:]), repr(extra)), []).append(i)
        return [(ps, torch.cat([self.tensors[p] for p in ps]), self.extras[ps[0]]) for ps in grouped.values()]


Samples = Union[torch.Tensor, BlockInputs]


def capture_block_inputs(model: nn.Module, block: nn.Module, data: CalibrationData, batch_size: int) -> Samples:
    """The input of ``block`` for every calibration sample, running the task's forward only up to that block.

    A block called with one tensor gives one tensor of all samples. A block called with further non-tensor positional
    arguments (mmdet Swin's ``hw_shape``) gives :class:`BlockInputs`, which keeps each sample's shape and arguments."""
    captured: list[tuple[torch.Tensor, tuple]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if (
            not args
            or not isinstance(args[0], torch.Tensor)
            or any(isinstance(a, torch.Tensor) for a in args[1:])
            or any(v is not None for v in kwargs.values())
        ):
            raise ConfigError("block-wise reconstruction supports blocks called with one tensor and non-tensor positional arguments")
        captured.append((args[0].detach(), tuple(args[1:])))
        raise StopForward

    forward_until_stopped(model, data, batch_size, block.register_forward_pre_hook(hook, with_kwargs=True))
    if len(captured) != len(range(0, len(data), batch_size)):
        raise ConfigError(f"block {type(block).__name__} was not called by the task's forward")
    if all(not extra for _, extra in captured):
        return torch.cat([x for x, _ in captured])
    return BlockInputs.from_batches(captured)


def run_block(block: nn.Module, inputs: Samples) -> Samples:
    """``block`` applied to a batch of samples (per group of equal shape for :class:`BlockInputs`)."""
    if isinstance(inputs, torch.Tensor):
        return block(inputs)
    outputs: list[torch.Tensor] = [inputs.tensors[0]] * len(inputs)
    for positions, x, extra in inputs.groups():
        for p, y in zip(positions, block(x, *extra).split(1)):
            outputs[p] = y
    return BlockInputs(outputs, [()] * len(inputs))


def block_outputs(block: nn.Module, inputs: Samples, batch_size: int) -> Samples:
    """``block`` applied to ``inputs`` in batches (no grad)."""
    with torch.no_grad():
        chunks = [run_block(block, inputs[s : s + batch_size]) for s in range(0, inputs.shape[0], batch_size)]
    if isinstance(inputs, torch.Tensor):
        return torch.cat(chunks)  # type: ignore[arg-type]
    return BlockInputs([t for c in chunks for t in c.tensors], [e for c in chunks for e in c.extras])  # type: ignore[union-attr]
