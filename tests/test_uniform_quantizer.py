"""The uniform quantizer's grid, rounding, granularities and straight-through gradient, by hand."""

import pytest
import torch

from ptq_bench.errors import ConfigError
from ptq_bench.quant import QUANTIZERS, UniformQuantizer, validate_bits
from ptq_bench.quant.observers import OBSERVERS, affine_params


def calibrated(q: UniformQuantizer, x: torch.Tensor) -> UniformQuantizer:
    q.calibrating = True
    q(x)
    q.calibrating = False
    return q


def test_asymmetric_grid_matches_hand_computation():
    # range [-1, 2] at 2 bits: scale = 3/3 = 1, zero point = round(1/1) = 1 -> grid {-1, 0, 1, 2}
    q = calibrated(UniformQuantizer(2), torch.tensor([-1.0, 2.0]))
    assert q.scale.item() == pytest.approx(1.0) and q.zero_point.item() == 1.0
    x = torch.tensor([-3.0, -0.6, -0.4, 0.49, 0.51, 1.5, 2.5, 9.0])
    # round half to even: 1.5 -> 2
    assert q(x).tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0]


def test_symmetric_grid_is_signed_and_zero_centred():
    q = calibrated(UniformQuantizer(3, symmetric=True), torch.tensor([-0.5, 3.0]))
    assert q.scale.item() == pytest.approx(3.0 / 3) and q.zero_point.item() == 0.0
    assert (q.qmin, q.qmax) == (-4, 3)
    assert q(torch.tensor([-10.0, -1.2, 0.4, 10.0])).tolist() == [-4.0, -1.0, 0.0, 3.0]


def test_per_channel_weight_scales_have_one_entry_per_output_channel():
    w = torch.stack([torch.linspace(-1, 2, 5), torch.linspace(-3, 12, 5), torch.linspace(0, 15, 5)])
    q = calibrated(UniformQuantizer(4, granularity="channel", channel_dim=0), w)
    assert q.scale.shape == (3, 1)
    assert torch.allclose(q.scale.flatten(), torch.tensor([0.2, 1.0, 1.0]))
    assert q.zero_point.flatten().tolist() == [5.0, 3.0, 0.0]  # round(-min / scale)
    # every channel's extremes are on its grid
    assert torch.allclose(q(w)[:, [0, -1]], w[:, [0, -1]], atol=1e-6)


def test_per_channel_activation_uses_last_dimension():
    x = torch.randn(2, 7, 4) * torch.tensor([1.0, 10.0, 100.0, 0.1])
    q = calibrated(UniformQuantizer(8, granularity="channel", channel_dim=-1), x)
    assert q.scale.shape == (4,)
    ranges = x.reshape(-1, 4).amax(0) - x.reshape(-1, 4).amin(0)
    assert torch.allclose(q.scale, ranges / 255)


def test_per_token_is_dynamic():
    q = calibrated(UniformQuantizer(4, granularity="token"), torch.zeros(1, 2, 3))
    x = torch.tensor([[[0.0, 1.2, 3.0], [0.0, 120.0, 300.0]]])
    out = q(x)
    assert torch.allclose(out, x)  # each token's own range puts its three values on the grid (3.0/15 steps)


def test_straight_through_gradient_inside_range_and_zero_when_clamped():
    q = calibrated(UniformQuantizer(2), torch.tensor([-1.0, 2.0]))
    x = torch.tensor([-5.0, 0.3, 1.2, 5.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_disabled_quantizer_is_identity_and_uncalibrated_use_fails():
    q = UniformQuantizer(4)
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.ones(3))
    q.enabled = False
    x = torch.randn(5)
    assert q(x) is x


@pytest.mark.parametrize("bits", [0, 17, 2.5, True, "4"])
def test_bits_are_validated(bits):
    with pytest.raises(ConfigError):
        validate_bits(bits)


def test_percentile_observer_clips_outliers_and_mse_observer_shrinks_range():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100_000), torch.tensor([80.0])])
    low, high = OBSERVERS.get("percentile")(x[None], 4, False)
    assert high.item() < 10 and low.item() > -10
    low_m, high_m = OBSERVERS.get("mse")(x[None], 4, False)
    assert high_m.item() < 80.0
    scale, _ = affine_params(low, high, 4, False)
    assert scale.item() == pytest.approx((high - low).item() / 15)


def test_registry_lists_uniform_and_rejects_unknown_names():
    assert QUANTIZERS.get("uniform") is UniformQuantizer
    with pytest.raises(ConfigError, match="unknown quantizer 'nope'"):
        QUANTIZERS.get("nope")
