"""The method interface: a PTQ recipe that turns an FP model into a fake-quantized one.

Every method (FP, MinMax, PTQ4ViT, RepQ-ViT, DopQ-ViT, AIQViT, ...) is one class registered in :data:`METHODS`
under the name its Hydra config uses (``conf/method/<name>.yaml``, key ``name``). The task adapter builds it with
the bit-width and the method's options, hands it the FP model and a calibration batch, and evaluates what
``quantize`` returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.quant.base import validate_bits
from ptq_bench.registry import Registry

#: Method options that change how a run goes, never its result: left out of run keys and table labels.
RUNTIME_OPTIONS = frozenset({"progress", "device", "state_dir", "capture_mb", "search_chunk_mb"})

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


class Method(ABC):
    """A post-training quantization recipe.

    Subclasses set ``name`` and implement :meth:`quantize`. ``uses_bits`` is False for methods whose result does
    not depend on the bit-width (the FP baseline), so that sweeps do not repeat them.
    """

    name: ClassVar[str]
    uses_bits: ClassVar[bool] = True
    uses_calibration: ClassVar[bool] = True

    def __init__(self, bits: BitWidth, **options: Any) -> None:
        self.bits = bits
        if options:
            raise ConfigError(f"method '{self.name}' has no option(s) {', '.join(sorted(options))}")

    @abstractmethod
    def quantize(self, model: nn.Module, calib_images: torch.Tensor) -> nn.Module:
        """Quantize ``model`` (in place where convenient) using ``calib_images``; return the quantized model."""


METHODS: Registry[type[Method]] = Registry("method")


def build_method(cfg: Mapping[str, Any], bits: BitWidth) -> Method:
    """Instantiate the method named ``cfg['name']`` with the remaining keys (``calib_size`` is the task's)."""
    options = {k: v for k, v in dict(cfg).items() if k not in ("name", "calib_size")}
    return METHODS.get(str(cfg["name"]))(bits, **options)
