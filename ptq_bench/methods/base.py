"""The method interface: a PTQ recipe that turns an FP model into a fake-quantized one.

Every method (FP, MinMax, PTQ4ViT, RepQ-ViT, DopQ-ViT, AIQViT, ...) is one class registered in :data:`METHODS`
under the name its Hydra config uses (``conf/method/<name>.yaml``, key ``name``), with one frozen options class
(:mod:`ptq_bench.methods.options`) whose values come from that YAML. The harness builds it with the bit-width, the
options, the run's seed and progress flag; checks that the model's architecture adapter gives the method what it
needs (:meth:`Method.check`); hands it the FP model and the task's calibration data; and evaluates what
``quantize`` returns. A method runs the model only through the calibration data's ``forward``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from ptq_bench.architectures import require
from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.options import HARNESS_KEYS, identity_options, method_defaults, parse_options
from ptq_bench.quant.base import validate_bits
from ptq_bench.registry import Registry

#: Bit-widths a user may ask for (the issue's "impossible bit-width" check).
USER_BITS = (2, 8)


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
        return f"W{self.w}A{self.a}"


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that has none."""


class Method(ABC):
    """A post-training quantization recipe.

    Subclasses set ``name`` and ``Options`` and implement :meth:`_quantize`. ``uses_bits`` is False for methods
    whose result does not depend on the bit-width (the FP baseline), so that sweeps do not repeat them.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    uses_bits: ClassVar[bool] = True
    uses_calibration: ClassVar[bool] = True

    def __init__(self, bits: BitWidth, options: Any, seed: int = 0, progress: bool = False) -> None:
        if not isinstance(options, self.Options):
            raise TypeError(f"{self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        self.bits = bits
        self.options = options
        self.seed = seed
        self.progress = progress

    def needs(self) -> frozenset[str]:
        """What the architecture adapter must provide (:data:`ptq_bench.architectures.NEEDS`)."""
        return frozenset()

    def check(self, model: nn.Module) -> None:
        """Refuse, in one line and before any calibration, a model this method cannot quantize as named."""
        if self.uses_calibration:
            require(model, self.needs(), self.name)

    def quantize(self, model: nn.Module, data: CalibrationData | None) -> nn.Module:
        """Quantize ``model`` (in place where convenient) with the calibration ``data``; returns the quantized model."""
        self.check(model)
        if self.uses_calibration and (data is None or len(data) == 0):
            raise ConfigError(f"method '{self.name}' needs calibration data")
        return self._quantize(model, data)

    @abstractmethod
    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        """The recipe (after the architecture check)."""

    def identity(self) -> dict[str, Any]:
        """The options that determine the result (runtime options, and switches while off, left out), for run keys
        and labels (:func:`ptq_bench.methods.options.identity_options`)."""
        return identity_options(self.options)


METHODS: Registry[type[Method]] = Registry("method")


def build_method(cfg: Mapping[str, Any] | str, bits: BitWidth, *, seed: int = 0, progress: bool = False, **overrides: Any) -> Method:
    """The method named ``cfg['name']`` (or ``cfg``), its options from its YAML updated by ``cfg`` and ``overrides``."""
    values = {"name": cfg} if isinstance(cfg, str) else dict(cfg)
    name = str(values.get("name"))
    cls = METHODS.get(name)
    values = {**method_defaults(name), **values, **overrides}
    options = parse_options(cls.Options, {k: v for k, v in values.items() if k not in HARNESS_KEYS}, name)
    return cls(bits, options, seed=seed, progress=progress)
