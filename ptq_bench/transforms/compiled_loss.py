"""A block reconstruction's training step (forward and loss) through ``torch.compile``.

With the methods' ``compile`` option, the block's forward and loss of each training iteration run through
``torch.compile`` (:class:`CompiledLoss`; the backward through AOTAutograd), so inductor fuses the chains of fake
quantizers forward and backward (ptq_bench/quant/ste.py's functional forms). The batch draw, the curriculum
re-ranking, the optimizer step and the ``before``/``after`` hooks stay eager, so the batches are those of the eager
loop. The graph is captured whole (``fullgraph``: a graph break is an error, never an eager fallback) and static in
shape, one per block structure and batch size: blocks of one model share it (the block is an argument of the
compiled function, not a constant of it), and passing the recompile limit is an error too.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from ptq_bench.transforms.block_losses import Loss, sample_losses

log = logging.getLogger(__name__)


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
