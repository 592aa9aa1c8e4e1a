"""DopQ-ViT: TanQ grid and error, MOSF target rules and compensation, the method end to end (all CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from ptq_bench.calibration import image_calibration
from ptq_bench.quant import QUANTIZERS, Quantizer
from ptq_bench.quant.tanq import TanQuantizer, tan_grid
from ptq_bench.transforms.mosf import (
    effective_channel_params,
    mad_outliers,
    mean_target,
    median_target,
    mosf_target,
)


def attention_like(seed: int = 0, temperature: float = 3.0, heads: int = 3, tokens: int = 65) -> torch.Tensor:
    """Softmax of scaled Gaussian logits: a power-law map with most mass near 0 and a few values near 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(4, heads, tokens, tokens, generator=g) * temperature, dim=-1)


def calibrated(name: str, bits: int, x: torch.Tensor) -> Quantizer:
    quantizer = QUANTIZERS.get(name)(bits)
    quantizer.calibrating = True
    quantizer(x)
    quantizer.calibrating = False
    return quantizer


def levels_in(quantizer: Quantizer, low: float, high: float) -> int:
    """Distinct reconstruction values in [low, high], found by quantizing a dense sweep of [0, 1]."""
    out = quantizer(torch.linspace(0.0, 1.0, 200_001))
    values = torch.unique(out)
    return int(((values >= low) & (values <= high)).sum())


# ----------------------------------------------------------------------------------------------- TanQ


def test_tan_grid_endpoints_and_uniform_limit() -> None:
    grid = tan_grid(torch.tensor(-1.2), torch.tensor(1.2), 4)
    assert torch.allclose(grid[[0, -1]], torch.tensor([0.0, 1.0]), atol=1e-6)
    steps = grid.diff()
    assert steps[0] < steps[7] and steps[-1] < steps[7]  # dense at both ends, sparse in the middle
    near_uniform = tan_grid(torch.tensor(-1e-3), torch.tensor(1e-3), 3)
    assert torch.allclose(near_uniform, torch.linspace(0, 1, 8), atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_tanq_has_more_levels_near_one_than_log_quantizers(bits: int) -> None:
    x = attention_like()
    counts = {name: levels_in(calibrated(name, bits, x), 0.9, 1.0) for name in ("tanq", "log2", "log_sqrt2")}
    assert counts["tanq"] > counts["log2"] and counts["tanq"] > counts["log_sqrt2"], counts


@pytest.mark.parametrize("bits", [3, 4])
def test_tanq_error_beats_log2_on_attention_like_tensor(bits: int) -> None:
    x = attention_like(seed=1)
    errors = {name: (calibrated(name, bits, x)(x) - x).pow(2).mean().item() for name in ("tanq", "log2")}
    assert errors["tanq"] < errors["log2"], errors


def test_tanq_search_picks_the_best_candidate_per_head() -> None:
    x = torch.cat([attention_like(seed=2, temperature=1.0, heads=1), attention_like(seed=3, temperature=6.0, heads=1)], dim=1)
    quantizer = TanQuantizer(4, granularity="head")
    errors = quantizer.candidate_errors(x)  # (candidates, heads)
    quantizer.calibrating = True
    out = quantizer(x)
    assert quantizer.theta0.shape == (2, 1, 1)
    for head in range(2):
        chosen = (out[:, head] - x[:, head]).pow(2).mean()
        assert torch.isclose(chosen, errors[:, head].min(), rtol=1e-4)


def test_tanq_passes_gradients_straight_through() -> None:
    x = attention_like(seed=4).requires_grad_(True)
    quantizer = calibrated("tanq", 4, x.detach())
    out = quantizer(x)
    out.sum().backward()
    inside = (out > 0) & (out < 1)  # codes strictly inside the grid (clamped codes get no gradient, as in uniform)
    assert x.grad is not None and inside.any()
    assert torch.allclose(x.grad[inside].mean(), torch.tensor(1.0), atol=0.15)


# ----------------------------------------------------------------------------------------------- MOSF


def test_rules_and_outlier_flags() -> None:
    scales = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 20.0, 30.0])
    zero_points = torch.tensor([8.0, 7.0, 8.0, 9.0, 8.0, 8.0, 1.0, 15.0])
    assert mad_outliers(scales).tolist() == [False] * 6 + [True, True]
    assert mean_target(scales, zero_points)[0] > 5.0  # dragged up by two channels
    assert median_target(scales, zero_points)[0] == 1.0
    s_t, z_t = mosf_target(scales, zero_points)
    assert s_t == 1.0 and z_t == 8.0
    s_eff, z_eff = effective_channel_params(scales, zero_points, (s_t, z_t), "mad")
    assert torch.equal(s_eff[6:], scales[6:]) and torch.equal(z_eff[6:], zero_points[6:])  # outliers keep theirs
    assert torch.all(s_eff[:6] == s_t)
    assert torch.allclose(z_eff[:6] * s_eff[:6], zero_points[:6] * scales[:6])  # clipping minimum preserved


def tiny_vit(seed: int = 0, depth: int = 1) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth, num_classes=10
    ).eval()


def plant_outlier_channels(model: torch.nn.Module, seed: int = 0) -> None:
    """Give norm1 a few channels with 30× gain and large offsets, as in real post-LayerNorm activations, and
    shrink qkv's weight columns of those channels by the same factor (trained nets pair the two)."""
    g = torch.Generator().manual_seed(seed)
    norm = model.blocks[0].norm1
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.2 * torch.randn(norm.bias.shape, generator=g))
        channels = torch.tensor([3, 50, 101, 170])
        norm.weight[channels] *= 30.0
        norm.bias[channels] += 10.0
        model.blocks[0].attn.qkv.weight[:, channels] /= 30.0


