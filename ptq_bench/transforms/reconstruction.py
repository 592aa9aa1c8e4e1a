"""Block-wise reconstruction: fit a quantized transformer block's learnable parameters to its FP counterpart.

Generic over what is learned (low-rank branches, quantizer ranges, architecture weights): a caller finds the blocks
through the architecture adapter (:func:`ptq_bench.models.find_blocks`), captures each block's inputs through the
task's forward and its FP targets (:func:`capture_block_inputs`, :func:`block_outputs`; blocks that take extra
arguments, such as mmdet Swin's ``hw_shape``, on samples of different shapes give :class:`BlockInputs`), builds one
:class:`ReconStep` per optimizer (each with its own pool of calibration samples), and calls
:func:`reconstruct_block`. The loss is the BRECQ-style block output error (AIQViT Eq. 10: E_x ‖B_q(x) − B(x)‖).

Curriculum learning (AIQViT Eq. 16-17): at iteration t only the λ(t)·|D| samples with the smallest current
per-sample loss are used, λ(t) = min(1, λ0 + (1 − λ0)·t/T). The paper does not say how often the samples are
re-ranked; here every ``rerank_every`` iterations.

Compiled training step (``compile=True``, the methods' ``compile`` option): the block's forward and loss of each
training iteration run through ``torch.compile`` (:class:`CompiledLoss`; the backward through AOTAutograd), so
inductor fuses the chains of fake quantizers forward and backward (ptq_bench/quant/ste.py's functional forms). The
batch draw, the curriculum re-ranking, the optimizer step and the ``before``/``after`` hooks stay eager, so the
batches are those of the eager loop. The graph is captured whole (``fullgraph``: a graph break is an error, never an
eager fallback) and static in shape, one per block structure and batch size: blocks of one model share it (the block
is an argument of the compiled function, not a constant of it), and passing the recompile limit is an error too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.quant.base import Quantizer

Loss = Literal["mse", "fro"]

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a capture hook once the wanted input has been recorded."""


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
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in data.batches(batch_size):
                try:
                    data.forward(model, batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
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


def _mean_loss(block: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: Loss) -> torch.Tensor:
    """Mean per-sample loss of ``block`` on a batch (the function :class:`CompiledLoss` compiles)."""
    return sample_losses(block(x), target, loss).mean()


#: Most graphs one compiled training step may hold (block structures × batch sizes) before it is an error.
RECOMPILE_LIMIT = 64


class CompiledLoss:
    """``batch_losses(block, x, target, loss).mean()`` through ``torch.compile`` (inductor, whole graph, static shapes).

    The block is an argument of the compiled function, so blocks of one structure (every block of a ViT, with the
    same quantizer shapes) share one graph, and each new structure or batch size compiles its own. ``graphs`` counts
    the graphs compiled and ``compile_seconds`` the wall time of the calls that compiled one. A graph break raises
    (``fullgraph=True``), and so does passing :data:`RECOMPILE_LIMIT` graphs: nothing falls back to eager.
    ``backend``: torch.compile's (tests trace with ``aot_eager``, which runs the captured graphs unfused).
    """

    def __init__(self, backend: str = "inductor") -> None:
        self._compiled = torch.compile(_mean_loss, backend=backend, fullgraph=True, dynamic=False)
        self.graphs = 0
        self.compile_seconds = 0.0

    def __call__(self, block: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: Loss) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return self._compiled(block, x, target, loss)

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Count the graphs compiled within, and their time if any: a call and its backward (AOTAutograd compiles
        the backward graph at the first backward pass)."""
        from torch._dynamo.utils import counters

        before, start = counters["stats"]["unique_graphs"], time.perf_counter()
        yield
        if counters["stats"]["unique_graphs"] != before:
            self.graphs += counters["stats"]["unique_graphs"] - before
            self.compile_seconds += time.perf_counter() - start


@contextmanager
def compiled_losses(enabled: bool, what: str = "block reconstruction") -> Iterator[Optional[CompiledLoss]]:
    """A :class:`CompiledLoss` for the blocks of one model (None when not ``enabled``); after the model's blocks the
    graphs and compile time are logged (not when the reconstruction failed), and on any exit dynamo's caches are
    reset (the compiled code holds the model's blocks)."""
    if not enabled:
        yield None
        return
    compiled = CompiledLoss()
    try:
        yield compiled
        log.info("%s: %d compiled graph(s), %.1f s compiling", what, compiled.graphs, compiled.compile_seconds)
    finally:
        torch._dynamo.reset()


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
    """

    optimizer: torch.optim.Optimizer
    pool: torch.Tensor
    curriculum: Optional[Curriculum] = None
    before: Optional[Callable[[], None]] = None
    after: Optional[Callable[[], None]] = None


def _batches(active: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch of ``active`` (without replacement; the whole set when it is smaller than a batch)."""
    if active.numel() <= batch_size:
        return active
    pick = torch.randperm(active.numel(), generator=generator)[:batch_size]
    return active[pick.to(active.device)]


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
    loss: Loss = "mse",
    desc: str = "",
    progress: bool = False,
    compile: Union[bool, CompiledLoss, None] = False,
) -> list[float]:
    """Run ``iters`` iterations of every step; returns the training loss of the first step at each iteration.

    Train/eval modes are the caller's: only modules meant to be stochastic (e.g. drop-path) should train, so that
    dropout or stochastic depth inside a pretrained block stays off. Small blocks run on one CPU thread
    (:func:`cpu_threads_for`). ``compile``: the forward and loss of every training step through ``torch.compile``
    (True, or a :class:`CompiledLoss` shared by the blocks of a model, which counts graphs and compile time); blocks
    whose inputs are :class:`BlockInputs` (extra arguments, samples of different shapes) are refused.
    """
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
                idx = _batches(active, batch_size, generator)
                if step.before is not None:
                    step.before()
                step.optimizer.zero_grad(set_to_none=True)
                if compiled is not None:
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
def learnable_scales(quantizers: Sequence[Quantizer]) -> Iterator[list[nn.Parameter]]:
    """Within the context, each quantizer's ``scale`` buffer is an ``nn.Parameter`` (LSQ-style learning of
    activation ranges by the reconstruction); on exit the learned values become buffers again."""
    params: list[nn.Parameter] = []
    for quantizer in quantizers:
        param = nn.Parameter(quantizer._buffers.pop("scale").detach().clone())
        quantizer.register_parameter("scale", param)
        params.append(param)
    try:
        yield params
    finally:
        for quantizer, param in zip(quantizers, params):
            del quantizer._parameters["scale"]
            quantizer.register_buffer("scale", param.detach().clamp_min(MIN_SCALE))
            quantizer.params_changed()


def clamp_scales_(params: Sequence[nn.Parameter]) -> None:
    """Keep learned scales positive (an Adam step can overshoot zero)."""
    with torch.no_grad():
        for param in params:
            param.clamp_(min=MIN_SCALE)


class BlockStateStore:
    """Per-block checkpoints for resuming a block-wise reconstruction.

    After a block is finished, ``save`` writes its ``state_dict`` and caller metadata atomically to
    ``<dir>/<block name>.pt`` together with a fingerprint of the run (config, bits, calibration data);
    ``load`` restores a finished block and refuses a file written by a different run.
    """

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint

    def path(self, name: str) -> Path:
        return self.directory / f"{name or 'model'}.pt"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, block: nn.Module, meta: dict[str, Any]) -> None:
        tmp = self.path(name).with_suffix(".tmp")
        state = {k: v.detach().cpu() for k, v in block.state_dict().items()}
        torch.save({"fingerprint": self.fingerprint, "meta": meta, "state": state}, tmp)
        os.replace(tmp, self.path(name))

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata of a saved block (checked against this run's fingerprint)."""
        return self._read(name)["meta"]

    def load(self, name: str, block: nn.Module) -> None:
        """Load a saved block's state into ``block`` (which must already have the saved structure)."""
        block.load_state_dict(self._read(name)["state"])
        for module in block.modules():
            if isinstance(module, Quantizer):
                module.params_changed()

    def _read(self, name: str) -> dict[str, Any]:
        saved = torch.load(self.path(name), map_location="cpu", weights_only=True)
        if saved["fingerprint"] != self.fingerprint:
            raise ConfigError(
                f"{self.path(name)} was written by a different run (config, bits or calibration data differ); "
                "use another state_dir or delete it"
            )
        return saved
