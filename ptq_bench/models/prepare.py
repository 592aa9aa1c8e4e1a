"""Eager module swapping: where each quantizer goes and what role it plays.

``prepare_(model, factory)`` converts in place every ``nn.Linear``, every ``nn.Conv2d`` and every attention module
of the model's architecture adapter (:mod:`ptq_bench.architectures`), asking ``factory`` for the quantizer of each
*site*. A site's role (from the adapter) tells a method what tensor it quantizes, so a method can put a special
quantizer on the post-Softmax map or on post-LayerNorm / post-GELU inputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Collection, ContextManager, Iterator, Optional

from torch import nn

from ptq_bench.architectures import NormLinearPair, architecture_for
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul

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


def _make(factory: QuantizerFactory, site: QuantSite) -> Optional[Quantizer]:
    quantizer = factory(site)
    if quantizer is not None:
        quantizer.role = site.role
        parameter = next(site.module.parameters(), None)
        if parameter is not None:
            quantizer.to(parameter.device)  # a model already on the GPU gets its quantizers there too
    return quantizer


def prepare_(model: nn.Module, factory: QuantizerFactory) -> nn.Module:
    """Swap in quantizable layers and attention, in place; ``factory`` returns a quantizer or None per site.

    The model's architecture adapter gives the roles and the attention swap; a model no adapter recognises is
    refused (one line) before anything is changed."""
    if any(isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul)) for m in model.modules()):
        raise ValueError("model is already prepared")
    adapter = architecture_for(model)
    adapter.prepare_blocks(model)
    attention = [(name, adapter.convert_attention(module)) for name, module in adapter.attention_modules(model)]
    roles = adapter.input_roles(model)  # after the attention swap, which may add Linears (packed in-projections)
    for name, module in list(model.named_modules()):
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
    for name, converted in attention:
        converted.matmul1.quantizer_a = _make(factory, QuantSite(f"{name}.matmul1", "query", converted))
        converted.matmul1.quantizer_b = _make(factory, QuantSite(f"{name}.matmul1", "key", converted))
        converted.matmul2.quantizer_a = _make(factory, QuantSite(f"{name}.matmul2", "post_softmax", converted))
        converted.matmul2.quantizer_b = _make(factory, QuantSite(f"{name}.matmul2", "value", converted))
    return model


def layernorm_linear_pairs(model: nn.Module, skip_post_norm: bool = False) -> list[NormLinearPair]:
    """The norm → Linear pairs of the model's architecture (a scale reparameterization folds into them)."""
    return architecture_for(model).layernorm_linear_pairs(model, skip_post_norm)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of the model's architecture, in forward order."""
    return architecture_for(model).blocks(model)


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
def only_quantizers(model: nn.Module, enabled: Collection[Quantizer]) -> Iterator[None]:
    """Exactly the quantizers in ``enabled`` on inside the context; each one's own flag is restored on exit."""
    flags = [(q, q.enabled) for _, q in named_quantizers(model)]
    for q, _ in flags:
        q.enabled = q in enabled
    try:
        yield
    finally:
        for q, flag in flags:
            q.enabled = flag


def quantizers_off(model: nn.Module) -> ContextManager[None]:
    """Every quantizer off inside the context (the FP function); each one's own flag is restored on exit."""
    return only_quantizers(model, ())


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
