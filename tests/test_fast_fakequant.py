"""The fast inference paths of the uniform and log fake quantizers equal their literal forms bit for bit (torch.equal:
a zero may differ in sign), rounding ties and out-of-range values included, and training keeps the STE path."""

from __future__ import annotations

import math

import pytest
import torch

from ptq_bench.quant import UniformQuantizer, log, uniform
from ptq_bench.quant.base import round_ste
from ptq_bench.quant.log import Log2Quantizer, LogSqrt2Quantizer, exp2_reproduces_levels
from ptq_bench.quant.observers import affine_params
from ptq_bench.quant.uniform import shifted_clamp_bounds

BITS = range(2, 9)
LOG_KINDS = (Log2Quantizer, LogSqrt2Quantizer)


def literal(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) · s, op by op."""
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def neighbours(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every float32 within ``ulps`` steps of each value of ``x``."""
    down = up = x.to(torch.float32)
    found = [up]
    for _ in range(ulps):
        down, up = torch.nextafter(down, torch.tensor(-math.inf)), torch.nextafter(up, torch.tensor(math.inf))
        found += [down, up]
    return torch.cat(found)


def uniform_inputs(s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, g: torch.Generator) -> torch.Tensor:
    """Random values over and beyond the grid, the grid's rounding midpoints (±8 ulps, so some land exactly on a tie
    of x/s), ±inf and huge values."""
    span = (qmax - qmin) * s.max()
    center = ((qmin + qmax) / 2 - z).mean() * s.mean()
    random = center + span * (torch.rand(4096, generator=g) * 3 - 1.5)
    k = torch.arange(qmin - 3, qmax + 3, dtype=torch.float32) - z.mean().round()
    midpoints = neighbours((k + 0.5) * s.mean(), 8)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 3e38, -3e38, 1e-30])
    return torch.cat([random, midpoints, specials])


def test_uniform_inputs_hit_exact_ties():
    s, z = torch.tensor(0.0371), torch.tensor(8.0)
    x = uniform_inputs(s, z, 0, 15, torch.Generator().manual_seed(0))
    assert ((x / s).remainder(1) == 0.5).sum() > 10


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_integer_zero_point_equals_literal(bits: int, symmetric: bool):
    g = torch.Generator().manual_seed(bits)
    for _ in range(20):
        q = UniformQuantizer(bits, symmetric=symmetric)
        z = torch.zeros(()) if symmetric else torch.randint(q.qmin - 2, q.qmax + 3, (), generator=g).float()
        q.set_params(torch.rand((), generator=g) * 0.2 + 1e-3, z)
        x = uniform_inputs(q.scale, q.zero_point, q.qmin, q.qmax, g)
        assert torch.equal(q(x), literal(x, q.scale, q.zero_point, q.qmin, q.qmax))


