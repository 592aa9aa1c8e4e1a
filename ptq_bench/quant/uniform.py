"""Uniform (affine) fake quantizer with per-tensor, per-channel or per-token granularity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ptq_bench.quant.base import QuantGrid, Quantizer, round_ste
from ptq_bench.quant.observers import OBSERVERS, affine_params, grid_bounds
from ptq_bench.quant.registry import QUANTIZERS
from ptq_bench.quant.ste import uniform_ste

Granularity = Literal["tensor", "channel", "token"]
Bounds = tuple[float, float] | tuple[torch.Tensor, torch.Tensor]


#: largest zero-point tensor times grid size that :func:`shifted_clamp_bounds` checks exhaustively
MAX_EXHAUSTIVE_CHECK = 1 << 22


def shifted_clamp_bounds(zero_point: torch.Tensor, qmin: int, qmax: int) -> Bounds | None:
    """(qmin - z, qmax - z) if ``clamp(r, qmin - z, qmax - z)`` equals ``clamp(r + z, qmin, qmax) - z`` in z's dtype
    for every integer r (±inf included), else None; Python floats for a 0-dim z.

    Equal means ``torch.equal``: a zero may differ in sign. With an integer z every sum and difference is an exact
    integer (below 2/eps). A fractional z (RepQ-ViT's mean zero point after reparameterization) can round r + z, so
    the identity is checked for every r from where both sides saturate low to where they saturate high: both are
    monotone in r and bounded by their saturated values, so that range proves it for all r.
    """
    low, high = qmin - zero_point, qmax - zero_point
    if not _integer_shift_is_exact(zero_point, qmin, qmax):
        steps = torch.arange(-2, qmax - qmin + 4, dtype=zero_point.dtype, device=zero_point.device)
        if steps.numel() * zero_point.numel() > MAX_EXHAUSTIVE_CHECK:
            return None
        r = torch.floor(low) + steps.reshape(-1, *[1] * zero_point.ndim)
        if not torch.equal((r + zero_point).clamp_(qmin, qmax).sub_(zero_point), torch.clamp(r, low, high)):
            return None
    return (low.item(), high.item()) if zero_point.ndim == 0 else (low, high)


def clamp_inclusive(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``clamp(t, low, high)`` whose gradient passes on the bounds too: torch's clamp until 2.13 (the official codes'
    torch; newer torch gives 0 there, pytorch#191142), ``where(low ≤ t ≤ high, g, 0)``."""
    return torch.where((t >= low) & (t <= high), t, t.detach().clamp(low, high))


def _integer_shift_is_exact(zero_point: torch.Tensor, qmin: int, qmax: int) -> bool:
    """Whether z holds integers small enough that r + z, qmin - z and qmax - z are exact near the grid."""
    limit = 2 / torch.finfo(zero_point.dtype).eps
    return torch.equal(zero_point, torch.round(zero_point)) and zero_point.abs().max().item() + max(-qmin, qmax) <= limit


@dataclass(frozen=True)
class UniformOptions:
    """``granularity``: see :class:`UniformQuantizer`; ``observer``: a name of :data:`OBSERVERS` (the range fit)."""

    symmetric: bool = False
    granularity: Granularity = "tensor"
    channel_dim: int = -1
    observer: str = "minmax"


@QUANTIZERS.register("uniform")
class UniformQuantizer(Quantizer):
    """x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) · s.

    granularity:
      * ``tensor``: one (s, z) for the whole tensor;
      * ``channel``: one (s, z) per index of ``channel_dim`` (0 = output channel of a weight, -1 = last
        dimension of an activation, i.e. the embedding channel of a token sequence);
      * ``token``: dynamic min-max per token (every index except the last dimension), recomputed each call.
    """

    Options = UniformOptions
    capabilities = frozenset({"signed", "post_softmax", "post_gelu"})

    def __init__(self, bits: int, **options: Any) -> None:
        super().__init__(bits, **options)
        o: UniformOptions = self.options
        self.symmetric = o.symmetric
        self.granularity = o.granularity  # a reparameterization may fold "channel" into "tensor"
        self.channel_dim = o.channel_dim
        self.observer_name = o.observer
        self.observer = OBSERVERS.get(o.observer)
        self.qmin, self.qmax = grid_bounds(bits, o.symmetric)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        #: train through the literal expression's autograd (as official code that differentiates it does), not
        #: ptq_bench/quant/ste.py's fused node: the same values, gradients equal to that code's bit for bit
        self.literal_gradient = False
        #: with ``literal_gradient``: clamp as :func:`clamp_inclusive` (the torch <= 2.13 gradient) instead of torch's
        self.inclusive_clamp = False

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        dim = self.channel_dim % x.ndim
        return x.movedim(dim, 0).reshape(x.shape[dim], -1)

    def _broadcast_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        dim = self.channel_dim % x.ndim
        if dim == x.ndim - 1:
            return (x.shape[dim],)
        return (x.shape[dim],) + (1,) * (x.ndim - dim - 1)

    def calibrate(self, x: torch.Tensor) -> None:
        if self.granularity == "token":
            return  # dynamic: nothing to fit ahead of time
        low, high = self.observer(self._rows(x.float()), self.bits, self.symmetric)
        scale, zero_point = affine_params(low, high, self.bits, self.symmetric)
        if self.granularity == "tensor":
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        else:
            shape = self._broadcast_shape(x)
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        self.set_params(scale, zero_point)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install (s, z) directly (used by reparameterizations and by tests)."""
        self.scale = scale.detach().clone().to(self.scale.device)
        self.zero_point = zero_point.detach().clone().to(self.scale.device)
        self.calibrated = True
        self.params_changed()

    def fold_to_tensor_(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Become per tensor with (``scale``, ``zero_point``) (a folded LayerNorm→Linear reparameterization)."""
        self.granularity = "tensor"
        self.set_params(scale.reshape(()), zero_point.reshape(()))

    @property
    def foldable(self) -> bool:
        return self.granularity == "channel" and self.channel_dim == -1

    def learnable_parameters(self) -> dict[str, str]:
        return {} if self.granularity == "token" else {"scale": "step_size"}

    def export(self) -> QuantGrid:
        if self.granularity == "token":
            return QuantGrid("dynamic_affine", self.bits, qmin=self.qmin, qmax=self.qmax, axis=-1,
                             note="per-token min-max computed at run time")
        axis = None if self.granularity == "tensor" else self.channel_dim
        varying = [d - self.scale.dim() for d, n in enumerate(self.scale.shape) if n > 1]
        note = ""
        if len(varying) > (0 if axis is None else 1):  # scales a method spread further (FIMA-Q's per-token scales)
            axis, note = varying[0], f"scale varies along dims {varying} (broadcast against the input), not one axis"
        return QuantGrid("affine", self.bits, self.scale.detach().clone(), self.zero_point.detach().clone(),
                         self.qmin, self.qmax, axis, note=note)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "token":
            low, high = x.detach().amin(dim=-1, keepdim=True), x.detach().amax(dim=-1, keepdim=True)
            scale, zero_point = affine_params(low, high, self.bits, self.symmetric)
        else:
            scale, zero_point = self.scale, self.zero_point
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            if zero_point.requires_grad or self.literal_gradient:
                clamp = clamp_inclusive if self.inclusive_clamp else torch.clamp
                q = clamp(round_ste(x / scale) + zero_point, self.qmin, self.qmax)
                return (q - zero_point) * scale
            # the same values as the literal expression above, one autograd node (ptq_bench/quant/ste.py); a
            # compiled graph takes the literal clamp (the shifted bounds are proven by a data-dependent check)
            bounds = None if torch.compiler.is_compiling() else self._shifted_bounds(zero_point, torch.result_type(x, scale))
            return uniform_ste(x, scale, zero_point, self.qmin, self.qmax, bounds)
        if torch.compiler.is_compiling():  # the literal expression: inductor fuses it into one kernel
            return (torch.clamp(torch.round(x / scale) + zero_point, self.qmin, self.qmax) - zero_point) * scale
        # inference, in place on one fresh tensor: four passes where the shifted clamp is exact (see
        # shifted_clamp_bounds), the literal six otherwise
        bounds = self._shifted_bounds(zero_point, torch.result_type(x, scale))
        if bounds is None:
            return torch.div(x, scale).round_().add_(zero_point).clamp_(self.qmin, self.qmax).sub_(zero_point).mul_(scale)
        return torch.div(x, scale).round_().clamp_(*bounds).mul_(scale)

    def _shifted_bounds(self, zero_point: torch.Tensor, dtype: torch.dtype) -> Bounds | None:
        """:func:`shifted_clamp_bounds` of z in ``dtype``, cached per zero-point tensor (held, so never a reused
        address), in-place version and dtype."""
        if self.granularity == "token":
            return self.qmin - zero_point, self.qmax - zero_point  # dynamic z = round(-low / s): an integer
        cache = getattr(self, "_bounds_cache", None)
        if cache is None or cache[0] is not zero_point or cache[1] != (zero_point._version, dtype):
            bounds = shifted_clamp_bounds(zero_point.to(dtype), self.qmin, self.qmax)
            self._bounds_cache = cache = (zero_point, (zero_point._version, dtype), bounds)
        return cache[2]

    def extra_repr(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        return f"{super().extra_repr()}, {sym}, {self.granularity}, observer={self.observer_name}"
