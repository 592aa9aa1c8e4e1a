"""QDrop (Wei et al., ICLR 2022, arXiv 2203.05740) as the APHQ-ViT authors reproduce it for ViTs.

GoatWu/APHQ-ViT @ 84c9fde, configs/{3,4}bit/qdrop_baseline.py with ``--calibrate --optimize``:

1. Calibration (:mod:`ptq_bench.methods.aphq_vit_calibration`) on the first ``search_size`` calibration images
   (calib_size = 128 in the configs; the reconstruction set is optim_size = 1024).
2. Reconstruction, unit by unit in module order: the patch embedding, every transformer block and a Swin's patch
   merging, the head (utils/block_recon.py ``BlockReconstructor``). Each unit's FP input and output come from the FP model, its
   quantized input from the quantized model (earlier units already reconstructed); for ``iters`` steps a batch of
   ``batch_size`` samples (``randperm(n)[:batch_size]``) is drawn, the input mixed per element (QDrop, ``drop_prob``:
   the quantized input with that probability, :mod:`ptq_bench.transforms.qdrop`), every activation quantizer's
   output mixed with its input likewise, and the loss minimized over the AdaRound variables of every weight
   (:mod:`ptq_bench.transforms.adaround`, Adam at ``lr_round``) and the step size of every activation quantizer
   (Adam at ``lr_act``, cosine to 0). Loss: the block output error ‖ŷ - y‖² summed over tokens, averaged over the
   rest (``lp_loss``), the head's KL(softmax(y) ‖ softmax(ŷ)); divided by its first value and doubled (the fork's
   "normalization trick"), plus ``round_weight``·Σ(1 - |2h(α) - 1|^b) after ``warmup``·iters with b from ``b_start``
   to ``b_end``. Then every weight takes its hard rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging
from torch import nn
from tqdm.auto import tqdm

from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.aphq_vit_calibration import AphqCalibration, CalibrationOptions
from ptq_bench.methods.aphq_vit_detection import has_quantized_layers, reconstruct_detector_
from ptq_bench.methods.base import METHODS
from ptq_bench.models import find_blocks
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.adaround import RoundingAnnealing
from ptq_bench.transforms.block_capture import block_outputs, capture_block_inputs
from ptq_bench.transforms.qdrop import (
    dropping_activations,
    mixed_inputs,
    skip_loader_seeds,
)
from ptq_bench.transforms.reconstruction import frozen_parameters
from ptq_bench.transforms.unit_training import UnitTraining, official_gradients, train_unit

log = logging.getLogger(__name__)

#: a unit's reconstruction loss: (output, target, sample indices) → scalar
RecLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QDropOptions(CalibrationOptions):
    """Calibration plus block reconstruction (conf/method/qdrop.yaml; utils/block_recon.py defaults)."""

    search_size: int
    batch_size: int
    iters: int
    lr_round: float
    lr_act: float
    round_weight: float
    b_start: float
    b_end: float
    warmup: float
    drop_prob: float

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("search_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"option {key} must be >= 1, got {getattr(self, key)}")
        if self.iters < 0:
            raise ConfigError(f"option iters must be >= 0, got {self.iters}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"option warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ConfigError(f"option drop_prob must be in [0, 1], got {self.drop_prob}")


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The official reconstruction units (``BlockReconstructor.types_of_block``) in module order: the patch
    embedding, the transformer blocks, a Swin's patch merging layers, the head (those the model has)."""
    blocks = {id(block) for _, block in find_blocks(model)}
    return [(name, module) for name, module in model.named_modules()
            if name in ("patch_embed", "head") or id(module) in blocks or isinstance(module, PatchMerging)]


def fp_copy(model: nn.Module) -> nn.Module:
    """The FP model as it is now (the official ``full_model``), in eval mode, without parameter gradients."""
    model.eval()
    fp_model = copy.deepcopy(model).eval()
    for p in fp_model.parameters():
        p.requires_grad_(False)
    return fp_model


def lp_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖ŷ - y‖² summed over dim 1 (tokens), averaged over the rest (``LossFunction.lp_loss``, p = 2)."""
    return (output - target).abs().pow(2).sum(1).mean()


def head_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(softmax(y) ‖ softmax(ŷ)), ``batchmean`` (the head's ``kl_div``)."""
    return F.kl_div(F.log_softmax(output, dim=-1), F.softmax(target, dim=-1).detach(), reduction="batchmean")


