"""The quantizer interface: a module that fake-quantizes a tensor and calibrates itself on first use.

A quantizer class declares everything the rest of the harness asks of it, so that adding one is one file:

* ``Options``: a frozen dataclass whose field defaults are the quantizer's only defaults (a method YAML that
  shows one refers to it with ``${quantizer_default:<name>,<field>}``); keyword arguments of the constructor
  are its fields, checked by type (:func:`quantizer_options`);
* ``capabilities``: the tensors it can quantize (:data:`CAPABILITIES`), which the placement checks per role;
* :meth:`Quantizer.learnable_parameters`: the tensors a block reconstruction may train, by kind;
* :attr:`Quantizer.foldable`: whether a LayerNorm→Linear scale reparameterization can fold it into per tensor;
* :meth:`Quantizer.export`: its grid (:class:`QuantGrid`), affine (scale, zero point, bits, axis) or a level table.

Calibration follows the official RepQ-ViT/PTQ4ViT convention: the calibration batch is run once through the
model with every quantizer in *calibrating* state; each quantizer fits its parameters on the first tensor it sees
and quantizes from then on, so later layers are calibrated on the outputs of already-quantized earlier ones.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Optional, get_type_hints

import torch
from torch import nn

from ptq_bench.bits import validate_bits
from ptq_bench.errors import ConfigError
from ptq_bench.typed import coerce

def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (d round(x)/dx := 1)."""
    return x + (torch.round(x) - x).detach()


#: What a quantizer may declare it can quantize: ``signed`` any real tensor (weights, any activation);
#: ``post_softmax`` values in [0, 1] (the attention map); ``post_gelu`` GELU outputs (>= -0.17, long positive
#: tail); ``log_domain`` a logarithmic grid (informational: an integer backend cannot run it as an affine grid).
CAPABILITIES = ("signed", "post_softmax", "post_gelu", "log_domain")

#: Kinds of learnable tensors: ``step_size`` a uniform grid's scale (LSQ-style), ``range`` a learned interval bound.
LEARNABLE_KINDS = ("step_size", "range")


@dataclass(frozen=True)
class NoQuantizerOptions:
    """Options of a quantizer that has none."""


def quantizer_options(options_cls: type, values: Mapping[str, Any], name: str) -> Any:
    """``options_cls`` from ``values`` (defaults for the rest); one-line ConfigError for unknown or mistyped keys."""
    fields = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"quantizer '{name}' has no option(s) {', '.join(unknown)} (options: {', '.join(sorted(fields)) or 'none'})")
    hints = get_type_hints(options_cls)
    return options_cls(**{key: coerce(value, hints[key], f"{name}.{key}") for key, value in values.items()})


@dataclass(frozen=True)
class QuantGrid:
    """A calibrated quantizer's grid, as an integer lowering needs it (:meth:`Quantizer.export`).

    ``affine``: x̂ = (clamp(round(x/scale) + zero_point, qmin, qmax) - zero_point)·scale, per tensor (``axis`` None)
    or per index of ``axis``; ``dynamic_affine``: the same with (scale, zero point) computed per token at run time
    (min-max over the last dimension); ``non_uniform``: the de-quantized values ``levels`` (last dimension; leading
    dimensions per group along ``axis``), which no affine integer kernel can express as is.
    """

    kind: Literal["affine", "dynamic_affine", "non_uniform"]
    bits: int
    scale: Optional[torch.Tensor] = None
    zero_point: Optional[torch.Tensor] = None
    qmin: Optional[int] = None
    qmax: Optional[int] = None
    axis: Optional[int] = None
    levels: Optional[torch.Tensor] = None
    note: str = ""

    @property
    def integer_zero_point(self) -> bool:
        """Whether the zero point holds integers (RepQ-ViT's reparameterized mean zero point does not)."""
        return self.zero_point is not None and torch.equal(self.zero_point, torch.round(self.zero_point))


class Quantizer(nn.Module, ABC):
    """Fake quantizer: ``forward`` returns the de-quantized tensor (same shape and dtype as the input).

    Subclasses set ``Options`` and ``capabilities`` and implement :meth:`calibrate`, :meth:`quantize` and
    :meth:`export`; ``options`` holds the checked options the quantizer was built with."""

    Options: ClassVar[type] = NoQuantizerOptions
    capabilities: ClassVar[frozenset[str]] = frozenset({"signed"})

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__()
        self.options = quantizer_options(self.Options, options, type(self).__name__)
        self.bits = validate_bits(bits)
        self.enabled = True
        self.calibrating = False
        self.calibrated = False
        self.role = ""
        self.version = 0  # bumped whenever the parameters change; lets layers cache quantized weights

    @property
    def levels(self) -> int:
        return 2**self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.calibrated:
            if not self.calibrating:
                raise RuntimeError(f"{self.role or type(self).__name__} quantizer used before calibration")
            with torch.no_grad():
                self.calibrate(x.detach())
            self.calibrated = True
            self.version += 1
        return self.quantize(x)

    @abstractmethod
    def calibrate(self, x: torch.Tensor) -> None:
        """Fit the quantization parameters to ``x``."""

    @abstractmethod
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the fitted parameters."""

    @abstractmethod
    def export(self) -> QuantGrid:
        """The calibrated grid (:class:`QuantGrid`)."""

    def learnable_parameters(self) -> dict[str, str]:
        """``{attribute name: kind}`` of the tensors a block reconstruction may train (:data:`LEARNABLE_KINDS`);
        an attribute may be a buffer, which the reconstruction turns into a parameter while it trains."""
        return {}

    @property
    def foldable(self) -> bool:
        """Whether a LayerNorm→Linear scale reparameterization can fold this quantizer (once calibrated): a uniform grid
        with one (``scale``, ``zero_point``) per channel of the last dimension, ``set_params`` to install effective
        channel parameters and ``fold_to_tensor_`` to become per tensor."""
        return False

    def reset(self) -> None:
        """Forget the fitted parameters; the next calibrating forward fits them again."""
        self.calibrated = False
        self.version += 1

    def params_changed(self) -> None:
        """Call after editing the parameters by hand (e.g. a reparameterization) so caches refresh."""
        self.version += 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, role={self.role!r}, enabled={self.enabled}, calibrated={self.calibrated}"
