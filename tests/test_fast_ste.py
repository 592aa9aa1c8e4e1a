"""The one-node straight-through quantizers of block reconstruction (ptq_bench/quant/ste.py) give the literal
expressions' values bit for bit and their autograd gradients up to float rounding, for every way the uniform,
tangent and DFQ quantizers are trained; the quantizers use them only where something requires grad. The literal
expressions clamp with the subgradient 1 at the bounds (ste.py's convention, torch's clamp before 2.13), whatever
the installed torch's clamp does."""

from __future__ import annotations

import math

import pytest
import torch

from ptq_bench.quant import UniformQuantizer
from ptq_bench.quant.base import round_ste
from ptq_bench.quant.dfq import DynamicFocusingQuantizer
from ptq_bench.quant.observers import affine_params
from ptq_bench.quant.ste import tangent_ste, uniform_ste
from ptq_bench.quant.tanq import TanQuantizer, tan_fake_quant
from ptq_bench.quant.uniform import shifted_clamp_bounds
from ste_reference import literal, literal_tangent  # tests/ste_reference.py


def grads(fn, *inputs: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list]:
    """fn's value and the gradients of sum(fn · G) (G fixed random) for the inputs that require grad."""
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    leaves = [t for t in inputs if t.requires_grad]
    return out.detach(), list(torch.autograd.grad((out * weight).sum(), leaves))


def copies(*tensors: torch.Tensor, grad: tuple[bool, ...]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(g) for t, g in zip(tensors, grad)]


def values_on_and_beyond_the_grid(shape: tuple[int, ...], s: torch.Tensor, z: torch.Tensor, qmax: int, seed: int) -> torch.Tensor:
    """Random values over 1.5× the grid, with some exactly on grid points and bounds (ties of the clamp mask)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g) * 1.5 * qmax - 0.25 * qmax - z) * s
    on_grid = (torch.randint(-2, qmax + 3, shape, generator=g) - z) * s
    return torch.where(torch.rand(shape, generator=g) < 0.3, on_grid, x)


CASES = [  # (x shape, scale shape, zero point, needs grad for (x, s))
    ((8, 17, 12), (), 8.0, (True, True)),  # activation per tensor, integer z (shifted bounds)
    ((8, 17, 12), (), 7.4948, (True, True)),  # RepQ-ViT's fractional zero point after reparameterization
    ((8, 17, 12), (12,), 3.0, (True, True)),  # post-LayerNorm per channel (AIQViT)
    ((12, 20), (12, 1), 8.0, (False, True)),  # weight per output channel, only the step size learns (DopQ-ViT)
    ((12, 20), (12, 1), 8.0, (True, True)),  # weight with a low-rank branch (AIQViT merged)
    ((8, 17, 12), (), 0.0, (True, False)),  # only the input learns
]


@pytest.mark.parametrize("shape, scale_shape, z_value, need", CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_uniform_ste_equals_the_literal_expression(shape, scale_shape, z_value, need, transposed) -> None:
    g = torch.Generator().manual_seed(len(shape) + len(scale_shape))
    s = torch.rand(scale_shape, generator=g) * 0.2 + 0.05
    z = torch.full(scale_shape, z_value)
    x = values_on_and_beyond_the_grid(shape, s, z, 15, seed=1)
    if transposed and len(shape) == 3 and scale_shape == ():
        x = x.transpose(0, 1)  # a permuted view, as q, k and v are
    bounds = shifted_clamp_bounds(z, 0, 15)
    assert (bounds is None) == (z_value != math.floor(z_value))
    ref_out, ref_grads = grads(lambda a, b: literal(a, b, z, 0, 15), *copies(x, s, grad=need))
    out, got = grads(lambda a, b: uniform_ste(a, b, z, 0, 15, bounds), *copies(x, s, grad=need))
    assert torch.equal(out, ref_out)
    for mine, ref in zip(got, ref_grads):
        assert mine.shape == ref.shape
        assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("bounds", [(0.0, 15.0), None])
def test_uniform_ste_mask_includes_the_bounds(bounds) -> None:
    """Values that round onto a bound pass their gradient (torch's clamp before 2.13), beyond them none."""
    s, z = torch.tensor(1.0), torch.tensor(0.0)
    x = torch.tensor([-3.0, -0.6, 0.0, 0.4, 1.0, 14.6, 15.0, 15.4, 20.0], requires_grad=True)
    uniform_ste(x, s, z, 0, 15, bounds).sum().backward()
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0]


