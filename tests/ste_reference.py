"""Reference literal expressions of the training quantizers for tests/test_fast_ste.py and tests/test_cuda.py: the
expressions of ptq_bench/quant/uniform.py and tanq.py with a clamp whose gradient also passes at the bounds
(torch's clamp from pytorch/pytorch#7049 until 2.13; ptq_bench/quant/ste.py's convention), whatever the installed
torch's clamp does."""

from __future__ import annotations

import torch

from ptq_bench.quant.base import round_ste
from ptq_bench.quant.tanq import _compand, _expand


class _InclusiveClamp(torch.autograd.Function):
    """torch.clamp whose gradient also passes at the bounds (pytorch/pytorch#7049; torch < 2.13)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, low: float, high: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(t)
        ctx.bounds = (low, high)
        return torch.clamp(t, low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (t,) = ctx.saved_tensors
        low, high = ctx.bounds
        return grad * ((t >= low) & (t <= high)), None, None


def literal(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (_InclusiveClamp.apply(round_ste(x / s) + z, qmin, qmax) - z) * s


def literal_tangent(x: torch.Tensor, theta0: torch.Tensor, theta1: torch.Tensor, bits: int) -> torch.Tensor:
    """tanq.tan_fake_quant with the inclusive clamp."""
    qmax = 2**bits - 1
    u = _compand(_InclusiveClamp.apply(x, 0.0, 1.0), theta0, theta1) * qmax
    return _expand(_InclusiveClamp.apply(round_ste(u), 0, qmax) / qmax, theta0, theta1)
