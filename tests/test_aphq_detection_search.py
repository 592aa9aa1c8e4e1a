"""APHQ-ViT's detection-fork searches (ptq_bench/methods/aphq_vit_detection_search.py) against the fork's own layer
classes (GoatWu/APHQ-ViT @ 84c9fde, Object-Detection/tools/quant_layers/{linear,conv,matmul}.py) on the same seeded
tensors: tests/fixtures/aphq_det_layers_w4a4.npz, made by oracles/aphq_detection_layers.py (its meta names the
command; oracles/check_fixtures.py re-makes it bit for bit). Every scale and zero point must be equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pins import load_fixture
from torch import nn

from ptq_bench.methods.adalog import _reparameterize
from ptq_bench.methods.adalog_search import SearchSettings
from ptq_bench.methods.aphq_vit_detection_search import (
    LINEAR_CHUNK,
    DetectionConvSearch,
    DetectionLinearSearch,
    DetectionMatMulSearch,
    percentile_steps,
)
from ptq_bench.quant.layers import QuantLinear

W_BITS = A_BITS = 4


@pytest.fixture(scope="module")
def fixture() -> dict[str, np.ndarray]:
    arrays, meta = load_fixture("aphq_det_layers_w4a4.npz")
    assert meta["oracle"].startswith("oracles/aphq_detection_layers.py") and meta["calib_batch_size"] == 1
    return arrays


def _t(fixture: dict[str, np.ndarray], key: str) -> torch.Tensor:
    return torch.from_numpy(fixture[key].copy())


def _settings(fixture: dict[str, np.ndarray]) -> SearchSettings:
    """quant_configs/4bit.py's values (calib_batch_size 1) and the oracle's fake device memory."""
    return SearchSettings(eq_n=int(fixture["eq_n"]), search_round=3, fpcs=False, steps=1, batch_size=1,
                          memory_bytes=int(fixture["memory_bytes"]))


def _assert_equal(fixture: dict[str, np.ndarray], got: dict[str, torch.Tensor]) -> None:
    for key, value in got.items():
        want = _t(fixture, key)
        assert value.shape == want.shape and value.dtype == want.dtype, key
        assert torch.equal(value, want), f"{key}: max diff {(value - want).abs().max().item():.3g}"


def _linear_search(fixture: dict[str, np.ndarray], name: str, **kwargs) -> DetectionLinearSearch:
    bias = _t(fixture, f"{name}/bias")
    return DetectionLinearSearch(_t(fixture, f"{name}/weight"), bias, _t(fixture, f"{name}/x"), _t(fixture, f"{name}/out"),
                                 W_BITS, A_BITS, _settings(fixture), **kwargs)


@pytest.mark.parametrize("name", ["proj", "roi", "fc2"])
def test_per_tensor_linear_is_official(fixture: dict[str, np.ndarray], name: str) -> None:
    """``AsymmetricallyBatchingQuantLinear.hyperparameter_searching`` (fc2 with post_relu, which it ignores)."""
    search = _linear_search(fixture, name, post_relu=name == "fc2")
    search.search()
    _assert_equal(fixture, {f"{name}/w_scale": search.w_scale, f"{name}/w_zp": search.w_zp,
                            f"{name}/a_scale": search.a_scale, f"{name}/a_zp": search.a_zp})


def test_channel_wise_linear_and_fold_are_official(fixture: dict[str, np.ndarray]) -> None:
    """qkv: the per-channel input search, the fold into a real LayerNorm by adalog._reparameterize (the lead's
    driver) and the per-tensor search on the folded layer: as the official ``hyperparameter_searching`` + ``reparam``."""
    norm = nn.LayerNorm(96)
    norm.weight.data, norm.bias.data = _t(fixture, "qkv/norm_weight"), _t(fixture, "qkv/norm_bias")
    layer = nn.Linear(96, 288)
    layer.weight.data, layer.bias.data = _t(fixture, "qkv/weight"), _t(fixture, "qkv/bias")
    layer = QuantLinear.convert_(layer, None, None)
    x = norm(_t(fixture, "qkv/x0")).detach()
    assert torch.equal(x, _t(fixture, "qkv/x"))
    search = DetectionLinearSearch(layer.weight.detach(), layer.bias.detach(), x, _t(fixture, "qkv/out"), W_BITS, A_BITS,
                                   _settings(fixture), n_v=3, channel_wise=True)
    search.search_channel_wise()
    _assert_equal(fixture, {"qkv/channel/a_scale": search.a_scale, "qkv/channel/a_zp": search.a_zp})
    with torch.no_grad():
        _reparameterize(search, layer, norm)
    search.search()
    _assert_equal(fixture, {"qkv/folded_norm_weight": norm.weight.data, "qkv/folded_norm_bias": norm.bias.data,
                            "qkv/folded_weight": layer.weight.data, "qkv/folded_bias": layer.bias.data,
                            "qkv/w_scale": search.w_scale, "qkv/w_zp": search.w_zp,
                            "qkv/a_scale": search.a_scale, "qkv/a_zp": search.a_zp})


def test_channel_wise_post_relu_is_official(fixture: dict[str, np.ndarray]) -> None:
    """The channel-wise search with post_relu (``fix_zp_zero``): zero points 0, eq_n scales per channel."""
    search = _linear_search(fixture, "fc2", channel_wise=True, post_relu=True)
    search.search_channel_wise()
    _assert_equal(fixture, {"cw_relu/a_scale": search.a_scale, "cw_relu/a_zp": search.a_zp})
    assert not search.a_zp.any()


def _conv(fixture: dict[str, np.ndarray], name: str, calls: int, a_bits: int) -> DetectionConvSearch:
    weight = _t(fixture, f"{name}/weight")
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], stride=4 if name == "patch" else 1,
                     padding=1 if name == "rpn" else 0)
    conv.weight.data, conv.bias.data = weight, _t(fixture, f"{name}/bias")
    xs = [_t(fixture, f"{name}/x{i}") for i in range(calls)]
    outs = [_t(fixture, f"{name}/out{i}") for i in range(calls)]
    assert all(torch.equal(conv(x), y) for x, y in zip(xs, outs))
    return DetectionConvSearch(conv, xs, outs, W_BITS, a_bits, _settings(fixture))


def test_rpn_conv_over_its_calls_is_official(fixture: dict[str, np.ndarray]) -> None:
    """A conv called on three FPN levels: weight and per-tensor input grids as the official conv's."""
    search = _conv(fixture, "rpn", 3, A_BITS)
    assert search.input_quantized and 1 < search.par < search.eq_n  # several candidate chunks
    search.search()
    _assert_equal(fixture, {"rpn/w_scale": search.w_scale, "rpn/w_zp": search.w_zp,
                            "rpn/a_scale": search.a_scale, "rpn/a_zp": search.a_zp})


