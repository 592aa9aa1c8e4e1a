"""Eager module swapping for timm ViT / DeiT / Swin: where each quantizer goes and what role it plays.

``prepare_(model, factory)`` converts in place every ``nn.Linear`` (qkv, proj, fc1, fc2, head, Swin patch-merging
reduction), every ``nn.Conv2d`` (the patch embedding) and every attention module, asking ``factory`` for the
quantizer of each *site*. A site's role tells a method what tensor it quantizes, so a method can put a special
quantizer on the post-Softmax map or on post-LayerNorm / post-GELU inputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from timm.layers import Attention, Mlp
from timm.models.swin_transformer import PatchMerging, WindowAttention
from torch import nn

from ptq_bench.models.attention import QuantAttention, QuantWindowAttention
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear

#: Roles of quantization sites. ``weight`` is a layer's weight; the others are activations.
ROLES = (
    "weight",
    "patch_embed",  # input of the patch-embedding conv (the image)
    "post_layernorm",  # input of qkv, fc1 and Swin's patch-merging reduction
    "attn_proj",  # input of the attention output projection
    "post_gelu",  # input of fc2
    "head",  # input of the classifier
    "linear",  # input of any other Linear
    "conv",  # input of any other Conv2d
    "query",
    "key",
    "post_softmax",  # the attention map, first operand of attn @ V
    "value",
)


@dataclass(frozen=True)
class QuantSite:
    """One place a quantizer may go: ``layer`` is the dotted module name, ``role`` one of :data:`ROLES`."""

    layer: str
    role: str
    module: nn.Module

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown quantization role '{self.role}' (known: {', '.join(ROLES)})")

    @property
    def is_weight(self) -> bool:
        return self.role == "weight"


QuantizerFactory = Callable[[QuantSite], Optional[Quantizer]]


def _input_roles(model: nn.Module) -> dict[int, str]:
    """Map ``id(layer)`` to the role of its input, from the timm module structure."""
    roles: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, (Attention, WindowAttention)):
            roles[id(module.qkv)] = "post_layernorm"
            roles[id(module.proj)] = "attn_proj"
        elif isinstance(module, Mlp):
            roles[id(module.fc1)] = "post_layernorm"
            roles[id(module.fc2)] = "post_gelu"
        elif isinstance(module, PatchMerging):
            roles[id(module.reduction)] = "post_layernorm"
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier) and isinstance(get_classifier(), nn.Linear):
        roles[id(get_classifier())] = "head"
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and isinstance(getattr(patch_embed, "proj", None), nn.Conv2d):
        roles[id(patch_embed.proj)] = "patch_embed"
    return roles


def _make(factory: QuantizerFactory, site: QuantSite) -> Optional[Quantizer]:
    quantizer = factory(site)
    if quantizer is not None:
        quantizer.role = site.role
        parameter = next(site.module.parameters(), None)
        if parameter is not None:
            quantizer.to(parameter.device)  # a model already on the GPU gets its quantizers there too
    return quantizer


def prepare_(model: nn.Module, factory: QuantizerFactory) -> nn.Module:
    """Swap in quantizable layers and attention, in place; ``factory`` returns a quantizer or None per site."""
    roles = _input_roles(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantConv2d, QuantAttention, QuantWindowAttention)):
            raise ValueError(f"model is already prepared ({name})")
        if isinstance(module, nn.Linear):
            role = roles.get(id(module), "linear")
            QuantLinear.convert_(
                module,
                _make(factory, QuantSite(name, "weight", module)),
                _make(factory, QuantSite(name, role, module)),
            )
        elif isinstance(module, nn.Conv2d):
            role = roles.get(id(module), "conv")
            QuantConv2d.convert_(
                module,
                _make(factory, QuantSite(name, "weight", module)),
                _make(factory, QuantSite(name, role, module)),
            )
        elif isinstance(module, (Attention, WindowAttention)):
            converted = (QuantAttention if isinstance(module, Attention) else QuantWindowAttention).convert_(module)
            converted.matmul1.quantizer_a = _make(factory, QuantSite(f"{name}.matmul1", "query", module))
            converted.matmul1.quantizer_b = _make(factory, QuantSite(f"{name}.matmul1", "key", module))
            converted.matmul2.quantizer_a = _make(factory, QuantSite(f"{name}.matmul2", "post_softmax", module))
            converted.matmul2.quantizer_b = _make(factory, QuantSite(f"{name}.matmul2", "value", module))
    return model


@dataclass(frozen=True)
class NormLinearPair:
    """A LayerNorm whose output feeds ``linears`` directly (the pairs a scale reparameterization edits)."""

    norm_name: str
    norm: nn.LayerNorm
    linears: tuple[nn.Linear, ...]


def layernorm_linear_pairs(model: nn.Module) -> list[NormLinearPair]:
    """norm1 → attn.qkv and norm2 → mlp.fc1 of every ViT/Swin block, and norm → reduction of patch merging."""
    pairs: list[NormLinearPair] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
        norm1, norm2 = getattr(module, "norm1", None), getattr(module, "norm2", None)
        if isinstance(attn, (Attention, WindowAttention)) and isinstance(norm1, nn.LayerNorm):
            pairs.append(NormLinearPair(prefix + "norm1", norm1, (attn.qkv,)))
        if isinstance(mlp, Mlp) and isinstance(norm2, nn.LayerNorm):
            pairs.append(NormLinearPair(prefix + "norm2", norm2, (mlp.fc1,)))
        if isinstance(module, PatchMerging) and isinstance(module.norm, nn.LayerNorm):
            pairs.append(NormLinearPair(prefix + "norm", module.norm, (module.reduction,)))
    return pairs


def named_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """Every quantizer in the model with its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every quantizer on or off (off: the prepared model computes the FP function)."""
    for _, quantizer in named_quantizers(model):
        quantizer.enabled = enabled


@contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """Inside this context, uncalibrated quantizers fit themselves on the first tensor they see."""
    quantizers = [q for _, q in named_quantizers(model)]
    for q in quantizers:
        q.calibrating = True
    try:
        yield
    finally:
        for q in quantizers:
            q.calibrating = False
