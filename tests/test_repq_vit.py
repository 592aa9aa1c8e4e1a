"""RepQ-ViT: log2/log√2 grids, torch.quantile-exact percentiles, the scale reparameterization, the recipe, and a
pin against the official code's output on a tiny ViT (tests/fixtures/repq_vit_tiny_w4a4.npz)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from pins import load_fixture, oracle_batches, quantize_and_evaluate, synthetic_batch, tiny_vit
from torch import nn

from ptq_bench.calibration import image_calibration
from ptq_bench.compare import qparam_diffs
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.models import calibrating, named_quantizers, prepare_, set_quantizers_enabled
from ptq_bench.quant import QUANTIZERS, UniformQuantizer
from ptq_bench.quant.log import Log2Quantizer, LogSqrt2Quantizer
from ptq_bench.quant.observers import _rank, ranks_in_input_dtype, rowwise_quantiles
from ptq_bench.transforms import reparameterize_layernorm_

#: the fixture was made under torch 2.14, whose torch.quantile forms ranks in double (observers.ranks_in_input_dtype)
FIXTURE_RANKS_IN_INPUT_DTYPE = False
SQRT2 = math.sqrt(2.0)


def calibrated(quantizer: UniformQuantizer | Log2Quantizer, x: torch.Tensor):
    quantizer.calibrating = True
    quantizer(x)
    quantizer.calibrating = False
    return quantizer


# ---------------------------------------------------------------------------------------------- grids


def test_log_sqrt2_grid_by_hand() -> None:
    q = LogSqrt2Quantizer(3)
    q.set_scale(torch.tensor(0.5))
    x = 0.5 * torch.tensor([3.0, 1.0, 0.8, 2**-0.5, 0.5, 2**-1.25, 2**-3.5, 2**-3.75, 2**-6, 0.0])
    # exponents round(-2·log2(x/δ)):  -3→0, 0, 0.64→1, 1, 2, 2.5→2 (half to even), 7, 7.5→8 (≥ 2^3: zero), 12, inf
    expected = 0.5 * torch.tensor([1.0, 1.0, SQRT2 / 2, SQRT2 / 2, 0.5, 0.5, SQRT2 / 16, 0.0, 0.0, 0.0])
    assert torch.allclose(q(x), expected, rtol=1e-7, atol=0)


def test_log2_grid_by_hand() -> None:
    q = Log2Quantizer(2)
    q.set_scale(torch.tensor(2.0))
    x = 2.0 * torch.tensor([1.5, 1.0, 0.7, 0.5, 2**-1.5, 0.25, 2**-3.4, 2**-3.6, 0.0])
    # exponents round(-log2(x/δ)): -0.58→-1→0, 0, 0.51→1, 1, 1.5→2, 2, 3.4→3, 3.6→4 (≥ 2^2: zero), inf
    expected = 2.0 * torch.tensor([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.0, 0.0])
    assert torch.equal(q(x), expected)


@pytest.mark.parametrize("name", ["log2", "log_sqrt2"])
def test_log_scale_is_best_percentile_by_mse(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(2, 3, 50, 50, generator=g) * 3, dim=-1)
    quantizer = calibrated(QUANTIZERS.get(name)(4), x)
    probe = QUANTIZERS.get(name)(4)
    errors = []
    for pct in (0.999, 0.9999, 0.99999):
        probe.set_scale(torch.quantile(x.reshape(-1), pct))
        errors.append(((x - probe(x)) ** 2).mean().item())
    best = torch.quantile(x.reshape(-1), (0.999, 0.9999, 0.99999)[int(np.argmin(errors))])
    assert torch.equal(quantizer.scale, best)


@pytest.mark.parametrize("n", [1, 3, 1000, 200_003])
def test_rowwise_quantiles_equal_torch_quantile(n: int) -> None:
    rows = torch.randn(2, n, generator=torch.Generator().manual_seed(n))
    qs = [1.0 - 0.999, 0.999, 1.0 - 0.99999, 0.99999, 0.5]
    for q, value in zip(qs, rowwise_quantiles(rows, qs)):
        assert torch.equal(value, torch.quantile(rows, q, dim=1))


def test_quantile_rank_conventions_of_old_and_new_torch() -> None:
    """torch.quantile formed the rank in float32 until pytorch/pytorch#187574 and in double since; the observers
    follow the installed torch (the test above), and both forms are pinned here."""
    below, weight = _rank(0.999, 1000, torch.float32, in_dtype=True)
    assert (below, weight) == (998, 0.0010375976562500)  # float32(0.999) · 999 rounded to float32
    below, weight = _rank(0.999, 1000, torch.float32, in_dtype=False)
    assert below == 998 and weight == pytest.approx(float(torch.tensor(0.999)) * 999 - 998, abs=1e-12)  # 0.00101286
    assert _rank(0.99999, 200_003, torch.float32, in_dtype=True) == (200_000, 0.0)  # the rank rounds up in float32
    assert _rank(0.99999, 200_003, torch.float32, in_dtype=False)[0] == 199_999


# ------------------------------------------------------------------------------- reparameterization


def _fp_and_reparameterized(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    with torch.no_grad():
        fp = model(images)
        build_method("repq_vit", BitWidth(4, 4)).quantize(model, image_calibration(images))
        set_quantizers_enabled(model, False)
        off = model(images)
    return fp, off, model


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2),
        lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2, 1, 1)),
    ],
    ids=["deit_tiny", "swin_tiny"],
)
def test_reparameterization_preserves_fp_function(build) -> None:
    torch.manual_seed(0)
    model = build().eval()
    # push channel ranges apart so the reparameterization factors are far from 1
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.5)
            nn.init.normal_(module.bias, 0.0, 0.5)
    images = torch.randn(1, 3, 224, 224)
    fp, off, model = _fp_and_reparameterized(model, images)
    assert torch.allclose(off, fp, atol=2e-5, rtol=1e-4), (off - fp).abs().max()
    post_ln = [q for name, q in named_quantizers(model) if q.role == "post_layernorm"]
    assert post_ln and all(q.granularity == "tensor" and q.scale.ndim == 0 for q in post_ln)
    if "swin" in type(model).__name__.lower():
        assert any(name.endswith("reduction.input_quantizer") for name, _ in named_quantizers(model))


def test_reparameterization_requires_calibrated_per_channel_quantizer() -> None:
    model = tiny_vit()
    prepare_(model, lambda site: UniformQuantizer(4, granularity="tensor"))
    with pytest.raises(ValueError, match="per channel"):
        reparameterize_layernorm_(model)
    model = tiny_vit()
    prepare_(model, lambda site: UniformQuantizer(4, granularity="channel", channel_dim=0 if site.is_weight else -1))
    with pytest.raises(ValueError, match="not calibrated"):
        reparameterize_layernorm_(model)


def test_custom_target_fn_is_used() -> None:
    model = tiny_vit()
    images = synthetic_batch(1, 2, (3, 32, 32))
    with torch.no_grad():
        fp = model(images)
    prepare_(model, lambda site: UniformQuantizer(4, granularity="channel", channel_dim=0 if site.is_weight else -1))
    with torch.no_grad(), calibrating(model):
        model(images)
    seen = []

    def max_target(scales: torch.Tensor, zero_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(scales.numel())
        return scales.max(), zero_points.max().round()

    reparameterize_layernorm_(model, max_target)
    assert seen == [48] * 4
    qkv = model.blocks[0].attn.qkv.input_quantizer
    assert qkv.granularity == "tensor" and qkv.zero_point == qkv.zero_point.round()
    set_quantizers_enabled(model, False)
    with torch.no_grad():
        assert torch.allclose(model(images), fp, atol=1e-4)


# ------------------------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("softmax", ["log_sqrt2", "log2", "uniform"])
def test_recipe_quantizers(softmax: str) -> None:
    model = tiny_vit()
    images = synthetic_batch(1, 2, (3, 32, 32))
    build_method("repq_vit", BitWidth(4, 6), softmax_quantizer=softmax).quantize(model, image_calibration(images))
    quantizers = dict(named_quantizers(model))
    assert quantizers["patch_embed.proj.input_quantizer"].bits == 8
    assert quantizers["head.input_quantizer"].bits == 6 and quantizers["head.weight_quantizer"].bits == 4
    post_softmax = quantizers["blocks.0.attn.matmul2.quantizer_a"]
    assert type(post_softmax) is QUANTIZERS.get(softmax)
    assert all(q.calibrated for q in quantizers.values())
    weight = quantizers["blocks.1.mlp.fc1.weight_quantizer"]
    assert weight.granularity == "channel" and weight.scale.shape == (192, 1)


def test_unknown_softmax_quantizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="softmax_quantizer"):
        build_method("repq_vit", BitWidth(4, 4), softmax_quantizer="twin_gelu")


# ---------------------------------------------------------------------------------- official pin


def test_matches_official_code_on_tiny_vit() -> None:
    """Our RepQ-ViT reproduces every quantizer parameter and the logits of the official code (zkkli/RepQ-ViT
    @ a160561, run on this tiny ViT by oracles/repqvit_tiny.py, which drives shared/oracles/repqvit_oracle.py; see the
    fixture's ``meta``)."""
    if ranks_in_input_dtype() != FIXTURE_RANKS_IN_INPUT_DTYPE:
        pytest.skip("the fixture was made under torch 2.14 (torch.quantile ranks in double); the official code under "
                    "this torch ranks in float32 and calibrates other percentiles: regenerate it here with "
                    "oracles/repqvit_tiny.py and python -m ptq_bench.compare --write-fixture")
    fixture, meta = load_fixture("repq_vit_tiny_w4a4.npz")
    model = tiny_vit()
    batches = oracle_batches(meta)
    with torch.no_grad():
        assert torch.allclose(model(batches.eval), torch.from_numpy(fixture["logits/fp"]), atol=1e-5)
    logits = quantize_and_evaluate(build_method("repq_vit", BitWidth(meta["w_bits"], meta["a_bits"])), model, batches)
    diffs = qparam_diffs(model, fixture)
    assert len(diffs) == meta["n_qparams"]
    worst = max(diffs, key=lambda d: d.max_rel)
    assert worst.max_rel <= 1e-5, worst
    assert torch.allclose(logits, torch.from_numpy(fixture["logits/q"]), atol=1e-5)


def test_log_quantizers_pass_a_straight_through_gradient():
    """Reconstruction-based methods (DopQ-ViT, AIQViT ablations) train what feeds a log-quantized map."""
    for name in ("log2", "log_sqrt2"):
        quantizer = QUANTIZERS.get(name)(4)
        quantizer.set_scale(torch.tensor(1.0))
        x = torch.tensor([0.03, 0.2, 0.7], requires_grad=True)
        out = quantizer(x)
        out.sum().backward()
        assert torch.equal(x.grad, torch.ones(3))
        with torch.no_grad():
            assert torch.equal(out.detach(), quantizer(x.detach()))
