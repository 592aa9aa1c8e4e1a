"""FIMA-Q (Wu et al., CVPR 2025): QDrop reconstruction with a diagonal-plus-low-rank Fisher loss.

ShiheWang/FIMA-Q @ 64c4b00, configs/{3,4,6}bit/best.py with ``--calibrate --optimize`` (utils/block_recon.py):
the APHQ-ViT calibration and QDrop reconstruction (:mod:`ptq_bench.methods.qdrop`) with these changes:

1. Every unit but the head minimizes :class:`~ptq_bench.transforms.fisher_loss.FisherDPLRLoss` (``optim_metric =
   'fisher_dplr'``, ``p1``, ``p2``), without QDrop's "normalization trick"; the head minimizes its KL unscaled.
2. Fisher refresh (``new_fisher_ro``, ``dis_mode = 'q'``): at every step ``it`` with ``it % (iters // k) == 0``, after
   the batch and its input mask are drawn, one pass over the reconstruction set (batches of ``batch_size``) through
   the FP model with only this unit quantized, as it is training (soft rounding, dropped activations: earlier units
   are back to 'raw' in the official code), gives the row mean |∂KL/∂O| (KL(log_softmax(ŷ/T) ‖ softmax(y/T)),
   ``batchmean``, T = ``temp``) and the row mean |Ô − O|. The pass iterates the official loader (one seed draw).
3. ``token_channel_wise`` (quant_layers/linear.py ``hyperparameter_searching``, quant_layers/matmul.py): after the
   calibration every 3-D Linear input's per-tensor scale becomes one scale per token, and each matmul operand's
   per-head scale one per head and row of A (Q, the attention map) or per head and column of B (Kᵀ, V), all
   started at the calibrated value and learned separately; zero points stay shared.

Two points of arithmetic make the run equal the official one bit for bit (tests/test_fima_q.py): the FP reference is
the calibrated model with its quantizers off (:func:`raw_copy`, the official 'raw' mode), and the activation
quantizers differentiate their literal expression with torch <= 2.13's clamp gradient (:func:`official_gradients`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS
from ptq_bench.methods.qdrop import QDrop, QDropOptions, RecLoss, fp_copy, head_loss
from ptq_bench.models.prepare import set_quantizers_enabled
from ptq_bench.quant.layers import QuantLinear, QuantMatMul
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.fisher_loss import FisherDPLRLoss
from ptq_bench.transforms.qdrop import dropping_activations, mixed_inputs, skip_loader_seeds
from ptq_bench.transforms.unit_training import official_gradients, train_unit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FimaQOptions(QDropOptions):
    """QDrop's options plus the Fisher loss's (conf/method/fima_q.yaml; configs/{3,4,6}bit/best.py)."""

    temp: float
    k: int
    p1: float
    p2: float
    token_wise: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError(f"option k must be >= 1, got {self.k}")
        if 0 < self.iters < self.k:
            raise ConfigError(f"option iters must be 0 or >= k ({self.k}) for the Fisher refresh, got {self.iters}")
        if self.temp <= 0:
            raise ConfigError(f"option temp must be > 0, got {self.temp}")


def token_wise_shapes(model: nn.Module, data: CalibrationData) -> dict[UniformQuantizer, tuple[int, ...]]:
    """The scale shape of every quantizer FIMA-Q's ``token_channel_wise`` widens, from one sample's forward."""
    shapes: dict[UniformQuantizer, tuple[int, ...]] = {}

    def record(quantizer: UniformQuantizer, shape: tuple[int, ...]) -> None:
        if isinstance(quantizer, UniformQuantizer) and quantizer.enabled:
            shapes[quantizer] = shape

    def linear_hook(layer: QuantLinear, args: tuple) -> None:
        if args[0].ndim == 3:
            record(layer.input_quantizer, (args[0].shape[1], 1))

    def matmul_hook(layer: QuantMatMul, args: tuple) -> None:
        (_, heads, rows, _), (_, _, _, cols) = args[0].shape, args[1].shape
        record(layer.quantizer_a, (heads, rows, 1))
        record(layer.quantizer_b, (heads, 1, cols))

    handles = [m.register_forward_pre_hook(linear_hook) for m in model.modules() if isinstance(m, QuantLinear)]
    handles += [m.register_forward_pre_hook(matmul_hook) for m in model.modules() if isinstance(m, QuantMatMul)]
    data.probe(model, handles)
    return shapes


def widen_scales_(shapes: dict[UniformQuantizer, tuple[int, ...]]) -> None:
    """Each quantizer's calibrated scale expanded to its shape (zero points unchanged)."""
    for quantizer, shape in shapes.items():
        quantizer.set_params(quantizer.scale.expand(shape), quantizer.zero_point)


def raw_copy(model: nn.Module) -> nn.Module:
    """``model`` as calibrated with every quantizer off: the official reconstructor's FP model (its own wrapped model
    in 'raw' mode, test_quant.py / utils/block_recon.py ``init_block_raw_inp_outp``), whose qkv and fc1 hold the
    calibration's LayerNorm fold and whose attention computes (q·kᵀ)·scale. timm's FP model (unfolded, fused or
    (q·scale)·kᵀ attention) computes the same function with other float steps (1e-6 in a tiny block's output)."""
    raw = fp_copy(model)
    set_quantizers_enabled(raw, False)
    return raw