def test_patch_embed_conv_leaves_its_input_float(fixture: dict[str, np.ndarray]) -> None:
    """a_bit = 8: the official conv searches no input grid and passes its input through; so do we."""
    assert not fixture["patch/input_quantized"] and fixture["patch/input_passthrough"]
    search = _conv(fixture, "patch", 1, 8)
    search.search()
    assert not search.input_quantized and search.a_scale is None and search.a_zp is None
    _assert_equal(fixture, {"patch/w_scale": search.w_scale, "patch/w_zp": search.w_zp})


@pytest.mark.parametrize("name", ["matmul1", "matmul2"])
def test_window_attention_matmuls_are_official(fixture: dict[str, np.ndarray], name: str) -> None:
    """(windows, heads, N, d) operands, per-head grids, one window per similarity batch (calib_batch_size 1)."""
    search = DetectionMatMulSearch(_t(fixture, f"{name}/a"), _t(fixture, f"{name}/b"), _t(fixture, f"{name}/out"),
                                   A_BITS, A_BITS, _settings(fixture))
    assert 1 < search.par < search.eq_n
    search.search()
    _assert_equal(fixture, {f"{name}/a_scale": search.a_scale, f"{name}/a_zp": search.a_zp,
                            f"{name}/b_scale": search.b_scale, f"{name}/b_zp": search.b_zp})


