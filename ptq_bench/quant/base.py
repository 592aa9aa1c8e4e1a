"""The quantizer interface: a module that fake-quantizes a tensor and calibrates itself on first use.

Calibration follows the official RepQ-ViT/PTQ4ViT convention: the calibration batch is run once through the
model with every quantizer in *calibrating* state; each quantizer fits its parameters on the first tensor it sees
and quantizes from then on, so later layers are calibrated on the outputs of already-quantized earlier ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ptq_bench.errors import ConfigError

MIN_BITS, MAX_BITS = 1, 16


def validate_bits(bits: int, low: int = MIN_BITS, high: int = MAX_BITS) -> int:
    """Return ``bits`` as an int, or raise :class:`ConfigError` if it is not an integer in [low, high]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(f"bit-width must be an integer in {low}..{high}, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (d round(x)/dx := 1)."""
    return x + (torch.round(x) - x).detach()


class Quantizer(nn.Module, ABC):
    """Fake quantizer: ``forward`` returns the de-quantized tensor (same shape and dtype as the input)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
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

    def reset(self) -> None:
        """Forget the fitted parameters; the next calibrating forward fits them again."""
        self.calibrated = False
        self.version += 1

    def params_changed(self) -> None:
        """Call after editing the parameters by hand (e.g. a reparameterization) so caches refresh."""
        self.version += 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, role={self.role!r}, enabled={self.enabled}, calibrated={self.calibrated}"
