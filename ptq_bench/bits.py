"""Bit-widths: the (weights, activations) pair of a run and its ``W4A4`` label, the one spelling every table uses."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any, Mapping, Optional

from omegaconf import OmegaConf

from ptq_bench.errors import ConfigError
from ptq_bench.paths import expand_path

MIN_BITS, MAX_BITS = 1, 16


def validate_bits(bits: int, low: int = MIN_BITS, high: int = MAX_BITS) -> int:
    """Return ``bits`` as an int, or raise :class:`ConfigError` if it is not an integer in [low, high]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(f"bit-width must be an integer in {low}..{high}, got {bits!r}")
    return bits


#: Bit-widths a user may ask for (the issue's "impossible bit-width" check).
USER_BITS = (2, 8)


def bits_label(w: int, a: int) -> str:
    """``W{w}A{a}``."""
    return f"W{w}A{a}"


@dataclass(frozen=True)
class LayerBits:
    """A per-layer override: the quantized layers whose dotted name matches ``pattern`` (``fnmatch``, e.g.
    ``blocks.0.*`` or ``head``) take ``w`` and/or ``a`` bits instead of the run's (None: the run's)."""

    pattern: str
    w: Optional[int] = None
    a: Optional[int] = None

    @property
    def label(self) -> str:
        return (f"W{self.w}" if self.w is not None else "") + (f"A{self.a}" if self.a is not None else "")

    def matches(self, layer: str) -> bool:
        return fnmatchcase(layer, self.pattern)


_LABEL = re.compile(r"^(?:w(\d+))?(?:a(\d+))?$", re.IGNORECASE)


def parse_layer_bits(pattern: str, value: Any) -> LayerBits:
    """``"W8A8"``, ``"W8"``, ``"A8"`` or ``{w: 8, a: 8}`` (either key) for ``pattern``; one-line ConfigError otherwise."""
    where = f"bits.layers[{pattern!r}]"
    if isinstance(value, str) and (match := _LABEL.match(value.strip())) and any(match.groups()):
        w, a = (int(g) if g else None for g in match.groups())
    elif isinstance(value, Mapping) and value and set(value) <= {"w", "a"}:
        w, a = value.get("w"), value.get("a")
    else:
        raise ConfigError(f"{where}={value!r}: give W<w>A<a>, W<w>, A<a> or {{w: <bits>, a: <bits>}}")
    for kind, bits in (("w", w), ("a", a)):
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not USER_BITS[0] <= bits <= USER_BITS[1]):
            raise ConfigError(f"{where}.{kind}={bits!r}: a bit-width must be an integer in {USER_BITS[0]}..{USER_BITS[1]}")
    return LayerBits(str(pattern), w, a)


def layer_bits(value: Any) -> tuple[LayerBits, ...]:
    """``bits.layers``: a map of layer-name patterns to bits (in order; the first match wins), or the path of a YAML
    file holding one; empty or None: uniform bits."""
    if isinstance(value, str) and value:
        path = expand_path(value)
        if not path.is_file():
            raise ConfigError(f"bits.layers={value!r}: not a file (give a YAML map of layer patterns to bits, or the map inline)")
        value = OmegaConf.load(path)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if not value:
        return ()
    if not isinstance(value, Mapping):
        raise ConfigError(f"bits.layers: a map of layer-name patterns to bits, e.g. {{head: W8A8, 'blocks.0.*': A8}}, got {value!r}")
    return tuple(parse_layer_bits(str(pattern), bits) for pattern, bits in value.items())


@dataclass(frozen=True)
class BitWidth:
    """Weight and activation bit-widths ("W4A4" = BitWidth(4, 4)), and per-layer overrides (mixed precision):
    the first rule of ``layers`` whose pattern matches a layer's name sets that layer's bits."""

    w: int
    a: int
    layers: tuple[LayerBits, ...] = ()

    def __post_init__(self) -> None:
        for kind, value in (("weight", self.w), ("activation", self.a)):
            try:
                validate_bits(value, *USER_BITS)
            except ConfigError:
                raise ConfigError(
                    f"impossible {kind} bit-width {value!r}: must be an integer in {USER_BITS[0]}..{USER_BITS[1]}"
                ) from None

    @property
    def label(self) -> str:
        return bits_label(self.w, self.a)

    def for_layer(self, layer: str) -> "BitWidth":
        """The uniform bit-width of the quantized layer named ``layer`` (dotted module name)."""
        rule = next((r for r in self.layers if r.matches(layer)), None)
        if rule is None:
            return replace(self, layers=())
        return BitWidth(self.w if rule.w is None else rule.w, self.a if rule.a is None else rule.a)

    def layers_record(self) -> list[list[str]]:
        """``[[pattern, "W8A8"], ...]`` in rule order (the first match wins, so order matters), for run keys, records
        and labels ([] when uniform)."""
        return [[rule.pattern, rule.label] for rule in self.layers]
