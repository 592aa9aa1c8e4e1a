"""Straight-through fake quantization for training (block reconstruction), one autograd node per quantizer.

Autograd through the literal expression of a uniform fake quantizer (x/s, round_ste, +z, clamp, −z, ·s) records
eight nodes whose backward allocates about a dozen full-size temporaries, and ``clamp``'s backward builds its mask
from boolean comparisons and a ``where``: on a CPU a boolean ``where``, or a multiply by a boolean tensor, costs
five to ten times a float multiply, and every new large tensor costs page faults. The functions here give the same
forward values bit for bit (the same operations in the same order, in place where possible) and the same gradients
up to float rounding, with masks kept as float 0/1 tensors and each quantizer parameter's gradient reduced once:

    uniform:  r = x/s, t = round(r) + z, m = [qmin ≤ t ≤ qmax], c = clamp(t, qmin, qmax) − z, y = c·s
              ∂y/∂x = m,   ∂y/∂s = c − m·r,   ∂y/∂z = −s·(1 − m)
    tangent:  y = expand(clamp(round_ste(compand(clamp(x, 0, 1))), 0, 2^b − 1)) (ptq_bench/quant/tanq.py)
              ∂y/∂x = m₀·m₁·(1 + tan²θ(x)) / (1 + w²), w the arctan argument of x's level

The masks include the bounds (a value rounded onto qmin or qmax passes its gradient): the subgradient torch's
``clamp`` had from 2018 (pytorch/pytorch#7049) until PyTorch 2.13, under which every official implementation of
this lineage was trained; newer torch gives 0 at scalar bounds and splits ties at tensor bounds
(pytorch/pytorch#191142). Fixing the convention here keeps the learned step sizes independent of the installed
torch: at the bounds ∂y/∂s is c − r rather than c, which changes the optimisation, not only its rounding (a uniform
quantizer of 1,632 values, 10% of them on a bound: ∂y/∂s 34 against 156). The constant factors of the tangent chain
cancel. Gradients differ from the literal expression's (with an inclusive clamp) in rounding only (autograd forms
∂y/∂x as (g·s)·m / s, for example). Tensors saved for backward are contiguous, like the incoming gradient usually
is, so the scale's gradient is a dot product without copies.

Compiled reconstruction (``compile: true``, :func:`ptq_bench.transforms.reconstruction.reconstruct_block`) traces
the same two functions in a functional form (``_UniformSTEGraph``, ``_TangentSTEGraph``: no ``out=``, no in-place
operations, which dynamo cannot trace, and always the literal clamp, since the shifted bounds are proven with a
data-dependent check): the same operations on the same values, the same masks and closed-form gradients, for
AOTAutograd to trace forward and backward and inductor to fuse.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

Bound = Union[float, torch.Tensor]


def _new(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _reusable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if contiguous (to be overwritten), else a new contiguous tensor of its shape."""
    return t if t.is_contiguous() else _new(t)