@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_fractional_zero_point_equals_literal_on_both_paths(bits: int):
    """RepQ-ViT's reparameterized quantizers: a mean (fractional) zero point. Some take the four-pass form (proven
    exact per z), the rest the literal six passes; both must equal the literal form."""
    g = torch.Generator().manual_seed(100 + bits)
    q, paths = UniformQuantizer(bits), set()
    for i in range(60):
        z = torch.rand((), generator=g) * (q.qmax + 1)
        if i % 3 == 1:  # few mantissa bits: r + z is exact, so the four-pass form applies
            z = (z * 32).round() / 32
        elif i % 3 == 2:  # below a quarter of the grid with the last mantissa bit set: r + z rounds
            z = (z / 4).view(torch.int32).bitwise_or(1).view(torch.float32)
        q.set_params(torch.rand((), generator=g) * 0.2 + 1e-3, z)
        paths.add(shifted_clamp_bounds(q.zero_point, q.qmin, q.qmax) is not None)
        x = uniform_inputs(q.scale, q.zero_point, q.qmin, q.qmax, g)
        assert torch.equal(q(x), literal(x, q.scale, q.zero_point, q.qmin, q.qmax))
    assert paths == {True, False}


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_shifted_clamp_bounds_are_exact_for_every_integer_or_refused(bits: int):
    """Accepted bounds reproduce clamp(r + z) - z for every integer r of a wide range and ±inf; refused ones differ
    for some r (the check is not merely conservative)."""
    g = torch.Generator().manual_seed(bits)
    qmin, qmax = 0, 2**bits - 1
    r = torch.cat([torch.arange(-3 * 2**bits, 3 * 2**bits, dtype=torch.float32), torch.tensor([-math.inf, math.inf])])
    for _ in range(200):
        z = (torch.rand((), generator=g) * 2 - 0.5) * qmax
        expected = (r + z).clamp(qmin, qmax) - z
        bounds = shifted_clamp_bounds(z, qmin, qmax)
        if bounds is None:
            assert not torch.equal(r.clamp(qmin - z, qmax - z), expected)
        else:
            assert torch.equal(r.clamp(*bounds), expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("channel_dim", [0, -1])
def test_per_channel_equals_literal(bits: int, channel_dim: int):
    g = torch.Generator().manual_seed(200 + bits)
    x = torch.randn(16, 5, 24, generator=g) * torch.rand(24, generator=g) * 3
    q = UniformQuantizer(bits, granularity="channel", channel_dim=channel_dim)
    q.calibrating = True
    q(x)
    q.calibrating = False
    x = torch.cat([x, x * 4, x.round() * q.scale.mean()], dim=1)  # beyond the range, and near grid points
    assert torch.equal(q(x), literal(x, q.scale, q.zero_point, q.qmin, q.qmax))
    half = q.zero_point + (torch.rand(q.zero_point.shape, generator=g) * 8).round() / 8 - 0.5  # fractional z
    q.set_params(q.scale, half)
    assert torch.equal(q(x), literal(x, q.scale, q.zero_point, q.qmin, q.qmax))


@pytest.mark.parametrize("bits", BITS)
def test_per_token_equals_literal(bits: int):
    x = torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(bits)) * 3
    q = UniformQuantizer(bits, granularity="token")
    q.calibrated = True
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s, z = affine_params(low, high, bits, False)
    assert torch.equal(q(x), literal(x, s, z, q.qmin, q.qmax))


def test_cached_bounds_follow_in_place_edits_of_the_zero_point():
    q = UniformQuantizer(4)
    q.set_params(torch.tensor(0.1), torch.tensor(8.0))
    x = torch.linspace(-2, 2, 101)
    q(x)
    q.zero_point.fill_(7.4948)
    assert torch.equal(q(x), literal(x, q.scale, q.zero_point, q.qmin, q.qmax))


def test_uniform_straight_through_gradients_use_the_differentiable_path():
    """Reconstruction trains x and the step size through the quantizer: same values, STE gradients."""
    q = UniformQuantizer(4)
    q.set_params(torch.tensor(0.1), torch.tensor(7.4948))
    q.scale = torch.nn.Parameter(q.scale)
    x = (torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.8).requires_grad_()
    out = q(x)
    assert out.grad_fn is not None
    out.sum().backward()
    x2, s2 = x.detach().clone().requires_grad_(), q.scale.detach().clone().requires_grad_()
    ref = (torch.clamp(round_ste(x2 / s2) + q.zero_point, q.qmin, q.qmax) - q.zero_point) * s2
    ref.sum().backward()
    # one fused autograd node (ptq_bench/quant/ste.py): the scale's gradient sums other roundings of terms up to
    # qmax/2 that cancel to about 0.09 (both are within 2e-5 of the float64 value)
    assert torch.equal(out, ref) and torch.equal(x.grad, x2.grad) and torch.allclose(q.scale.grad, s2.grad, rtol=1e-3)
    with torch.no_grad():
        assert torch.equal(q(x), out)


# ------------------------------------------------------------------------------------------------------ log


