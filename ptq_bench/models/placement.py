"""Quantizer placement as data: a method's role → quantizer-spec table and the one function that builds it.

A method declares which quantizer goes on each role (:data:`ptq_bench.models.prepare.ROLES`, plus
``activation`` for every activation role the table does not name) as :class:`QuantizerSpec` values: a registered
quantizer name, which bit-width it takes (the run's weight or activation bits, or a fixed one such as RepQ-ViT's
8-bit patch-embedding input) and its options. :func:`check_placement` refuses a table that names an unknown
quantizer, gives a role a quantizer that cannot take its tensors (capabilities, ``ptq_bench/quant/base.py``) or
bad options, in one line and before any work; :func:`place_quantizers_` swaps in the quantized layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Union

from torch import nn

from ptq_bench.bits import BitWidth
from ptq_bench.errors import ConfigError
from ptq_bench.models.prepare import ROLES, QuantSite, prepare_
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.registry import QUANTIZERS, names_with

#: The table key for every activation role a table does not name.
ANY_ACTIVATION = "activation"
#: The capability a quantizer needs for a role; every other role needs ``signed`` (any real tensor).
ROLE_CAPABILITY = {"post_softmax": "post_softmax", "post_gelu": "post_gelu"}


@dataclass(frozen=True)
class QuantizerSpec:
    """A quantizer to build: its registry ``name``, ``bits`` (``"w"``/``"a"``: the run's weight/activation
    bit-width; an int: fixed) and its ``options`` (fields of the quantizer's ``Options``; the rest default)."""

    name: str
    bits: Union[Literal["w", "a"], int] = "a"
    options: Mapping[str, Any] = field(default_factory=dict)

    def bit_width(self, bits: BitWidth) -> int:
        return bits.w if self.bits == "w" else bits.a if self.bits == "a" else int(self.bits)

    def build(self, bits: BitWidth) -> Quantizer:
        return QUANTIZERS.get(self.name)(self.bit_width(bits), **dict(self.options))


Placement = Mapping[str, Optional[QuantizerSpec]]


def spec_for(placement: Placement, role: str) -> Optional[QuantizerSpec]:
    """The spec of ``role``: its own entry, else (activations) the ``activation`` entry; None: not quantized."""
    if role in placement:
        return placement[role]
    return None if role == "weight" else placement.get(ANY_ACTIVATION)


def check_placement(
    placement: Placement, bits: BitWidth, method: str, foldable_roles: Iterable[str] = (), chosen_by: Mapping[str, str] | None = None
) -> None:
    """One-line ConfigError, before any work, for an unknown role or quantizer, a quantizer on a role whose
    tensors it cannot take, options it does not have, or a role the method folds given a quantizer it cannot fold.
    ``chosen_by``: role → the config key that chose its quantizer (named in the message)."""
    unknown = sorted(set(placement) - set(ROLES) - {ANY_ACTIVATION})
    if unknown:
        raise ConfigError(f"{method}: unknown quantization role(s) {', '.join(unknown)} (roles: {', '.join((*ROLES, ANY_ACTIVATION))})")
    folded, chosen_by = set(foldable_roles), chosen_by or {}
    for role in ROLES:
        spec = spec_for(placement, role)
        if spec is None:
            continue
        key = chosen_by.get(role if role in placement else ANY_ACTIVATION)  # the entry spec_for took
        where = f"{key}={spec.name!r} ({method})" if key else f"{method}: quantizer '{spec.name}'"
        if spec.name not in QUANTIZERS:
            raise ConfigError(f"{where}: no such quantizer (known: {', '.join(QUANTIZERS.names())})")
        needed = ROLE_CAPABILITY.get(role, "signed")
        if needed not in QUANTIZERS.get(spec.name).capabilities:
            raise ConfigError(f"{where}: cannot quantize {role} tensors (not declared '{needed}'); "
                              f"quantizers that can: {', '.join(names_with(needed))}")
        quantizer = spec.build(bits)  # checks the options
        if role in folded and not quantizer.foldable:
            raise ConfigError(f"{where}: the {role} quantizer cannot be folded by the LayerNorm→Linear "
                              "reparameterization (it needs a per-channel uniform grid on the last dimension)")


def place_quantizers_(model: nn.Module, placement: Placement, bits: BitWidth) -> nn.Module:
    """Swap in quantized layers (:func:`ptq_bench.models.prepare.prepare_`), each site getting the quantizer its
    role's spec builds at ``bits`` (none where the spec is None), or at the bits of the first ``bits.layers`` rule
    matching the site's layer name. A rule that sets no layer's bits is refused in one line: a misspelt pattern
    would otherwise run the uniform bit-width under a mixed-precision label."""
    matched: set[str] = set()

    def factory(site: QuantSite) -> Optional[Quantizer]:
        spec = spec_for(placement, site.role)
        if spec is None:
            return None
        rule = next((r for r in bits.layers if r.matches(site.layer)), None)
        if rule is not None:
            matched.add(rule.pattern)
        return spec.build(bits.for_layer(site.layer))

    model = prepare_(model, factory)
    unused = [rule.pattern for rule in bits.layers if rule.pattern not in matched]
    if unused:
        raise ConfigError(f"bits.layers: {', '.join(map(repr, unused))} set(s) the bits of no quantized layer (no match, "
                          "or an earlier pattern took every match; fnmatch over dotted module names, e.g. 'blocks.0.*', 'head')")
    return model
