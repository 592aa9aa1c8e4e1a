"""Uniform (affine) fake quantizer with per-tensor, per-channel or per-token granularity."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ptq_bench.errors import ConfigError
from ptq_bench.quant.base import Quantizer, round_ste
from ptq_bench.quant.observers import OBSERVERS, affine_params, grid_bounds
from ptq_bench.quant.registry import QUANTIZERS

Granularity = Literal["tensor", "channel", "token"]


@QUANTIZERS.register("uniform")
class UniformQuantizer(Quantizer):
    """x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) · s.

    granularity:
      * ``tensor``: one (s, z) for the whole tensor;
      * ``channel``: one (s, z) per index of ``channel_dim`` (0 = output channel of a weight, -1 = last
        dimension of an activation, i.e. the embedding channel of a token sequence);
      * ``token``: dynamic min-max per token (every index except the last dimension), recomputed each call.
    """

    post_softmax = True

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        granularity: Granularity = "tensor",
        channel_dim: int = -1,
        observer: str = "minmax",
        observer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(bits)
        if granularity not in ("tensor", "channel", "token"):
            raise ConfigError(f"unknown granularity '{granularity}' (tensor, channel, token)")
        self.symmetric = symmetric
        self.granularity = granularity
        self.channel_dim = channel_dim
        self.observer_name = observer
        self.observer = OBSERVERS.get(observer)
        self.observer_kwargs = dict(observer_kwargs or {})
        self.qmin, self.qmax = grid_bounds(bits, symmetric)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

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
        low, high = self.observer(self._rows(x.float()), self.bits, self.symmetric, **self.observer_kwargs)
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
        self._zero_point_key = None
        self.calibrated = True
        self.params_changed()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "token":
            low, high = x.detach().amin(dim=-1, keepdim=True), x.detach().amax(dim=-1, keepdim=True)
            scale, zero_point = affine_params(low, high, self.bits, self.symmetric)
        else:
            scale, zero_point = self.scale, self.zero_point
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            q = torch.clamp(round_ste(x / scale) + zero_point, self.qmin, self.qmax)
            return (q - zero_point) * scale
        # inference, in place on one fresh tensor. With an integer z, clamp(round(x/s) + z, qmin, qmax) - z equals
        # clamp(round(x/s), qmin - z, qmax - z) bit for bit: four passes over memory instead of six. A fractional z
        # (RepQ-ViT's mean zero point after reparameterization) takes the literal six-pass form, which is exact.
        if not self._zero_point_is_integer():
            return torch.div(x, scale).round_().add_(zero_point).clamp_(self.qmin, self.qmax).sub_(zero_point).mul_(scale)
        if self.granularity == "tensor":
            return torch.div(x, scale).round_().clamp_(self.qmin - self._zero_point_value, self.qmax - self._zero_point_value).mul_(scale)
        return torch.div(x, scale).round_().clamp_(self.qmin - zero_point, self.qmax - zero_point).mul_(scale)

    def _zero_point_is_integer(self) -> bool:
        """Whether z holds integers; cached per zero-point tensor (a new tensor or an in-place edit re-checks)."""
        key = (self.zero_point.data_ptr(), self.zero_point._version)
        if getattr(self, "_zero_point_key", None) != key:
            z = self.zero_point
            self._zero_point_integer = bool(torch.equal(z, torch.round(z)))
            self._zero_point_value = float(z) if z.numel() == 1 else 0.0
            self._zero_point_key = key
        return self._zero_point_integer

    def extra_repr(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        return f"{super().extra_repr()}, {sym}, {self.granularity}, observer={self.observer_name}"