def _inside_mask(t: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    """[low ≤ t ≤ high] as a 0/1 tensor of t's dtype, given ``clamped`` = clamp(t, low, high): exactly where clamping
    left t unchanged. Overwrites t where t is contiguous, else returns a new contiguous tensor."""
    return torch.eq(t, clamped, out=_reusable(t))


def _dot_to(values: torch.Tensor, other: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Σ values·other summed to ``like``'s shape (broadcast dimensions reduced), in ``like``'s dtype."""
    if like.ndim == 0:
        return torch.dot(values.reshape(-1), other.reshape(-1)).to(like.dtype)
    return (values * other).sum_to_size(like.shape).to(like.dtype)


class _UniformSTE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qmin: int,
        qmax: int,
        low: Optional[Bound],
        high: Optional[Bound],
    ) -> torch.Tensor:
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        # every result goes into a buffer made by empty_like (x's memory layout, as the literal expression's
        # results): measurably cheaper on a CPU than letting each operation allocate its own
        r = torch.div(x, scale, out=torch.empty_like(x))
        t = torch.round(r, out=torch.empty_like(r))
        if low is None:
            low, high = qmin, qmax
            t.add_(zero_point)
            shifted = False
        else:  # (qmin − z, qmax − z), exact for this zero point (uniform.shifted_clamp_bounds)
            shifted = True
        c = torch.clamp(t, low, high, out=torch.empty_like(t))
        mask = _inside_mask(t, c)
        del t
        if not shifted:
            c.sub_(zero_point)
        d = torch.addcmul(c, r, mask, value=-1, out=_reusable(r)) if need_s else None  # c − m·r
        ctx.save_for_backward(mask if (need_x or need_z) else None, d, scale, zero_point)
        return c.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        mask, d, scale, zero_point = ctx.saved_tensors
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        grad_x = torch.mul(grad, mask, out=torch.empty_like(grad)) if (need_x or need_z) else None
        grad_s = _dot_to(grad, d, scale) if need_s else None
        grad_z = None
        if need_z:  # −s·Σ g·(1 − m)
            outside = grad - grad_x
            total = outside.sum_to_size(zero_point.shape) if zero_point.ndim else outside.sum()
            grad_z = (total * -scale).to(zero_point.dtype)
        return (grad_x if need_x else None), grad_s, grad_z, None, None, None, None


def uniform_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    bounds: Optional[tuple[Bound, Bound]] = None,
) -> torch.Tensor:
    """``(clamp(round_ste(x/s) + z, qmin, qmax) − z)·s`` as one autograd node (gradients for x, s and z).

    ``bounds`` = (qmin − z, qmax − z) where the shifted clamp is exact for z (the four-pass form of
    :meth:`UniformQuantizer.quantize`), None for the literal form. ``scale`` and ``zero_point`` broadcast against
    ``x`` without enlarging it."""
    if torch.compiler.is_compiling():
        return _UniformSTEGraph.apply(x, scale, zero_point, qmin, qmax)  # the literal form (the same values)
    low, high = bounds if bounds is not None else (None, None)
    return _UniformSTE.apply(x, scale, zero_point, qmin, qmax, low, high)


class _UniformSTEGraph(torch.autograd.Function):
    """:class:`_UniformSTE` in functional form (literal clamp) for a compiled graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:  # type: ignore[override]
        r = x / scale
        t = torch.round(r) + zero_point
        c = torch.clamp(t, qmin, qmax)
        mask = torch.eq(t, c).to(x.dtype)
        c = c - zero_point
        ctx.save_for_backward(mask, c - mask * r, scale, zero_point)
        return c * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        mask, d, scale, zero_point = ctx.saved_tensors
        grad_x = grad * mask
        grad_s = (grad * d).sum_to_size(scale.shape).to(scale.dtype)
        grad_z = ((grad - grad_x).sum_to_size(zero_point.shape) * -scale).to(zero_point.dtype)
        return grad_x, grad_s, grad_z, None, None


class _TangentSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, theta0: torch.Tensor, theta1: torch.Tensor, qmax: int) -> torch.Tensor:  # type: ignore[override]
        # the operations of tanq.tan_fake_quant in its order, so that the values are the same bit for bit
        t0, t1 = torch.tan(theta0), torch.tan(theta1)
        clamped = torch.clamp(x, 0.0, 1.0, out=torch.empty_like(x))
        mask = None
        if ctx.needs_input_grad[0]:  # [0 ≤ x ≤ 1], into a new tensor (x stays)
            mask = torch.eq(x, clamped, out=_new(x))
        tangent = torch.mul(theta1 - theta0, clamped, out=clamped).add_(theta0).tan_()  # tan θ(x)
        u = torch.sub(tangent, t0, out=torch.empty_like(tangent)).div_(t1 - t0).mul_(qmax).round_()
        q = torch.clamp(u, 0, qmax, out=torch.empty_like(u))
        if mask is not None:
            mask.mul_(_inside_mask(u, q))
        w = q.div_(qmax).mul_(t1 - t0).add_(t0)  # t0 + (q / qmax)·(t1 − t0)
        y = torch.atan(w, out=u if u.is_contiguous() else torch.empty_like(w)).sub_(theta0).div_(theta1 - theta0)
        if mask is not None:  # (1 + tan²θ(x)) / (1 + w²), masked
            mask.mul_(tangent.square_().add_(1)).div_(w.square_().add_(1))
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        (factor,) = ctx.saved_tensors
        return torch.mul(grad, factor, out=torch.empty_like(grad)), None, None, None


def tangent_ste(x: torch.Tensor, theta0: torch.Tensor, theta1: torch.Tensor, bits: int) -> torch.Tensor:
    """``tanq.tan_fake_quant(x, θ0, θ1, bits)`` as one autograd node (gradient for x only; θ fixed)."""
    if torch.compiler.is_compiling():
        return _TangentSTEGraph.apply(x, theta0, theta1, 2**bits - 1)
    return _TangentSTE.apply(x, theta0, theta1, 2**bits - 1)


class _TangentSTEGraph(torch.autograd.Function):
    """:class:`_TangentSTE` in functional form for a compiled graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, theta0: torch.Tensor, theta1: torch.Tensor, qmax: int) -> torch.Tensor:  # type: ignore[override]
        t0, t1 = torch.tan(theta0), torch.tan(theta1)
        clamped = torch.clamp(x, 0.0, 1.0)
        tangent = torch.tan((theta1 - theta0) * clamped + theta0)
        u = torch.round((tangent - t0) / (t1 - t0) * qmax)
        q = torch.clamp(u, 0, qmax)
        w = q / qmax * (t1 - t0) + t0
        mask = torch.eq(x, clamped).to(x.dtype) * torch.eq(u, q).to(x.dtype)
        ctx.save_for_backward(mask * (tangent * tangent + 1) / (w * w + 1))
        return (torch.atan(w) - theta0) / (theta1 - theta0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None, None
