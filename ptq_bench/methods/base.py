"""The method interface: a PTQ recipe that turns an FP model into a fake-quantized one.

Every method (FP, MinMax, PTQ4ViT, RepQ-ViT, DopQ-ViT, AIQViT, ...) is one class registered in :data:`METHODS`
under the name its Hydra config uses (``conf/method/<name>.yaml``, key ``name``), with one frozen options class
(:mod:`ptq_bench.methods.options`) whose values come from that YAML. The harness builds it with the bit-width, the
options, the run's seed and progress flag; checks that the model's architecture adapter gives the method what it
needs (:meth:`Method.check`); hands it the FP model and the task's calibration data; and evaluates what
``quantize`` returns. A method runs the model only through the calibration data's ``forward``.

Where quantizers go is data: :meth:`Method.placement` is the method's role → quantizer table
(:mod:`ptq_bench.models.placement`), checked when the method is built. The method config key ``quantizers``
(``method.quantizers={post_gelu: uniform}``, or ``{post_softmax: {name: tanq, granularity: head}}``) replaces
entries of any method's table with any registered quantizer that can take the role's tensors; it enters the run
key only when set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Mapping

from omegaconf import OmegaConf
from torch import nn

from ptq_bench.architectures import require
from ptq_bench.bits import BitWidth
from ptq_bench.calibration import CalibrationData
from ptq_bench.errors import ConfigError
from ptq_bench.methods.options import HARNESS_KEYS, identity_options, method_defaults, parse_options
from ptq_bench.models.placement import Placement, QuantizerSpec, check_placement, place_quantizers_, spec_for
from ptq_bench.registry import Registry


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
    #: Roles whose quantizer one of the method's own options chooses (role → option): ``quantizers`` leaves them.
    role_options: ClassVar[Mapping[str, str]] = {}
    #: False for a recipe that searches the grids of its own quantizer kinds (PTQ4ViT): ``quantizers`` is refused.
    accepts_quantizers: ClassVar[bool] = True
    #: True where every grid is fitted from its quantizer's own bit-width (not the run's ``bits``), so per-layer
    #: bit-widths (``bits.layers``, mixed precision) take effect; otherwise they are refused.
    accepts_layer_bits: ClassVar[bool] = False
    #: Raised by one when a fix changes the method's results for options it already had, so that records made
    #: before the fix get other run keys (and are rerun, not resumed); 0 adds nothing to the identity.
    revision: ClassVar[int] = 0

    def __init__(
        self, bits: BitWidth, options: Any, seed: int = 0, progress: bool = False, quantizers: Mapping[str, Any] | None = None
    ) -> None:
        if not isinstance(options, self.Options):
            raise TypeError(f"{self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        if bits.layers and self.uses_bits and not self.accepts_layer_bits:
            raise ConfigError(f"bits.layers: method {self.name} does not take per-layer bit-widths (its searches use the "
                              "run's bits); methods that do: " + ", ".join(layer_bits_methods()))
        self.bits = bits
        self.options = options
        self.seed = seed
        self.progress = progress
        self.quantizers = self._parse_quantizers(quantizers or {})
        #: What the run's record shows of each FP-preserving transform (InvariantCheck.record entries).
        self.transforms: list[dict[str, Any]] = []
        if self.uses_calibration:
            chosen_by = {role: f"method.{option}" for role, option in self.role_options.items()}
            chosen_by |= {role: f"method.quantizers.{role}" for role in self.quantizers}
            check_placement(self.quantizer_table(), bits, self.name, self.foldable_roles(), chosen_by)

    def calibration_size(self, calib_size: int) -> int:
        """How many calibration samples the run loads for ``method.calib_size`` (a method with a second set, e.g. for a
        reconstruction after its calibration, asks for more)."""
        return calib_size

    def placement(self) -> dict[str, QuantizerSpec | None]:
        """The method's role → quantizer table (:mod:`ptq_bench.models.placement`); methods that calibrate define it."""
        raise NotImplementedError(f"method '{self.name}' declares no quantizer placement")

    def foldable_roles(self) -> frozenset[str]:
        """Roles the method folds with a LayerNorm→Linear reparameterization (their quantizers must be foldable)."""
        return frozenset()

    def quantizer_table(self) -> Placement:
        """:meth:`placement` with the run's ``quantizers`` choices applied: each keeps the bit-width of the entry it
        replaces, and takes the options given with it (the quantizer's defaults for the rest, not the replaced
        entry's: ``{post_gelu: uniform}`` in repq_vit is a min-max uniform grid unless ``observer: percentile`` is
        given)."""
        table = dict(self.placement())
        for role, (name, options) in self.quantizers.items():
            replaced = spec_for(table, role)
            bits = replaced.bits if replaced is not None else ("w" if role == "weight" else "a")
            table[role] = QuantizerSpec(name, bits, options)
        return table

    def place_quantizers_(self, model: nn.Module) -> nn.Module:
        """Swap in the quantized layers with this run's quantizer table."""
        return place_quantizers_(model, self.quantizer_table(), self.bits)

    def _parse_quantizers(self, chosen: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """``quantizers``: role → quantizer name, or → ``{name: <quantizer>, <option>: <value>, ...}``."""
        if chosen and not self.accepts_quantizers:
            raise ConfigError(f"method.quantizers: {self.name} searches the grids of its own quantizers; it takes no other quantizers")
        parsed = {}
        for role, value in chosen.items():
            if role in self.role_options:
                raise ConfigError(f"method.quantizers.{role}: {self.name} chooses this quantizer with method.{self.role_options[role]}")
            if isinstance(value, str):
                parsed[str(role)] = (value, {})
            elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
                parsed[str(role)] = (value["name"], {k: v for k, v in value.items() if k != "name"})
            else:
                raise ConfigError(f"method.quantizers.{role}={value!r}: a quantizer name, or a mapping with 'name' and its options")
        return parsed

    def needs(self) -> frozenset[str]:
        """What the architecture adapter must provide (:data:`ptq_bench.architectures.NEEDS`)."""
        return frozenset()

    def check(self, model: nn.Module) -> None:
        """Refuse, in one line and before any calibration, a model this method cannot quantize as named."""
        if self.uses_calibration:
            require(model, self.needs(), self.name, skippable=hasattr(self.options, "post_norm"))
        if self.uses_bits and self.bits.layers:  # placement checks the quantized layers exactly; this, before any work
            names = [name for name, _ in model.named_modules()]
            for rule in self.bits.layers:
                if not any(rule.matches(name) for name in names):
                    raise ConfigError(f"bits.layers: {rule.pattern!r} matches no module of the model "
                                      f"(fnmatch over dotted module names, e.g. {', '.join(names[1:4])})")

    def quantize(self, model: nn.Module, data: CalibrationData | None) -> nn.Module:
        """Quantize ``model`` (in place where convenient) with the calibration ``data``; returns the quantized model."""
        self.check(model)
        if self.uses_calibration and (data is None or len(data) == 0):
            raise ConfigError(f"method '{self.name}' needs calibration data")
        self.transforms = []
        return self._quantize(model, data)

    @abstractmethod
    def _quantize(self, model: nn.Module, data: CalibrationData) -> nn.Module:
        """The recipe (after the architecture check)."""

    def identity(self) -> dict[str, Any]:
        """The options that determine the result (runtime options, and switches while off, left out), for run keys
        and labels (:func:`ptq_bench.methods.options.identity_options`)."""
        table = self.quantizer_table() if self.quantizers else {}
        chosen = {role: {"name": table[role].name, **asdict(table[role].build(self.bits).options)}
                  for role in sorted(self.quantizers)}  # every option, defaults included: a changed default is a new key
        return (identity_options(self.options) | ({"quantizers": chosen} if chosen else {})  # none: earlier run keys
                | ({"revision": self.revision} if self.revision else {}))


METHODS: Registry[type[Method]] = Registry("method")


def layer_bits_methods() -> list[str]:
    """The registered methods that take ``bits.layers``."""
    return sorted(name for name in METHODS.names() if METHODS.get(name).accepts_layer_bits)


def build_method(cfg: Mapping[str, Any] | str, bits: BitWidth, *, seed: int = 0, progress: bool = False, **overrides: Any) -> Method:
    """The method named ``cfg['name']`` (or ``cfg``), its options from its YAML updated by ``cfg`` and ``overrides``."""
    values = {"name": cfg} if isinstance(cfg, str) else dict(cfg)
    name = str(values.get("name"))
    cls = METHODS.get(name)
    values = {**method_defaults(name), **values, **overrides}
    quantizers = values.pop("quantizers", None) or {}
    quantizers = OmegaConf.to_container(quantizers, resolve=True) if OmegaConf.is_config(quantizers) else quantizers
    options = parse_options(cls.Options, {k: v for k, v in values.items() if k not in HARNESS_KEYS}, name)
    return cls(bits, options, seed=seed, progress=progress, quantizers=quantizers)
