"""AdaLog's "Retrain" (``test_quant.py --optimize``): BRECQ-style reconstruction of every unit after the calibration.

GoatWu/AdaLog @ 75a57d2, utils/block_recon.py ``BlockReconstructor.reconstruct_model(quant_act=cfg.train_act)``:
unit by unit in module order (the patch embedding, the transformer blocks, a Swin's patch merging, the head:
:func:`ptq_bench.methods.qdrop.reconstruction_units`), the unit's input and target output come from the FP model (a
copy taken before calibration), never from the quantized model, and nothing is mixed or dropped. For ``iters`` steps
a batch ``randperm(n)[:batch_size]`` is drawn and the loss minimized over the AdaRound variables of every weight
(:mod:`ptq_bench.transforms.adaround`, Adam at ``lr_round``) and the scale of every activation quantizer (Adam at
``lr_act``, cosine to 0): the uniform inputs and Q, K, V, and both AdaLog quantizers, the post-Softmax one included
(its s starts at 1; q, zero points and the shift stay). Loss (``LossFunction``): ‖ŷ - y‖² summed over tokens,
averaged over the rest, divided by 10 (no normalization by the first value); the head's KL(softmax(y) ‖ softmax(ŷ));
plus ``round_weight``·Σ(1 - |2h(α) - 1|^b) from ``warmup``·iters on, b linear from ``b_start`` to ``b_end``. The
quantizers train with straight-through rounding (``init_training``): the AdaLog ones de-quantize as 2^(-e·q/r)·s
instead of their tables there. Afterwards every weight takes its hard rounding; the post-GELU shift is folded by the
caller after this (``finish_training`` runs after ``reconstruct_model``).

The batches come from one generator seeded with the run's seed; each official unit first iterates its calibration
loader once (the FP capture), a DataLoader pass that draws one int64 from the global generator, drawn here too.
The optimization loop is the shared one (:func:`ptq_bench.transforms.reconstruction.reconstruct_block`), as QDrop's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.qdrop import fp_copy, head_loss, lp_loss, reconstruction_units
from ptq_bench.quant.adalog import AdaLogQuantizer
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.adaround import adaround_layers
from ptq_bench.transforms.block_capture import block_outputs, capture_block_inputs
from ptq_bench.transforms.qdrop import skip_loader_seeds
from ptq_bench.transforms.reconstruction import frozen_parameters
from ptq_bench.transforms.unit_training import UnitTraining, official_gradients, train_unit

__all__ = ["activation_quantizers", "fp_copy", "retrain_"]

log = logging.getLogger(__name__)

#: ``LossFunction``'s divisor of the 'mse' reconstruction loss (``lp_loss(...) / 10``).
MSE_DIVISOR = 10


def activation_quantizers(unit: nn.Module) -> list[Quantizer]:
    """The quantizers whose scale the official ``a_params`` holds: every enabled activation quantizer of the unit."""
    return [q for q in unit.modules() if isinstance(q, (UniformQuantizer, AdaLogQuantizer)) and q.role != "weight" and q.enabled]


def retrain_(model: nn.Module, fp_model: nn.Module, data: CalibrationData, training: UnitTraining,
             generator: torch.Generator, progress: bool = False, name: str = "adalog") -> None:
    """``reconstruct_model``: every unit of ``model`` in order, against ``fp_model``'s units on ``data``."""
    fp_units = dict(reconstruction_units(fp_model))
    with frozen_parameters(model):
        units = [(unit_name, unit) for unit_name, unit in reconstruction_units(model) if adaround_layers(unit)]
        for unit_name, unit in tqdm(units, desc=f"{name} units", disable=not progress):
            fp_in = capture_block_inputs(fp_model, fp_units[unit_name], data, training.batch_size)
            if not isinstance(fp_in, torch.Tensor):
                raise ConfigError(f"{name}: unit {unit_name} takes extra arguments or samples of different shapes")
            target = block_outputs(fp_units[unit_name], fp_in, training.batch_size)
            skip_loader_seeds(generator, 1)  # init_block_raw_inp_outp: one pass over the loader
            _retrain_unit(unit_name, unit, fp_in, target, training, generator, progress, name)


def _retrain_unit(unit_name: str, unit: nn.Module, fp_in: torch.Tensor, target: torch.Tensor, training: UnitTraining,
                  generator: torch.Generator, progress: bool, name: str) -> None:
    is_head = unit_name == "head"

    def rec_loss(idx: torch.Tensor) -> torch.Tensor:
        out, y = unit(fp_in[idx]), target[idx]
        return head_loss(out, y) if is_head else lp_loss(out, y) / MSE_DIVISOR

    activations = activation_quantizers(unit)
    with official_gradients([q for q in activations if isinstance(q, UniformQuantizer)]):
        history = train_unit(unit, fp_in, target, rec_loss, activations, training, generator,
                             f"reconstruct {unit_name}", progress)
    if history:
        log.info("%s %s: loss %.4g -> %.4g", name, unit_name, history[0], history[-1])