@contextmanager
def swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
    """``model``'s submodule ``name`` replaced by ``module`` inside the context."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, child)
    setattr(parent, child, module)
    try:
        yield
    finally:
        setattr(parent, child, original)


class FisherUnitLoss:
    """One unit's DPLR Fisher loss with its refresh pass (``new_fisher_ro``) through the FP model."""

    def __init__(self, name: str, fp_model: nn.Module, data: CalibrationData, fp_softmax: list[torch.Tensor],
                 o: FimaQOptions) -> None:
        self.name, self.fp_model, self.data, self.fp_softmax, self.o = name, fp_model, data, fp_softmax, o
        self.loss = FisherDPLRLoss(o.p1, o.p2)

    def refresh(self, unit: nn.Module, target: torch.Tensor, generator: torch.Generator) -> None:
        """Add a rank from one pass over the reconstruction set with ``unit`` (training state) in the FP model."""
        skip_loader_seeds(generator, 1)
        outputs: list[torch.Tensor] = []
        hook = unit.register_forward_hook(lambda _m, _a, out: outputs.append(out))
        grads, deltas = [], []
        try:
            with swapped(self.fp_model, self.name, unit):
                for batch, fp_soft in zip(self.data.batches(self.o.batch_size), self.fp_softmax):
                    outputs.clear()
                    pred = self.data.forward(self.fp_model, batch) / self.o.temp
                    kl = F.kl_div(F.log_softmax(pred, dim=-1), fp_soft, reduction="batchmean")
                    (grad,) = torch.autograd.grad(kl, outputs[0])
                    grads.append(grad.detach())
                    deltas.append(outputs[0].detach())
        finally:
            hook.remove()
        grad = torch.cat(grads).reshape(len(target), -1).abs().mean(dim=0)
        delta = (torch.cat(deltas) - target).abs().mean(dim=0).reshape(-1)
        self.loss.refresh(grad, delta)

    def __call__(self, output: torch.Tensor, target: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.loss(output, target)


@METHODS.register("fima_q")
class FimaQ(QDrop):
    """FIMA-Q: QDrop reconstruction on the DPLR Fisher loss, refreshed ``k`` times per unit."""

    runs_detectors = False  # ShiheWang/FIMA-Q has no detection code

    name = "fima_q"
    Options = FimaQOptions

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        if self.options.iters > 0 and not data.logits:
            raise ConfigError(f"{self.name}'s Fisher refresh differentiates a KL of class logits: this task's forward returns none")
        return super()._quantize(model, data)

    def fp_reference(self, model: nn.Module) -> None:
        """None: FIMA-Q reconstructs against :func:`raw_copy`, taken after calibration, so no copy is made before."""
        return None

    def calibrate_(self, model: nn.Module, data: CalibrationData) -> None:
        """APHQ-ViT's calibration, then (``token_wise``) the per-token scales of ``token_channel_wise``."""
        super().calibrate_(model, data)
        if self.options.token_wise:
            widen_scales_(token_wise_shapes(model, data))

    def reconstruct(self, model: nn.Module, fp_model: nn.Module | None, data: CalibrationData,
                    generator: torch.Generator | None = None) -> None:
        """QDrop's reconstruction against :func:`raw_copy` of ``model`` (the official FP reference), not ``fp_model``
        (the FP model before calibration: the same function, other float steps)."""
        self._fp_softmax: list[torch.Tensor] | None = None
        super().reconstruct(model, raw_copy(model), data, generator)

    def unit_loss(self, name: str, fp_model: nn.Module, fp_unit: nn.Module, data: CalibrationData) -> RecLoss:
        """The head's KL, every other unit's :class:`FisherUnitLoss` (FP softmax(y/T) computed once per run)."""
        if name == "head":
            return lambda out, target, idx: head_loss(out, target)
        if self._fp_softmax is None:
            with torch.no_grad():
                self._fp_softmax = [F.softmax(data.forward(fp_model, batch) / self.options.temp, dim=-1)
                                    for batch in data.batches(self.options.batch_size)]
        return FisherUnitLoss(name, fp_model, data, self._fp_softmax, self.options)

    def _reconstruct_unit(self, name: str, unit: nn.Module, q_in: torch.Tensor, fp_in: torch.Tensor, target: torch.Tensor,
                          rec_loss: RecLoss, generator: torch.Generator, masks: torch.Generator) -> None:
        """QDrop's unit training with the official FIMA-Q loop: the loss unnormalized, the Fisher refreshed after the
        input mask of every ``iters // k``-th step."""
        o = self.options
        if not isinstance(q_in, torch.Tensor):
            raise ConfigError(f"{self.name}: unit {name} takes extra arguments or samples of different shapes")
        activations = [q for q in unit.modules() if isinstance(q, UniformQuantizer) and q.role != "weight" and q.enabled]
        every = o.iters // o.k
        step = {"it": 0}

        def loss(idx: torch.Tensor) -> torch.Tensor:
            x = mixed_inputs(q_in[idx], fp_in[idx], o.drop_prob, masks)
            if isinstance(rec_loss, FisherUnitLoss) and step["it"] % every == 0:
                rec_loss.refresh(unit, target, generator)
            step["it"] += 1
            return rec_loss(unit(x), target[idx], idx)

        with official_gradients(activations):
            history = train_unit(unit, q_in, target, loss, activations, self.unit_training(), generator,
                                 f"reconstruct {name}", self.progress,
                                 during=dropping_activations(activations, o.drop_prob, masks))
        log.info("%s %s: loss %.4g -> %.4g", self.name, name, history[0], history[-1])
