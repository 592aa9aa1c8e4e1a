"""Bit-widths: the (weights, activations) pair of a run and its ``W4A4`` label, the one spelling every table uses."""

from __future__ import annotations

from dataclasses import dataclass

from ptq_bench.errors import ConfigError

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
class BitWidth:
    """Weight and activation bit-widths ("W4A4" = BitWidth(4, 4))."""

    w: int
    a: int

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