def test_per_token_bounds_and_learned_zero_point() -> None:
    """Tensor bounds (a per-token quantizer) and a zero point that requires grad (DFQ's round_ste(-b1/s))."""
    x = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(3))
    q = UniformQuantizer(4, granularity="token")
    with torch.no_grad():
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s, z = affine_params(low, high, 4, False)
    ref_out, (ref_gx,) = grads(lambda a: literal(a, s, z, q.qmin, q.qmax), *copies(x, grad=(True,)))
    out, (gx,) = grads(lambda a: uniform_ste(a, s, z, q.qmin, q.qmax, (q.qmin - z, q.qmax - z)), *copies(x, grad=(True,)))
    assert torch.equal(out, ref_out) and torch.allclose(gx, ref_gx)
    b1 = torch.tensor(0.1)

    def dfq(fn):
        def run(a: torch.Tensor, width: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
            scale = width / 15
            return fn(a, scale, round_ste(-start / scale))
        return run

    inputs = (torch.rand(3, 40, generator=torch.Generator().manual_seed(4)), torch.tensor(0.8), b1)
    ref_out, ref = grads(dfq(lambda a, sc, zp: literal(a, sc, zp, 0, 15)), *copies(*inputs, grad=(True, True, True)))
    out, got = grads(dfq(lambda a, sc, zp: uniform_ste(a, sc, zp, 0, 15)), *copies(*inputs, grad=(True, True, True)))
    assert torch.equal(out, ref_out)
    assert all(torch.allclose(m, r, rtol=1e-4, atol=1e-5) for m, r in zip(got, ref))


@pytest.mark.parametrize("per_head", [False, True])
def test_tangent_ste_equals_tan_fake_quant(per_head: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 9, 9, generator=g) * 3).softmax(-1)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 1.0 - 2**-24])  # the clamp's bounds and just inside
    x[1, 1, 1, :2] = torch.tensor([-0.1, 1.2])  # outside [0, 1]
    if per_head:
        theta0, theta1 = torch.tensor([-0.2, -0.6, -1.2]).view(3, 1, 1), torch.tensor([0.2, 0.6, 1.2]).view(3, 1, 1)
    else:
        theta0, theta1 = torch.tensor(-0.75), torch.tensor(0.75)
    for bits in (3, 4, 8):
        assert torch.equal(literal_tangent(x, theta0, theta1, bits), tan_fake_quant(x, theta0, theta1, bits))
        ref_out, (ref,) = grads(lambda a, bits=bits: literal_tangent(a, theta0, theta1, bits), *copies(x, grad=(True,)))
        out, (got,) = grads(lambda a, bits=bits: tangent_ste(a, theta0, theta1, bits), *copies(x, grad=(True,)))
        assert torch.equal(out, ref_out)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_quantizers_take_the_fused_path_only_when_training() -> None:
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(6))
    uniform = UniformQuantizer(4)
    uniform.set_params(torch.tensor(0.1), torch.tensor(8.0))
    tanq = TanQuantizer(4)
    tanq.calibrating = True
    tanq(x.softmax(-1))
    dfq = DynamicFocusingQuantizer(4)
    dfq.calibrating = True
    dfq(x.softmax(-1))
    for quantizer, data in ((uniform, x), (tanq, x.softmax(-1)), (dfq, x.softmax(-1))):
        with torch.no_grad():
            assert quantizer(data).grad_fn is None
        trained = quantizer(data.clone().requires_grad_(True))
        assert type(trained.grad_fn).__name__ in ("_UniformSTEBackward", "_TangentSTEBackward")
