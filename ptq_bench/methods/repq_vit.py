"""RepQ-ViT (Li et al., ICCV 2023, arXiv 2212.08254): scale-reparameterized post-LayerNorm activations and a
log√2 quantizer for the post-Softmax map, calibrated without reconstruction.

Recipe (zkkli/RepQ-ViT classification/test_quant.py ``main``, quant/quant_model.py ``quant_model``):

1. every Linear (head included) and the patch-embedding conv get a per-output-channel weight quantizer (w bits)
   and a per-tensor input quantizer (a bits; 8 bits for the patch-embedding input); the inputs of qkv, fc1 and
   Swin's patch-merging reduction (post-LayerNorm) are quantized per channel; in attention, Q, K and V get
   per-tensor uniform quantizers and the post-Softmax map a log√2 quantizer. Every range comes from the
   percentile search (observers.percentile_observer; the log quantizers' own search);
2. one forward of the calibration batch with everything quantized: each quantizer fits itself on the first
   tensor it sees (so later layers see quantized earlier ones);
3. scale reparameterization of each post-LayerNorm quantizer to per tensor with the channel-mean target
   (:func:`ptq_bench.transforms.reparameterize_layernorm_`);
4. re-calibration: the official code runs the calibration batch once more, but only the weight quantizers of
   the reparameterized Linears are un-initialised at that point, so that pass only refits those weight
   quantizers on the new weights. We refit them directly, which gives the same parameters without the forward.

Official-code details kept: z̃ is the unrounded mean of the channel zero points; the head and the patch-embedding
weights are quantized; quantiles are ``torch.quantile``'s (q cast to float32 first, see observers.py). Not
reproduced: the official ``np.percentile`` fallback, taken when ``torch.quantile`` raises on tensors above 2^24
elements (old torch; Swin stage-1 activations with 32 images). torch 2.14, which the oracles run, no longer
raises, so the fallback is dead code there. Checked against the official code with ``python -m
ptq_bench.compare``: every quantizer parameter and the quantized logits of deit_tiny W4A4/W6A6 are bit-identical.

Option ``softmax_quantizer`` (any post-Softmax quantizer of the registry: log_sqrt2, log2, uniform, ...) swaps the
post-Softmax quantizer for the paper's ablation (Sec. 5.3); ``uniform`` is the per-tensor percentile-searched
uniform quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import nn

from ptq_bench.calibration import CalibrationData
from ptq_bench.methods.base import METHODS, Method
from ptq_bench.architectures.base import NormLinearPair
from ptq_bench.models import calibrating, layernorm_linear_pairs
from ptq_bench.models.placement import QuantizerSpec
from ptq_bench.quant.layers import QuantLinear
from ptq_bench.transforms import mean_target, reparameterize_layernorm_
from ptq_bench.transforms.reparam import folded_pairs
from ptq_bench.transforms.invariants import keeps_fp_function

#: The patch-embedding input is always quantized at 8 bits (quant_modules.py, ``QuantConv2d``).
PATCH_EMBED_INPUT_BITS = 8


@dataclass(frozen=True)
class RepQViTOptions:
    softmax_quantizer: str
    post_norm: Literal["refuse", "skip"]  # skip: no fold in blocks that are not pre-norm (per-tensor inputs there)


def repq_placement(softmax_quantizer: str, softmax_options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, QuantizerSpec | None]:
    """RepQ-ViT's quantizer table, with ``softmax_quantizer`` on the post-Softmax map built with
    ``softmax_options[softmax_quantizer]`` (DopQ-ViT reuses it); a uniform post-Softmax quantizer is per tensor and
    percentile-searched like the other activations."""
    percentile = {"observer": "percentile"}
    per_tensor = {"granularity": "tensor", **percentile}
    options = {"uniform": per_tensor, **(softmax_options or {})}
    return {
        "weight": QuantizerSpec("uniform", "w", {"granularity": "channel", "channel_dim": 0, **percentile}),
        "post_layernorm": QuantizerSpec("uniform", "a", {"granularity": "channel", "channel_dim": -1, **percentile}),
        "post_softmax": QuantizerSpec(softmax_quantizer, "a", options.get(softmax_quantizer, {})),
        "patch_embed": QuantizerSpec("uniform", PATCH_EMBED_INPUT_BITS, per_tensor),
        "activation": QuantizerSpec("uniform", "a", per_tensor),
    }


def per_tensor_reductions_(model: nn.Module, method: Method) -> list[NormLinearPair]:
    """Swin's patch-merging reductions get a per-tensor input quantizer (``method``'s ``activation`` spec; the
    lineage's quant_model.py sets per channel only for qkv and fc1 inputs) and stay out of the LayerNorm fold
    (``reparameterization`` edits norm1/norm2 only), as I&S-ViT and ERQ have it; returns the norm → Linear pairs
    left to fold."""
    reductions = set()
    for name, module in model.named_modules():
        if name.endswith("downsample.reduction") and isinstance(module, QuantLinear) and module.input_quantizer is not None:
            quantizer = method.quantizer_table()["activation"].build(method.bits).to(module.weight.device)
            quantizer.role = module.input_quantizer.role
            module.input_quantizer = quantizer
            reductions.add(id(module))
    return [p for p in layernorm_linear_pairs(model) if not any(id(linear) in reductions for linear in p.linears)]


@METHODS.register("repq_vit")
class RepQViT(Method):
    name = "repq_vit"
    accepts_layer_bits = True
    Options = RepQViTOptions
    role_options = {"post_softmax": "softmax_quantizer"}

    def needs(self) -> frozenset[str]:
        return frozenset({"layernorm_pairs"} if self.options.post_norm == "refuse" else set())

    def placement(self) -> dict[str, QuantizerSpec | None]:
        return repq_placement(self.options.softmax_quantizer)

    def foldable_roles(self) -> frozenset[str]:
        return frozenset({"post_layernorm"})

    @torch.no_grad()
    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        self.place_quantizers_(model)
        with calibrating(model):
            data.run(model)  # one forward of the whole calibration set, as the official code does
            with keeps_fp_function(model, data, "RepQ-ViT LayerNorm→Linear reparameterization") as check:
                edited = reparameterize_layernorm_(model, mean_target, self.options.post_norm == "skip")
            self.transforms.append(check.record(folded=folded_pairs(model, edited)))
            for linear in edited:
                linear.quantized_weight()  # refits the reset weight quantizer on the reparameterized weight
        return model
