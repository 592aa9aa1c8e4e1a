"""Block-wise reconstruction: fit a quantized transformer block's learnable parameters to its FP counterpart.

Generic over what is learned (low-rank branches, quantizer ranges, architecture weights): a caller finds the blocks
through the architecture adapter (:func:`ptq_bench.models.find_blocks`), captures each block's inputs through the
task's forward and its FP targets (:mod:`ptq_bench.transforms.block_capture`), builds one :class:`ReconStep` per
optimizer (each with its own pool of calibration samples), and calls :func:`reconstruct_block`. The loss is the
BRECQ-style block output error (:mod:`ptq_bench.transforms.block_losses`); ``compile`` runs each training step's
forward and loss through ``torch.compile`` (:mod:`ptq_bench.transforms.compiled_loss`); finished blocks can be
checkpointed (:mod:`ptq_bench.transforms.block_state`).

Curriculum learning (AIQViT Eq. 16-17): at iteration t only the λ(t)·|D| samples with the smallest current
per-sample loss are used, λ(t) = min(1, λ0 + (1 − λ0)·t/T). The paper does not say how often the samples are
re-ranked; here every ``rerank_every`` iterations.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq_bench.errors import ConfigError
from ptq_bench.quant.base import Quantizer
from ptq_bench.transforms.block_capture import BlockInputs, Samples
from ptq_bench.transforms.block_losses import Loss, batch_losses, evaluate_losses
from ptq_bench.transforms.compiled_loss import CompiledLoss


@dataclass(frozen=True)
class Curriculum:
    """λ(t) = min(1, λ0 + (1 − λ0)·t/T) (AIQViT Eq. 17); samples in use = ceil(λ(t)·|D|), easiest first."""

    lambda0: float = 0.5
    rerank_every: int = 100

    def __post_init__(self) -> None:
        if not 0.0 < self.lambda0 <= 1.0:
            raise ConfigError(f"curriculum lambda0 must be in (0, 1], got {self.lambda0}")
        if self.rerank_every < 1:
            raise ConfigError(f"curriculum rerank_every must be >= 1, got {self.rerank_every}")

    def fraction(self, step: int, total: int) -> float:
        return min(1.0, self.lambda0 + (1.0 - self.lambda0) * step / max(total, 1))

    def count(self, step: int, total: int, pool_size: int) -> int:
        return min(pool_size, max(1, math.ceil(self.fraction(step, total) * pool_size - 1e-9)))


@dataclass
class ReconStep:
    """One optimizer update per iteration, on a batch drawn from ``pool`` (sample indices).

    ``curriculum`` restricts the pool to its easiest samples (None: the whole pool); ``before`` runs before the
    forward pass (e.g. to resample drop-path masks), ``after`` after the update (e.g. to project parameters).
    ``always_shuffle`` draws the batch as ``randperm(pool)[:batch_size]`` even when the pool fits in one batch (the
    official BRECQ/QDrop loops do; otherwise such a pool is used whole, in order). ``in_order`` takes the batches
    in turn instead, the t-th being samples t·b .. t·b + b - 1 of the pool modulo its size (APHQ-ViT's detection
    loop, one image per step: ``it % len(raw_out)``).
    """

    optimizer: torch.optim.Optimizer
    pool: torch.Tensor
    curriculum: Optional[Curriculum] = None
    before: Optional[Callable[[], None]] = None
    after: Optional[Callable[[], None]] = None
    always_shuffle: bool = False
    in_order: bool = False


#: A training objective given the batch's sample indices: the scalar loss of one step (its own forward).
Objective = Callable[[torch.Tensor], torch.Tensor]


def _batches(active: torch.Tensor, batch_size: int, generator: torch.Generator, always_shuffle: bool = False) -> torch.Tensor:
    """A random batch of ``active`` (without replacement; the whole set when it is smaller than a batch, unless
    ``always_shuffle``)."""
    if active.numel() <= batch_size and not always_shuffle:
        return active
    pick = torch.randperm(active.numel(), generator=generator)[:batch_size]
    return active[pick.to(active.device)]


def _in_order(active: torch.Tensor, batch_size: int, t: int) -> torch.Tensor:
    """The ``t``-th batch of ``active`` taken in turn (wrapping around)."""
    positions = (torch.arange(batch_size) + t * batch_size) % active.numel()
    return active[positions.to(active.device)]


#: Below this many elements in a batch of block inputs, reconstruction on a CPU runs on one intra-op thread.
SMALL_BATCH_ELEMENTS = 1 << 19


@contextmanager
def cpu_threads_for(inputs: Samples, batch_size: int) -> Iterator[None]:
    """One intra-op thread while the batches of a block's inputs are small, on a CPU.

    An iteration is a few hundred operators; on tensors of about 10^5 elements (MNIST-ViT: 32 × 50 × 64) splitting
    each one across threads costs more than it saves, and on a loaded machine every split operator waits for a busy
    core: 4 to 20 times slower at 2 threads than at 1 (benchmarks/reconstruction_speed.py, docs/performance.md)."""
    sample = inputs.tensors[0] if isinstance(inputs, BlockInputs) else inputs[0]
    threads = torch.get_num_threads()
    small = inputs.device.type == "cpu" and threads > 1 and sample.numel() * min(batch_size, len(inputs)) < SMALL_BATCH_ELEMENTS
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)


def reconstruct_block(
    block: nn.Module,
    inputs: Samples,
    targets: Samples,
    steps: Sequence[ReconStep],
    iters: int,
    batch_size: int,
    generator: torch.Generator,
    loss: Union[Loss, Objective] = "mse",
    desc: str = "",
    progress: bool = False,
    compile: Union[bool, CompiledLoss, None] = False,
) -> list[float]:
    """Run ``iters`` iterations of every step; returns the training loss of the first step at each iteration.

    Train/eval modes are the caller's: only modules meant to be stochastic (e.g. drop-path) should train, so that
    dropout or stochastic depth inside a pretrained block stays off. Small blocks run on one CPU thread
    (:func:`cpu_threads_for`). ``compile``: the forward and loss of every training step through ``torch.compile``
    (True, or a :class:`CompiledLoss` shared by the blocks of a model, which counts graphs and compile time); blocks
    whose inputs are :class:`BlockInputs` (extra arguments, samples of different shapes) are refused. ``loss``: a
    per-sample loss name, or an :data:`Objective` that computes a step's loss from the batch's indices itself
    (mixed inputs, regularizers; not with a curriculum or ``compile``).
    """
    if callable(loss) and (compile or any(step.curriculum is not None for step in steps)):
        raise ConfigError("a reconstruction objective runs eagerly and without a curriculum")
    compiled = CompiledLoss() if compile is True else (compile or None)
    if compiled is not None and not isinstance(inputs, torch.Tensor):
        raise ConfigError(
            "compiled block reconstruction (compile: true) supports blocks called with one tensor of equally shaped "
            f"samples; {type(block).__name__} takes extra arguments or samples of different shapes: set compile: false"
        )
    with cpu_threads_for(inputs, batch_size):
        order: list[Optional[torch.Tensor]] = [None] * len(steps)  # curriculum ranking per step, easiest first
        history: list[float] = []
        bar: Iterator[int] = tqdm(range(iters), desc=desc, leave=False, disable=not progress)
        for t in bar:
            for k, step in enumerate(steps):
                active = step.pool
                if step.curriculum is not None:
                    if order[k] is None or t % step.curriculum.rerank_every == 0:
                        losses = evaluate_losses(block, inputs, targets, step.pool, batch_size, loss)
                        order[k] = step.pool[losses.argsort(stable=True).to(step.pool.device)]
                    active = order[k][: step.curriculum.count(t, iters, step.pool.numel())]  # type: ignore[index]
                idx = (_in_order(active, batch_size, t) if step.in_order
                       else _batches(active, batch_size, generator, step.always_shuffle))
                if step.before is not None:
                    step.before()
                step.optimizer.zero_grad(set_to_none=True)
                if callable(loss):
                    value = loss(idx)
                    value.backward()
                elif compiled is not None:
                    with compiled.timing():
                        value = compiled(block, inputs[idx], targets[idx], loss)  # type: ignore[arg-type]
                        value.backward()
                else:
                    value = batch_losses(block, inputs[idx], targets[idx], loss).mean()
                    value.backward()
                step.optimizer.step()
                if step.after is not None:
                    step.after()
                if k == 0:
                    history.append(value.item())
            if progress and history:
                bar.set_postfix(loss=f"{history[-1]:.3g}")  # type: ignore[attr-defined]
        return history


#: Smallest value a learned scale is projected back to after each update.
MIN_SCALE = 1e-8


@contextmanager
def learnable_scales(learned: Sequence[tuple[Quantizer, str]]) -> Iterator[list[nn.Parameter]]:
    """Within the context, each (quantizer, name)'s buffer is an ``nn.Parameter`` (LSQ-style learning of the step
    sizes a quantizer declares in :meth:`Quantizer.learnable_parameters`); on exit the learned values become
    buffers again."""
    params: list[nn.Parameter] = []
    for quantizer, name in learned:
        param = nn.Parameter(quantizer._buffers.pop(name).detach().clone())
        quantizer.register_parameter(name, param)
        params.append(param)
    try:
        yield params
    finally:
        for (quantizer, name), param in zip(learned, params):
            del quantizer._parameters[name]
            quantizer.register_buffer(name, param.detach().clamp_min(MIN_SCALE))
            quantizer.params_changed()


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Within the context none of ``module``'s parameters takes gradients; on exit each gets its flag back."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def clamp_scales_(params: Sequence[nn.Parameter]) -> None:
    """Keep learned scales positive (an Adam step can overshoot zero)."""
    with torch.no_grad():
        for param in params:
            param.clamp_(min=MIN_SCALE)
