"""I&S-ViT (Zhong et al., arXiv 2311.10126; TPAMI 2025): RepQ-ViT's quantizer layout with the shift-uniform-log2
post-Softmax quantizer (SULQ, :mod:`ptq_bench.quant.sulq`) and a three-stage smooth optimization (SOS).

Recipe as the official code runs it (zysxmu/IaS-ViT @ 9300cea test_quant.py ``main``, quant/quant_model.py):

1. quantizers: RepQ-ViT's table (:func:`ptq_bench.methods.repq_vit.repq_placement`) with SULQ on the post-Softmax
   map, no patch-embedding input quantizer (its QuantConv2d has none) and per-output-channel weights searched over
   the nine weight percentiles of ``init_quantization_scale`` (``ias_weight``; ``--w_cw`` as the README runs it);
2. stage 1, activations quantized and weights FP: the activation quantizers calibrate on the first ``init_size``
   images in one forward (``q_model(calib_data[:64])``), then every reconstruction unit (patch-embedding conv,
   blocks, Swin reductions, head; :mod:`ptq_bench.transforms.sos`) trains its weights and biases for ``iters``
   steps against the FP model's unit output, from the FP model's unit input;
3. stage 2: RepQ-ViT's LayerNorm reparameterization of the per-channel post-LayerNorm quantizers (norm1→qkv,
   norm2→fc1) on the trained weights (:func:`ptq_bench.transforms.reparameterize_layernorm_`);
4. stage 3, weights quantized too: every weight quantizer fits the current weight, then every unit trains again
   (through the weight quantizers, straight-through) from the quantized model's unit input (earlier units already
   retrained) against the FP model's unit output. Quantizer parameters stay as fitted.

Captures and batches go over the first ⌊N/batch_size⌋·batch_size images (``save_inp_oup_data`` drops the last
partial batch). Each unit's batches come from a generator seeded with the run's seed (the official code draws them
from the global generator, whatever state it is in). A unit with no acting quantizer (the patch embedding in stage
1, whose loss is exactly zero on a CPU) is not trained: Adam leaves weights with zero gradients unchanged.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.methods.qdrop import fp_copy
from ptq_bench.methods.repq_vit import per_tensor_reductions_, repq_placement
from ptq_bench.models import calibrating, named_quantizers
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.quant.observers import OBSERVERS, percentile_observer
from ptq_bench.transforms import mean_target, reparameterize_layernorm_
from ptq_bench.transforms.block_capture import block_outputs, capture_block_inputs
from ptq_bench.transforms.invariants import keeps_fp_function
from ptq_bench.transforms.reparam import folded_pairs
from ptq_bench.transforms.sos import (
    acting_quantizers,
    quantized_layers,
    reconstruction_units,
    train_unit,
)

log = logging.getLogger(__name__)

#: quant/quantizer.py ``init_quantization_scale`` for weights (``is_act`` False): the percentiles searched
IAS_WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)
OBSERVERS.register("ias_weight")(functools.partial(percentile_observer, percentiles=IAS_WEIGHT_PERCENTILES))


@dataclass(frozen=True)
class IaSViTOptions:
    init_size: int  # images of the activation calibration forward (calib_data[:64])
    batch_size: int  # captures and training batches (64)
    iters: int  # training steps per unit and stage (--iter)
    lr: float  # Adam learning rate, cosine-annealed to 0 over iters (4e-5)

    def __post_init__(self) -> None:
        if self.init_size < 1 or self.batch_size < 1 or self.iters < 0 or self.lr <= 0:
            raise ConfigError(f"ias_vit: init_size and batch_size must be >= 1, iters >= 0, lr > 0 (got {self})")


@METHODS.register("ias_vit")
class IaSViT(Method):
    name = "ias_vit"
    Options = IaSViTOptions
    #: 1 (2026-12-05): a timm Swin unit's loss sums over its tokens (sos.token_loss), as the official code's does;
    #: Swin results before it differ
    revision = 1

    def needs(self) -> frozenset[str]:
        return frozenset({"layernorm_pairs", "blocks"})

    def placement(self) -> dict[str, QuantizerSpec | None]:
        table = repq_placement("sulq")
        table["weight"] = QuantizerSpec("uniform", "w", {"granularity": "channel", "channel_dim": 0, "observer": "ias_weight"})
        table["patch_embed"] = None
        return table

    def foldable_roles(self) -> frozenset[str]:
        return frozenset({"post_layernorm"})

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        o = self.options
        usable = len(data) // o.batch_size * o.batch_size
        if usable == 0 and o.iters > 0:
            raise ConfigError(f"ias_vit: batch_size {o.batch_size} needs at least that many calibration samples (got {len(data)})")
        self.place_quantizers_(model)
        pairs = per_tensor_reductions_(model, self)  # the norm → Linear pairs to fold
        fp_model = fp_copy(model)  # the FP function with the explicit attention, as the official teacher computes it
        for _, quantizer in named_quantizers(fp_model):
            quantizer.enabled = False
        weighted = [(m.weight, m.weight_quantizer) for m in quantized_layers(model) if m.weight_quantizer is not None]
        for _, quantizer in weighted:
            quantizer.enabled = False
        with torch.no_grad(), calibrating(model):
            data.run(model, limit=o.init_size)
        self._reconstruct(model, fp_model, data, usable, "stage 1")
        with torch.no_grad(), keeps_fp_function(model, data, "RepQ-ViT LayerNorm→Linear reparameterization") as check:
            edited = reparameterize_layernorm_(model, mean_target, pairs=pairs)
        self.transforms.append(check.record(folded=folded_pairs(model, edited)))
        log.info("%s stage 2: %d LayerNorm -> Linear pairs reparameterized to per-tensor input grids", self.name, len(edited))
        with torch.no_grad():  # the official second calibration forward: only the weight quantizers are new
            for weight, quantizer in weighted:
                quantizer.enabled = True
                quantizer.calibrate(weight.detach())
                quantizer.calibrated = True
                quantizer.params_changed()
        self._reconstruct(model, fp_model, data, usable, "stage 3")
        return model

    def _reconstruct(self, model: nn.Module, fp_model: nn.Module, data: CalibrationData, usable: int, stage: str) -> None:
        """Every unit in order, on its first ``usable`` samples: stage 1 from the FP model's unit inputs, stage 3 from
        the quantized model's."""
        o = self.options
        if o.iters == 0:
            return
        model.eval()
        fp_units = dict(reconstruction_units(fp_model))
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in flags:
            p.requires_grad_(False)
        try:
            units = reconstruction_units(model)
            for name, unit in tqdm(units, desc=f"{self.name} {stage}", disable=not self.progress):
                if not acting_quantizers(unit):
                    continue
                fp_in = capture_block_inputs(fp_model, fp_units[name], data, o.batch_size)[:usable]
                targets = block_outputs(fp_units[name], fp_in, o.batch_size)
                inputs = fp_in if stage == "stage 1" else capture_block_inputs(model, unit, data, o.batch_size)[:usable]
                losses = train_unit(unit, inputs, targets, o.iters, o.batch_size, o.lr,
                                    torch.Generator().manual_seed(self.seed), f"{stage} {name}", self.progress)
                log.info("%s %s %s: loss %.4g -> %.4g", self.name, stage, name, losses[0], losses[-1])
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