def post_layernorm_error(rule: str, compensation: str, reparameterize: bool = True) -> float:
    """Relative error of qkv's output when only its (reparameterized, per-tensor, 4-bit) input is quantized
    (``reparameterize=False``: left per channel, the error the reparameterization should keep)."""
    from ptq_bench.models import calibrating, prepare_
    from ptq_bench.quant import UniformQuantizer
    from ptq_bench.transforms.mosf import mosf_reparameterize_

    model = tiny_vit()
    plant_outlier_channels(model)
    tokens = torch.randn(8, 17, 192, generator=torch.Generator().manual_seed(1))
    block = model.blocks[0]
    reference = block.attn.qkv(block.norm1(tokens))

    def factory(site):  # only the post-LayerNorm activations are quantized
        if site.role == "post_layernorm":
            return UniformQuantizer(4, granularity="channel", channel_dim=-1, observer="percentile")
        return None

    prepare_(model, factory)
    with torch.no_grad(), calibrating(model):
        block(tokens)  # calibrates the inputs of qkv and fc1
        if reparameterize:
            mosf_reparameterize_(model, rule, compensation)  # type: ignore[arg-type]
        out = block.attn.qkv(block.norm1(tokens))
    return ((out - reference).pow(2).mean() / reference.pow(2).mean()).item()


def test_mosf_beats_mean_rule_with_planted_outlier_channels() -> None:
    """With the exact fold, MOSF's integer (median) zero point reproduces every channel grid; the mean's fractional
    zero point shifts them, which costs levels at the clamp bounds."""
    channel_wise = post_layernorm_error("mosf", "all", reparameterize=False)
    mosf, mean = post_layernorm_error("mosf", "all"), post_layernorm_error("mean", "all")
    assert mosf < mean, (mosf, mean)
    assert mosf == pytest.approx(channel_wise, rel=1e-3)
    assert mean > channel_wise * (1 + 5e-3)


def test_plain_layerwise_quantization_is_much_worse() -> None:
    channel_wise = post_layernorm_error("mosf", "all", reparameterize=False)
    assert post_layernorm_error("median", "none") > 2 * channel_wise


@pytest.mark.parametrize("rule,compensation", [("mosf", "mad"), ("mean", "all"), ("median", "none")])
def test_reparameterization_keeps_fp_logits(rule: str, compensation: str) -> None:
    from ptq_bench.methods import BitWidth, build_method
    from ptq_bench.models import set_quantizers_enabled

    model = tiny_vit(depth=2)
    plant_outlier_channels(model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(images)
    cfg = {"name": "dopq_vit", "scale_factor": rule, "compensation": compensation, "reconstruction": False}
    quantized = build_method(cfg, BitWidth(4, 4)).quantize(model, image_calibration(images))
    set_quantizers_enabled(quantized, False)
    with torch.no_grad():
        assert torch.allclose(quantized(images), reference, atol=1e-4, rtol=1e-4)
    assert not torch.equal(model.blocks[0].norm1.weight, tiny_vit(depth=2).blocks[0].norm1.weight)  # it did fold


# ----------------------------------------------------------------------------------------------- method


def test_dopq_vit_end_to_end_with_reconstruction() -> None:
    from ptq_bench.methods import BitWidth, build_method
    from ptq_bench.quant import UniformQuantizer

    model = tiny_vit(depth=2)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(images)
    cfg = {"name": "dopq_vit", "iters": 5, "batch_size": 8, "init_calib_size": 8}
    method = build_method(cfg, BitWidth(4, 4))
    quantized = method.quantize(model, image_calibration(images))
    with torch.no_grad():
        out = quantized(images)
    assert torch.isfinite(out).all() and not torch.allclose(out, reference)
    attn = quantized.blocks[1].attn
    assert isinstance(attn.matmul2.quantizer_a, TanQuantizer)
    qkv_input = attn.qkv.input_quantizer
    assert isinstance(qkv_input, UniformQuantizer) and qkv_input.granularity == "tensor"
    assert not qkv_input.scale.requires_grad  # reconstruction handed the step sizes back as plain buffers
    assert all(p.requires_grad for p in quantized.parameters())  # and restored the parameters' flags


def test_reconstruction_changes_step_sizes() -> None:
    from ptq_bench.methods import BitWidth, build_method

    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    scales, weight_scales = [], []
    for reconstruction in (False, True):
        cfg = {"name": "dopq_vit", "iters": 10, "batch_size": 8, "reconstruction": reconstruction}
        quantized = build_method(cfg, BitWidth(4, 4)).quantize(tiny_vit(depth=2), image_calibration(images))
        scales.append(quantized.blocks[0].mlp.fc2.input_quantizer.scale.clone())
        weight_scales.append(quantized.blocks[0].mlp.fc2.weight_quantizer.scale.clone())
        assert all(p.grad is None for p in quantized.parameters())  # step sizes train, weights get no gradients
    assert not torch.equal(scales[0], scales[1])
    assert not torch.equal(weight_scales[0], weight_scales[1])  # weight step sizes train through the uncached path


def test_unknown_options_are_rejected() -> None:
    from ptq_bench.errors import ConfigError
    from ptq_bench.methods import BitWidth, build_method

    for bad in ({"softmax_quantizer": "log10"}, {"scale_factor": "max"}, {"compensation": "some"}, {"tanq_centers": [2.0]}):
        with pytest.raises(ConfigError):
            build_method({"name": "dopq_vit", **bad}, BitWidth(4, 4))