# ------------------------------------------------------------------------------------------------ formulas


def test_linear_candidate_bounds_are_the_0999_quantiles() -> None:
    """The first weight and input candidates span the 0.999 to 0.001 quantile, the last min to max; chunks of 8."""
    g = torch.Generator().manual_seed(1)
    weight, x = torch.randn(6, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    settings = SearchSettings(eq_n=16, search_round=3, fpcs=False, steps=1, batch_size=1, memory_bytes=2**30)
    search = DetectionLinearSearch(weight, None, x, x @ weight.t(), 2, 2, settings)
    search.search()
    assert search.par == LINEAR_CHUNK
    scales, zps = search.weight_candidates()
    span = torch.quantile(weight, 0.999, dim=-1) - torch.quantile(weight, 0.001, dim=-1)
    torch.testing.assert_close(scales[0].reshape(-1), span / 3)
    torch.testing.assert_close(scales[3].reshape(-1), (weight.amax(-1) - weight.amin(-1)) / 3)
    assert zps[:, 0, 0, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4  # min(16, 2·2^(w-1)) zero points
    a_scales, a_zps = search.input_candidates()
    assert a_scales.shape == (1, 17) and a_scales[0, -1] == a_scales[0, -2] and a_zps[0, -1] == a_zps[0, -2]
    torch.testing.assert_close(a_scales[0, 0], (torch.quantile(x.reshape(-1), 0.999) - torch.quantile(x.reshape(-1), 0.001)) / 3)
    relu_scales, relu_zps = search.input_candidates(fix_zp_zero=True)
    assert relu_scales.shape == (1, 17) and not relu_zps.any()


def test_input_search_scores_the_first_row_only() -> None:
    """calib_size = 1: rows after the first change the candidates (quantiles of all rows) but not the scores."""
    g = torch.Generator().manual_seed(2)
    weight, x = torch.randn(4, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    settings = SearchSettings(eq_n=16, search_round=3, fpcs=False, steps=1, batch_size=1, memory_bytes=2**30)
    full = DetectionLinearSearch(weight, None, x, x @ weight.t(), 4, 4, settings)
    scales, zps = full.input_candidates()
    first = DetectionLinearSearch(weight, None, x[:1], x[:1] @ weight.t(), 4, 4, settings)
    assert torch.equal(full.a_self(scales, zps), first.a_self(scales, zps))


def test_matmul_bounds_are_quantiles_at_the_official_percentiles() -> None:
    """eq_n + 1 upper bounds: the per-head quantiles at 0.999 + 0.00099·(i/(eq_n-1))^0.1 and 1 (the maximum)."""
    pct = percentile_steps(8, 0.999, 0.99999, 0.1)
    assert pct[0].item() == pytest.approx(0.999) and pct[7].item() == pytest.approx(0.99999) and pct[8] == 1.0
    a = torch.randn(2, 3, 5, 7)
    settings = SearchSettings(eq_n=8, search_round=1, fpcs=False, steps=1, batch_size=1, memory_bytes=2**30)
    upper, lower = DetectionMatMulSearch(a, a.transpose(-2, -1), a @ a.transpose(-2, -1), 4, 4, settings).bounds(a)
    assert upper.shape == lower.shape == (9, 1, 3, 1, 1)
    per_head = a.transpose(0, 1).reshape(3, -1)
    assert torch.equal(upper[-1].reshape(-1), per_head.amax(-1)) and torch.equal(lower[-1].reshape(-1), per_head.amin(-1))
    torch.testing.assert_close(upper[3].reshape(-1), torch.quantile(per_head, pct[3].item(), dim=-1))