def log_inputs(q: Log2Quantizer | LogSqrt2Quantizer, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Attention-like values, values above δ, tiny ones, 0 and inf, and ±64 ulps around every level boundary
    δ·2^-(k+1/2)/steps (so that some hit an exact tie of steps·log2(x/δ))."""
    d = q.scale.double()
    k = torch.arange(-3, q.levels + 3, dtype=torch.float64)
    boundaries = neighbours(d * torch.exp2(-(k + 0.5) / q.steps_per_octave), 64)
    random = torch.cat([torch.rand(4096, generator=g) * 2 * q.scale, torch.rand(1024, generator=g) ** 30])
    specials = torch.tensor([0.0, math.inf, 1e-45, 1e-38, 3e38])
    return torch.cat([random, boundaries[boundaries > 0], specials]).to(dtype)


@pytest.mark.parametrize("kind", LOG_KINDS)
def test_log_inputs_hit_exact_ties(kind):
    q = kind(4)
    q.set_scale(torch.tensor(0.37))
    x = log_inputs(q, torch.float32, torch.Generator().manual_seed(0))
    w = torch.log2(x / q.scale) * q.steps_per_octave
    assert (w.remainder(1) == 0.5).sum() > 10


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", LOG_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_exp2_path_equals_level_table(kind, bits: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(bits)
    q = kind(bits)
    exact = exp2_reproduces_levels(kind, bits, dtype, "cpu")
    if dtype == torch.float32:
        assert exact  # the fast path is the one tested here
    for _ in range(10):
        q.set_scale(torch.rand((), generator=g) * 0.9 + 1e-3)
        x = log_inputs(q, dtype, g)
        fast = q.quantize(x)
        assert torch.equal(fast, q._fake_quant_table(x, q.scale))
        assert fast.dtype == dtype


@pytest.mark.parametrize("steps", [1, 2])
def test_rounding_to_a_step_matches_round_half_even(steps: int):
    q = (Log2Quantizer if steps == 1 else LogSqrt2Quantizer)(4)
    ties = torch.arange(-600, 600, dtype=torch.float32) / (2 * steps)  # every half step, ties included
    h = torch.cat([ties, neighbours(ties, 3), torch.randn(10000) * 100, torch.tensor([math.inf, -math.inf])])
    assert torch.equal(q._round_to_step_(h.clone()), torch.round(h * steps) / steps)


def test_exp2_path_is_refused_where_it_would_differ():
    assert not exp2_reproduces_levels(LogSqrt2Quantizer, 4, torch.float16, "cpu")
    assert not exp2_reproduces_levels(LogSqrt2Quantizer, 12, torch.float32, "cpu")  # denormal odd levels
    x = torch.rand(1000, dtype=torch.float16)
    q = LogSqrt2Quantizer(4)
    q.set_scale(torch.tensor(0.5))
    assert torch.equal(q.quantize(x), q._fake_quant_table(x, q.scale))


@pytest.mark.parametrize("kind", LOG_KINDS)
def test_log_calibration_is_unchanged_by_the_exp2_path(kind, monkeypatch):
    x = (torch.randn(4, 3, 17, 17, generator=torch.Generator().manual_seed(1)) * 3).softmax(-1)
    fast = kind(4)
    fast.calibrating = True
    out_fast = fast(x)
    monkeypatch.setattr(log, "exp2_reproduces_levels", lambda *args: False)
    table = kind(4)
    table.calibrating = True
    assert torch.equal(table(x), out_fast) and torch.equal(table.scale, fast.scale)


@pytest.mark.parametrize("kind", LOG_KINDS)
def test_log_straight_through_gradient(kind):
    q = kind(4)
    q.set_scale(torch.tensor(0.6))
    x = torch.rand(3, 50, generator=torch.Generator().manual_seed(2)).softmax(-1).requires_grad_()
    out = q(x)
    (out * torch.arange(50.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(50.0).expand(3, 50))
    assert torch.equal(out.detach(), q._fake_quant_table(x.detach(), q.scale))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("softmax", ["log_sqrt2", "log2"])
def test_repq_vit_run_is_bit_identical_with_the_literal_forms(softmax: str, monkeypatch):
    """RepQ-ViT on the official pin's tiny ViT: calibration and logits with the fast paths equal those with every
    quantizer forced onto its literal form (six passes, level table)."""
    from pins import synthetic_batch, tiny_vit

    from ptq_bench.calibration import image_calibration
    from ptq_bench.methods import BitWidth, build_method

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = tiny_vit()
        with torch.no_grad():
            build_method("repq_vit", BitWidth(4, 4), softmax_quantizer=softmax).quantize(
                model, image_calibration(synthetic_batch(1000, 32, (3, 32, 32)))
            )
            return model(synthetic_batch(2000, 16, (3, 32, 32))), {k: v.clone() for k, v in model.state_dict().items()}

    fast_logits, fast_state = run()
    monkeypatch.setattr(uniform, "shifted_clamp_bounds", lambda *args: None)
    monkeypatch.setattr(log, "exp2_reproduces_levels", lambda *args: False)
    literal_logits, literal_state = run()
    assert torch.equal(fast_logits, literal_logits)
    assert fast_state.keys() == literal_state.keys()
    assert all(torch.equal(fast_state[k], literal_state[k]) for k in fast_state)
