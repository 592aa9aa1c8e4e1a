"""QDrop (Wei et al., ICLR 2022, arXiv 2203.05740): randomly drop activation quantization during reconstruction.

Each element takes its quantized value with probability ``prob`` and its full-precision value otherwise, at two
places (GoatWu/APHQ-ViT @ 84c9fde, utils/block_recon.py ``reconstruct_single_block`` and quantizers/uniform.py
``UniformQuantizer.forward`` with ``drop_prob``): the block input, mixing the quantized model's input with the FP
model's (:func:`mixed_inputs`), and the output of every activation quantizer inside the block, mixing it with the
quantizer's input (:func:`dropping_activations`). Masks are drawn as ``rand < prob`` from one generator, in the order
the official code draws them from the global one (the block input first, then the quantizers in forward order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ptq_bench.quant.base import Quantizer


def mask_like(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """``rand_like(x) < prob`` drawn from ``generator`` (on x's device): the draws fill x's memory layout, as
    ``rand_like`` does, so a transposed operand (Kᵀ) gets the official mask element for element."""
    return torch.empty_like(x).uniform_(generator=generator) < prob


def mixed_inputs(quantized: torch.Tensor, fp: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Per element the quantized model's input with probability ``prob``, else the FP model's."""
    return torch.where(mask_like(quantized, prob, generator), quantized, fp)


#: draws the mask of one quantizer's input: ``(quantizer, x, prob, generator) -> keep``
MaskDraw = Callable[[nn.Module, torch.Tensor, float, torch.Generator], torch.Tensor]


@contextmanager
def dropping_activations(quantizers: Sequence[Quantizer], prob: float, generator: torch.Generator,
                         draw: MaskDraw | None = None) -> Iterator[None]:
    """Inside the context each quantizer's output is, per element, itself with probability ``prob``, else its input
    (a forward hook; the quantized value keeps its straight-through gradient). The mask is ``mask_like`` of the
    input (its layout, as ``rand_like(x)``) unless ``draw`` lays a quantizer's draws out otherwise."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        keep = draw(module, x, prob, generator) if draw is not None else mask_like(x, prob, generator)
        return torch.where(keep, output, x)

    handles = [q.register_forward_hook(hook) for q in quantizers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def skip_loader_seeds(generator: torch.Generator, passes: int) -> None:
    """Draw what ``passes`` iterations of a torch DataLoader draw from the global generator (one int64 base seed
    each, even without workers): the official reconstruction iterates its calibration loader for every capture,
    between its batches and masks, so the same draws keep our stream equal to its stream."""
    for _ in range(passes):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