@METHODS.register("qdrop")
class QDrop(AphqCalibration):
    """QDrop: APHQ-ViT's calibration, then AdaRound + activation-step reconstruction with dropped quantization."""

    name = "qdrop"
    Options = QDropOptions

    def needs(self) -> frozenset[str]:
        return super().needs() | {"blocks"}

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        if not data.uniform_shapes:
            if not self.runs_detectors:
                raise ConfigError(f"{self.name} on a detector is not built: its official code has no detection path")
            return self._quantize_detector(model, data)
        o = self.options
        fp_model = self.fp_reference(model)
        self.prepare_fp_(model, fp_model, data)
        size = min(o.search_size, len(data))
        if size < o.search_size:
            log.warning("%s: %d calibration samples, fewer than search_size %d: the search uses them all", self.name, size, o.search_size)
        self.calibrate_(model, dataclasses.replace(data, samples=data.samples[:size]))
        if o.iters > 0:
            self.reconstruct(model, fp_model, data)
        return model

    #: whether the APHQ-ViT detection fork's pipeline runs this method on a detector
    runs_detectors = True
    #: the detection fork's backbone-unit loss: the RPN perturbation Hessian (APHQ-ViT) or the MSE (QDrop)
    detection_hessian = False

    def _quantize_detector(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        """The detection fork's pipeline (:mod:`ptq_bench.methods.aphq_vit_detection`): one image per step."""
        o = self.options
        if o.batch_size != 1 or o.search_size != 1:
            raise ConfigError(f"{self.name} on a detector takes one image at a time and searches on one image, as the "
                              f"official detection code does: set method.batch_size=1 method.search_size=1 (got "
                              f"{o.batch_size}, {o.search_size}; conf/experiment/aphqvit_coco.yaml sets them)")
        self.detector = True
        fp_model = fp_copy(model)
        self.prepare_fp_detector_(model, fp_model, data)
        self.calibrate_(model, dataclasses.replace(data, samples=data.samples[:1]))
        if o.iters > 0:
            training = dataclasses.replace(self.unit_training(), in_order=True)
            reconstruct_detector_(model, fp_model, data, training, o.drop_prob, self.detection_hessian,
                                  torch.Generator().manual_seed(self.seed), self.name, self.progress)
        return model

    def prepare_fp_detector_(self, model: nn.Module, fp_model: nn.Module, data: CalibrationData) -> None:
        """A change to the detector before calibration (APHQ-ViT's MLP reconstruction); none for QDrop."""

    def fp_reference(self, model: nn.Module) -> nn.Module | None:
        """The FP model the units reconstruct against, copied before calibration (the official ``full_model``)."""
        return fp_copy(model)

    def calibrate_(self, model: nn.Module, data: CalibrationData) -> None:
        """The calibration search alone (:class:`AphqCalibration`), on all of ``data``."""
        super()._quantize(model, data)

    def prepare_fp_(self, model: nn.Module, fp_model: nn.Module | None, data: CalibrationData,
                    generator: torch.Generator | None = None) -> None:
        """A change to the FP model before calibration (APHQ-ViT's MLP reconstruction); none for QDrop."""

    def reconstruct(self, model: nn.Module, fp_model: nn.Module, data: CalibrationData,
                    generator: torch.Generator | None = None) -> None:
        """``BlockReconstructor.reconstruct_model`` (qdrop mode, activation steps learned): every unit in order,
        with one generator for batches and masks (seeded by the run's seed)."""
        o = self.options
        generator = generator or torch.Generator().manual_seed(self.seed)
        device = next(model.parameters()).device
        # the official batches come from the CPU generator, the masks from the device's (one stream on a CPU)
        masks = generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(self.seed)
        fp_units = dict(reconstruction_units(fp_model))
        with frozen_parameters(model):
            units = [(name, unit) for name, unit in reconstruction_units(model) if has_quantized_layers(unit)]
            for name, unit in tqdm(units, desc=f"{self.name} units", disable=not self.progress):
                fp_unit = fp_units[name]
                fp_in = capture_block_inputs(fp_model, fp_unit, data, o.batch_size)
                target = block_outputs(fp_unit, fp_in, o.batch_size)
                q_in = fp_in if name == "patch_embed" else capture_block_inputs(model, unit, data, o.batch_size)
                skip_loader_seeds(generator, self.capture_passes(name))
                self._reconstruct_unit(name, unit, q_in, fp_in, target, self.unit_loss(name, fp_model, fp_unit, data),
                                      generator, masks)

    def capture_passes(self, name: str) -> int:
        """Passes over the official calibration loader before a unit trains (``init_block_raw_data``): its FP input
        and output, and its quantized input (not for the patch embedding)."""
        return 1 if name == "patch_embed" else 2

    def unit_training(self) -> UnitTraining:
        """The options of every unit's training (``reconstruct_single_block``'s arguments)."""
        o = self.options
        return UnitTraining(o.iters, o.batch_size, o.lr_round, o.lr_act, o.round_weight,
                            RoundingAnnealing(o.iters, o.warmup, o.b_start, o.b_end))

    def unit_loss(self, name: str, fp_model: nn.Module, fp_unit: nn.Module, data: CalibrationData) -> RecLoss:
        """The reconstruction loss of one unit: ``lp_loss`` (``optim_metric = 'mse'``), the head's KL."""
        if name == "head":
            return lambda out, target, idx: head_loss(out, target)
        return lambda out, target, idx: lp_loss(out, target)

    def _reconstruct_unit(self, name: str, unit: nn.Module, q_in: torch.Tensor, fp_in: torch.Tensor, target: torch.Tensor,
                          rec_loss: RecLoss, generator: torch.Generator, masks: torch.Generator) -> None:
        o = self.options
        if not isinstance(q_in, torch.Tensor):
            raise ConfigError(f"{self.name}: unit {name} takes extra arguments or samples of different shapes")
        activations = [q for q in unit.modules() if isinstance(q, UniformQuantizer) and q.role != "weight" and q.enabled]
        state = {"count": 0, "init": 1.0}

        def normalized(idx: torch.Tensor) -> torch.Tensor:
            state["count"] += 1
            x = mixed_inputs(q_in[idx], fp_in[idx], o.drop_prob, masks)
            rec = rec_loss(unit(x), target[idx], idx)
            if state["count"] == 1:
                state["init"] = rec.item()
            return rec * 2 / state["init"]

        with official_gradients(activations):
            history = train_unit(unit, q_in, target, normalized, activations, self.unit_training(), generator,
                                 f"reconstruct {name}", self.progress, during=dropping_activations(activations, o.drop_prob, masks))
        log.info("%s %s: loss %.4g -> %.4g", self.name, name, history[0], history[-1])
