"""A detector unit's calls over the calibration images, one image at a time, and QDrop's input mixing on them
(GoatWu/APHQ-ViT @ 84c9fde, Object-Detection/tools/quant_utils/block_recon.py ``init_block_raw_inp_outp``,
``init_block_quanted_input``, ``mix_tensors_or_lists``).

Units of a detector take more than one tensor or return more than one: mmdet's ``PatchEmbed`` and ``PatchMerging``
return their feature-map size with the tokens, a ``SwinBlock`` takes it (``block(x, hw_shape)``), the ``FPN`` takes
and returns one map per level. Images differ in size, so every image keeps its own call: its first argument (a
tensor, or a tuple of tensors), the further positional arguments, and its output tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.transforms.block_capture import StopForward
from ptq_bench.transforms.qdrop import mask_like

#: a unit's first argument: one tensor, or one per FPN level
UnitInput = Union[torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass
class UnitCalls:
    """Per calibration image: the unit's first argument, its further positional arguments, its output tensors."""

    inputs: list[UnitInput]
    extras: list[tuple]
    outputs: list[tuple[torch.Tensor, ...]]

    def __len__(self) -> int:
        return len(self.inputs)


def output_tensors(output: Any) -> tuple[torch.Tensor, ...]:
    """The tensors a unit returns (the FPN's maps; the tokens of PatchEmbed/PatchMerging, not their sizes)."""
    if isinstance(output, torch.Tensor):
        return (output,)
    return tuple(t for t in output if isinstance(t, torch.Tensor))


def _detached(x: Any) -> UnitInput:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(t.detach() for t in x)
    raise ConfigError(f"a detector unit's first argument must be a tensor or a tuple of tensors, got {type(x).__name__}")


def capture_unit_calls(model: nn.Module, unit: nn.Module, data: CalibrationData, limit: int | None = None) -> UnitCalls:
    """``unit``'s call on every calibration image (the first ``limit``; batch 1), each forward stopped once the unit
    has run."""
    count = len(data) if limit is None else min(limit, len(data))
    calls = UnitCalls([], [], [])

    def before(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not args or any(v is not None for v in kwargs.values()) or any(isinstance(a, torch.Tensor) for a in args[1:]):
            raise ConfigError(f"{type(unit).__name__}: a detector unit must be called with its tensors first and "
                              "further non-tensor positional arguments")
        calls.inputs.append(_detached(args[0]))
        calls.extras.append(tuple(args[1:]))

    def after(_module: nn.Module, _args: tuple, output: Any) -> None:
        calls.outputs.append(tuple(t.detach() for t in output_tensors(output)))
        raise StopForward

    handles = [unit.register_forward_pre_hook(before, with_kwargs=True), unit.register_forward_hook(after)]
    try:
        with torch.no_grad():
            for i in range(count):
                try:
                    data.forward(model, data.batch(i, i + 1))
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    if len(calls.outputs) != count:
        raise ConfigError(f"{type(unit).__name__} ran on {len(calls.outputs)} of {count} calibration images")
    return calls


def mixed_unit_input(quantized: UnitInput, fp: UnitInput, prob: float, generator: torch.Generator) -> UnitInput:
    """Per element the quantized model's input with probability ``prob``, else the FP model's (each level's own
    mask for the FPN)."""
    if isinstance(quantized, torch.Tensor):
        return torch.where(mask_like(quantized, prob, generator), quantized, fp)  # type: ignore[arg-type]
    return tuple(torch.where(mask_like(q, prob, generator), q, f) for q, f in zip(quantized, fp))


def run_unit(unit: nn.Module, x: UnitInput, extras: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """The unit's output tensors on one image's input."""
    return output_tensors(unit(x, *extras))
