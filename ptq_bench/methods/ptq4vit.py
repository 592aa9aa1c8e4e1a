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
from typing import Optional

import torch
from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS, BitWidth, Method
from ptq_bench.methods.ptq4vit_capture import Recording, capture_groups, record_layers, soft_targets
from ptq_bench.methods.ptq4vit_search import (
    SearchSettings,
    search_conv,
    search_linear,
    search_matmul,
)
from ptq_bench.models import QuantSite, prepare_
from ptq_bench.models.attention import QuantAttention, QuantWindowAttention
from ptq_bench.quant import Quantizer, UniformQuantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul
from ptq_bench.quant.twin_uniform import TwinGeluQuantizer, TwinSoftmaxQuantizer

METRICS = ("hessian", "cosine")


@dataclass(frozen=True)
class PTQ4ViTOptions:
    """Every option of the method (conf/method/ptq4vit.yaml and base_ptq.yaml list them all)."""

    metric: str
    eq_alpha: float
    eq_beta: float
    eq_n: int
    search_round: int
    n_split: int
    twin_softmax: bool
    twin_gelu: bool
    conv_channelwise: bool
    grad_batch_size: int
    capture_mb: int
    search_chunk_mb: int

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"unknown PTQ4ViT metric '{self.metric}' ({', '.join(METRICS)})")
        if not 0 <= self.eq_alpha < self.eq_beta:
            raise ConfigError(f"need 0 <= eq_alpha < eq_beta, got {self.eq_alpha}, {self.eq_beta}")
        for key in ("eq_n", "search_round", "n_split", "grad_batch_size", "capture_mb", "search_chunk_mb"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"PTQ4ViT option {key} must be >= 1, got {getattr(self, key)}")


@METHODS.register("ptq4vit")
class PTQ4ViT(Method):
    """Twin-uniform quantization and Hessian-guided scale search (configs/PTQ4ViT.py)."""

    name = "ptq4vit"

    def __init__(
        self,
        bits: BitWidth,
        metric: str = "hessian",
        eq_alpha: float = 0.01,
        eq_beta: float = 1.2,
        eq_n: int = 100,
        search_round: int = 3,
        n_split: int = 20,
        twin_softmax: bool = True,
        twin_gelu: bool = True,
        conv_channelwise: bool = True,
        grad_batch_size: int = 4,
        capture_mb: int = 1024,
        search_chunk_mb: int = 512,
    ) -> None:
        super().__init__(bits)
        self.options = PTQ4ViTOptions(
            metric, float(eq_alpha), float(eq_beta), int(eq_n), int(search_round), int(n_split), bool(twin_softmax),
            bool(twin_gelu), bool(conv_channelwise), int(grad_batch_size), int(capture_mb), int(search_chunk_mb),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ quantizers

    def make_quantizer(self, site: QuantSite) -> Optional[Quantizer]:
        """Quantizer of one site, created disabled (the model stays FP until every layer is searched)."""
        quantizer = self._quantizer_for(site)
        if quantizer is not None:
            quantizer.enabled = False
        return quantizer

    def _quantizer_for(self, site: QuantSite) -> Optional[Quantizer]:
        w, a = self.bits.w, self.bits.a
        if site.is_weight:
            return UniformQuantizer(w, symmetric=True, granularity="channel", channel_dim=0)
        if site.role in ("patch_embed", "conv"):
            return None  # a_bit=32: the conv input is not quantized
        if site.role == "post_gelu" and self.options.twin_gelu:
            return TwinGeluQuantizer(a)
        if site.role == "post_softmax" and self.options.twin_softmax:
            return TwinSoftmaxQuantizer(a)
        if site.role in ("query", "key", "value", "post_softmax"):
            return UniformQuantizer(a, symmetric=True, granularity="channel", channel_dim=1)  # one scale per head
        return UniformQuantizer(a, symmetric=True, granularity="tensor")

    # ------------------------------------------------------------------------------------------ pipeline

    def quantize(self, model: nn.Module, calib_images: torch.Tensor) -> nn.Module:
        model.eval()
        prepare_(model, self.make_quantizer)
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]
        qkv = {id(m.qkv) for m in model.modules() if isinstance(m, (QuantAttention, QuantWindowAttention))}
        need_grad = self.options.metric == "hessian"
        targets = soft_targets(model, calib_images) if need_grad else None
        settings = SearchSettings(
            metric=self.options.metric,
            eq_alpha=self.options.eq_alpha,
            eq_beta=self.options.eq_beta,
            eq_n=self.options.eq_n,
            search_round=self.options.search_round,
            n_split=self.options.n_split,
            chunk_numel=self.options.search_chunk_mb * 2**20 // 4,
        )
        for group in capture_groups(model, layers, calib_images, self.options.capture_mb):
            records = record_layers(model, group, calib_images, targets, self.options.grad_batch_size)
            for name, layer in group:
                self._calibrate_layer(layer, records.pop(name), settings, groups=3 if id(layer) in qkv else 1)
        for _, layer in layers:
            for quantizer in layer.modules():
                if isinstance(quantizer, Quantizer):
                    quantizer.enabled = True
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
    """The paper's Base PTQ (configs/BasePTQ.py): same parallel search, no twin grids, layer-wise conv weight,
    cosine metric, α = 0.5, β = 1.2, one round."""

    name = "base_ptq"

    def __init__(
        self,
        bits: BitWidth,
        metric: str = "cosine",
        eq_alpha: float = 0.5,
        eq_beta: float = 1.2,
        eq_n: int = 100,
        search_round: int = 1,
        n_split: int = 20,
        twin_softmax: bool = False,
        twin_gelu: bool = False,
        conv_channelwise: bool = False,
        grad_batch_size: int = 4,
        capture_mb: int = 1024,
        search_chunk_mb: int = 512,
    ) -> None:
        super().__init__(
            bits, metric, eq_alpha, eq_beta, eq_n, search_round, n_split, twin_softmax, twin_gelu, conv_channelwise,
            grad_batch_size, capture_mb, search_chunk_mb,
        )  # fmt: skip
