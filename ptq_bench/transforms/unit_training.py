"""One reconstruction unit trained as the AdaLog code family does it (GoatWu/AdaLog @ 75a57d2 and its forks
GoatWu/APHQ-ViT @ 84c9fde, ShiheWang/FIMA-Q @ 64c4b00: utils/block_recon.py ``reconstruct_single_block``).

AdaRound variables on every weight of the unit (Adam at ``lr_round``) and the step sizes of the given activation
quantizers (Adam at ``lr_act``, cosine to 0 over the iterations), on the shared loop
(:func:`ptq_bench.transforms.reconstruction.reconstruct_block`, a fresh ``randperm`` batch each step). The objective
is the caller's reconstruction loss of a batch plus ``round_weight``·Σ(1 − |2h(α) − 1|^b) once the annealing is
active; afterwards every weight takes its hard rounding. QDrop, APHQ-ViT, FIMA-Q and AdaLog's Retrain differ only
in the loss, the inputs and what happens around the loop (``during``: e.g. dropped activation quantization).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.adaround import RoundingAnnealing, adaround_layers, attach_, bake_
from ptq_bench.transforms.reconstruction import ReconStep, learnable_scales, reconstruct_block


@dataclass(frozen=True)
class UnitTraining:
    """The optimization settings of one unit (each method's YAML)."""

    iters: int
    batch_size: int
    lr_round: float
    lr_act: float
    round_weight: float
    annealing: RoundingAnnealing
    #: batches taken in turn rather than drawn (the detection fork's one image per step, ``it % n``)
    in_order: bool = False


def train_unit(
    unit: nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    rec_loss: Callable[[torch.Tensor], torch.Tensor],
    activations: Sequence[Quantizer],
    t: UnitTraining,
    generator: torch.Generator,
    desc: str = "",
    progress: bool = False,
    during: Optional[AbstractContextManager] = None,
) -> list[float]:
    """Train ``unit``'s rounding and ``activations``' step sizes on ``rec_loss(batch indices)``; returns the loss
    history. ``inputs``/``target`` give the sample count and device (the loss indexes what it needs)."""
    layers = adaround_layers(unit)
    rounders = attach_(layers)
    count = 0

    def objective(idx: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        total = rec_loss(idx)
        if t.annealing.active(count):
            b = t.annealing.b(count)
            total = total + sum(t.round_weight * r.regularizer(b) for r in rounders)
        return total

    try:
        with learnable_scales([(q, "scale") for q in activations]) as scales:
            for r in rounders:
                r.alpha.requires_grad_(True)
            act_opt = torch.optim.Adam(scales, lr=t.lr_act) if scales else None
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, T_max=t.iters, eta_min=0.0) if act_opt else None

            def act_step() -> None:
                if act_opt is not None and schedule is not None:
                    act_opt.step()
                    schedule.step()

            step = ReconStep(torch.optim.Adam([r.alpha for r in rounders], lr=t.lr_round),
                             torch.arange(inputs.shape[0], device=inputs.device),
                             before=act_opt.zero_grad if act_opt else None, after=act_step, always_shuffle=not t.in_order,
                             in_order=t.in_order)
            with during or nullcontext():
                history = reconstruct_block(unit, inputs, target, [step], t.iters, t.batch_size, generator, objective,
                                            desc=desc, progress=progress)
            for r in rounders:
                r.soft = False
        return history
    finally:
        bake_(layers)


@contextmanager
def official_gradients(quantizers: list[UniformQuantizer]) -> Iterator[None]:
    """Inside the context the quantizers differentiate their literal expression with an inclusive clamp: autograd
    through quantizers/uniform.py ``UniformQuantizer.forward`` as the official code trains it (torch <= 2.13 clamp
    gradient). The fused node of ptq_bench/quant/ste.py gives the same values but rounds its gradients otherwise
    (a learned step size one or two float steps apart after a few iterations); the literal chain costs about 15 %
    more CPU per reconstruction step at deit_tiny size."""
    flags = [(q, q.literal_gradient, q.inclusive_clamp) for q in quantizers]
    for q in quantizers:
        q.literal_gradient = q.inclusive_clamp = True
    try:
        yield
    finally:
        for q, literal, inclusive in flags:
            q.literal_gradient, q.inclusive_clamp = literal, inclusive
