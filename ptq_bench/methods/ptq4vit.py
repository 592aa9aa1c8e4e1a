"""PTQ4ViT (Yuan et al., ECCV 2022) and its Base PTQ baseline, following the official code hahnyuan/PTQ4ViT @ b42c790.

Pipeline (utils/quant_calib.py ``HessianQuantCalibrator.batching_quant_calib``, run by example/test_all.py):

1. The FP model's softmax outputs on the whole calibration set are the pseudo-labels.
2. Each quantized layer's FP inputs, FP output and the gradient of
   ``KL(pseudo-label || softmax(logits))`` w.r.t. that output are recorded, in fwd/bwd passes of
   ``grad_batch_size`` (4) images with every layer in FP. Calibration is *parallel*: every layer sees FP inputs.
3. Each layer then searches its scales (:mod:`ptq_bench.methods.ptq4vit_search`). Candidates are
   ``(eq_alpha + i(eq_beta-eq_alpha)/eq_n)·Δ_init`` for i < eq_n (the code builds eq_n+1 values but evaluates only
   the first eq_n), with Δ_init = max|·|/(2^(b-1)-0.5). Weight and activation (or A and B) scales are searched
   alternately for ``search_round`` rounds. The metric is ``hessian`` (mean of (∂L/∂O·(O-Ô))², Sec. 3.3) or ``cosine``.

Granularity and layer choices (configs/PTQ4ViT.py, configs/BasePTQ.py, utils/net_wrap.py):
* Linear: one weight scale per layer, except qkv, which gets three (q, k and v rows). One input scale per layer.
  The classifier head is quantized too.
* Matmuls (Q·Kᵀ and attn·V): one scale per head for each operand (``PTQSLBatchingQuantMatMul``
  sets n_G to the head count). With ``twin_softmax`` the post-Softmax operand uses one twin-uniform split
  searched over 2^-i, i < n_split.
* fc2 input: twin-uniform post-GELU grid when ``twin_gelu`` is set.
* Patch-embedding conv: input not quantized (``a_bit=32``). The weight is per output channel
  (``ChannelwiseBatchingQuantConv2d``, PTQ4ViT) or per layer (``BatchingEasyQuantConv2d``, Base PTQ).

Where the README and the code differ, we follow the code:
* PTQ4ViT: eq_alpha = 0.01 in configs/PTQ4ViT.py (the README says α = 0). Base PTQ: α = 0.5, β = 1.2, one round
  and the cosine metric (configs/BasePTQ.py and the README). example/test_all.py overrides the metric of *both*
  configs with ``hessian``; ``base_ptq metric=hessian`` reproduces that run.
* ``bias_correction: True`` in configs/PTQ4ViT.py has no effect: the batching layers never call it.
* The twin-uniform grids add their two ranges (see :mod:`ptq_bench.quant.twin_uniform`).

A property of the official objective that we keep: at the FP model the KL loss has zero gradient
(softmax(logits) equals the pseudo-label). So the recorded gradients are floating-point residues of about 1e-10
(the difference between exp(log_softmax) and softmax). They still act as per-element weights. Because
of this, the Hessian-guided choice depends on rounding, and only a bit-identical forward and backward
reproduces the official scales exactly. Our prepared timm 1.x model matches timm 0.4.12 bit for bit on DeiT.

Two speed-ups do not change the result:
* Several layers are recorded in one fwd/bwd pass, within ``capture_mb`` (the official code makes one pass
  per layer).
* Candidate stacks are evaluated in ``search_chunk_mb`` chunks. Rounds stop early at a fixed point, because
  a round that reproduces the previous scales would repeat itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ptq_bench.architectures import architecture_for
from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.methods.options import runtime
from ptq_bench.methods.ptq4vit_capture import (
    Recording,
    capture_groups,
    record_layers,
    soft_targets,
)
from ptq_bench.methods.ptq4vit_search import (
    SearchSettings,
    search_conv,
    search_linear,
    search_matmul,
)
from ptq_bench.models import set_quantizers_enabled
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul


@dataclass(frozen=True)
class PTQ4ViTOptions:
    """Every option of the method (conf/method/ptq4vit.yaml and base_ptq.yaml give the values)."""

    metric: Literal["hessian", "cosine"]
    eq_alpha: float
    eq_beta: float
    eq_n: int
    search_round: int
    n_split: int
    twin_softmax: bool
    twin_gelu: bool
    conv_channelwise: bool
    grad_batch_size: int
    capture_mb: int = runtime()
    search_chunk_mb: int = runtime()

    def __post_init__(self) -> None:
        if not 0 <= self.eq_alpha < self.eq_beta:
            raise ConfigError(f"need 0 <= eq_alpha < eq_beta, got {self.eq_alpha}, {self.eq_beta}")
        for key in ("eq_n", "search_round", "n_split", "grad_batch_size", "capture_mb", "search_chunk_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"PTQ4ViT option {key} must be >= 1, got {getattr(self, key)}")


@METHODS.register("ptq4vit")
class PTQ4ViT(Method):
    """Twin-uniform quantization and Hessian-guided scale search (configs/PTQ4ViT.py)."""

    name = "ptq4vit"
    Options = PTQ4ViTOptions
    accepts_quantizers = False

    # ------------------------------------------------------------------------------------------ quantizers

    def placement(self) -> dict[str, QuantizerSpec | None]:
        """Symmetric uniform grids, per output channel for weights and per head for Q, K, V (and a uniform
        post-Softmax map); the twin grids where switched on; the patch-embedding input stays FP (a_bit=32)."""
        per_head = QuantizerSpec("uniform", "a", {"symmetric": True, "granularity": "channel", "channel_dim": 1})
        per_tensor = QuantizerSpec("uniform", "a", {"symmetric": True, "granularity": "tensor"})
        return {
            "weight": QuantizerSpec("uniform", "w", {"symmetric": True, "granularity": "channel", "channel_dim": 0}),
            "patch_embed": None,
            "conv": None,
            "post_gelu": QuantizerSpec("twin_gelu") if self.options.twin_gelu else per_tensor,
            "post_softmax": QuantizerSpec("twin_softmax") if self.options.twin_softmax else per_head,
            "query": per_head,
            "key": per_head,
            "value": per_head,
            "activation": per_tensor,
        }

    # ------------------------------------------------------------------------------------------ pipeline

    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        need_grad = self.options.metric == "hessian"
        if not data.uniform_shapes:
            raise ConfigError(f"{self.name} stacks each layer's inputs over the calibration set, but this task's layers see inputs of several shapes (detection: images of different sizes, heads on every FPN level)")
        if need_grad and not data.logits:
            raise ConfigError(f"{self.name} metric=hessian needs a task whose forward returns class logits (use metric=cosine)")
        model.eval()
        qkv = {id(m) for m in architecture_for(model).qkv_linears(model)}
        self.place_quantizers_(model)
        set_quantizers_enabled(model, False)  # the model stays FP until every layer is searched
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]
        targets = soft_targets(model, data) if need_grad else None
        settings = SearchSettings(
            metric=self.options.metric,
            eq_alpha=self.options.eq_alpha,
            eq_beta=self.options.eq_beta,
            eq_n=self.options.eq_n,
            search_round=self.options.search_round,
            n_split=self.options.n_split,
            chunk_numel=self.options.search_chunk_mb * 2**20 // 4,
        )
        for group in capture_groups(model, layers, data, self.options.capture_mb):
            records = record_layers(model, group, data, targets, self.options.grad_batch_size)
            for name, layer in group:
                self._calibrate_layer(layer, records.pop(name), settings, groups=3 if id(layer) in qkv else 1)
        set_quantizers_enabled(model, True)
        return model

    def _calibrate_layer(self, layer: nn.Module, record: Recording, settings: SearchSettings, groups: int) -> None:
        if isinstance(layer, QuantLinear):
            search_linear(layer, record, settings, self.bits, groups)
        elif isinstance(layer, QuantConv2d):
            search_conv(layer, record, settings, self.bits.w, self.options.conv_channelwise)
        else:
            search_matmul(layer, record, settings, self.bits.a)


@METHODS.register("base_ptq")
class BasePTQ(PTQ4ViT):
    """The paper's Base PTQ (configs/BasePTQ.py): same parallel search and options, with its own YAML (no twin
    grids, layer-wise conv weight, cosine metric, α = 0.5, β = 1.2, one round)."""

    name = "base_ptq"
