"""AdaLog: the adaptive-base log grid by hand, the shifted post-GELU variant and its bias fold, the recipe's
placement and options, and pins against the official code's output on a tiny ViT (tests/fixtures/adalog_tiny_*.npz;
regenerated bit for bit by oracles/adalog_family_tiny.py --method adalog, each fixture's meta ``oracle`` names the flags)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pins import load_fixture, oracle_batches, quantize_and_evaluate, synthetic_batch, tiny_swin, tiny_vit
from torch import nn

from ptq_bench.calibration import image_calibration
from ptq_bench.compare import IGNORED_QPARAMS, qparam_diffs, weight_diffs
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.models import named_quantizers
from ptq_bench.quant import QUANTIZERS
from ptq_bench.quant.adalog import (
    AdaLogQuantizer,
    ShiftAdaLogQuantizer,
    adalog_dequant,
    adalog_tables,
    fold_shift_into_bias_,
)
from ptq_bench.quant.layers import QuantLinear
from ptq_bench.quant.log import Log2Quantizer
from ptq_bench.quant.uniform import UniformQuantizer

GELU_MIN = 0.16997124254703522


def adalog(bits: int, scale: float, q: int, cls: type = AdaLogQuantizer, **options) -> AdaLogQuantizer:
    quantizer = cls(bits, **options)
    quantizer.set_params(torch.tensor(scale), q)
    return quantizer


# ---------------------------------------------------------------------------------------------- grid by hand


def test_tables_by_hand_for_q16_r37_4bit() -> None:
    """T1[e] = floor(16e/37), T2[e] = round(2^(-(16e mod 37)/37)·30)/30 (4·2^3 - 2 = 30)."""
    t1, t2 = adalog_tables(4, 16)
    assert t1[:4].tolist() == [0.0, 0.0, 0.0, 1.0]
    # e=1: 2^(-16/37) = 0.7405 -> 22/30; e=2: 2^(-32/37) = 0.5495 -> 16/30; e=3: 48 = 37+11, 2^(-11/37) = 0.8138 -> 24/30
    assert torch.equal(t2[:4], torch.tensor([1.0, 22 / 30, 16 / 30, 24 / 30], dtype=torch.float32))
    assert t1[15].item() == math.floor(15 * 16 / 37) == 6


def test_levels_by_hand() -> None:
    quantizer = adalog(4, 2.0, 16)
    levels = 2.0 * torch.tensor([1.0, 22 / 30, 16 / 30, 0.5 * 24 / 30])
    assert torch.equal(quantizer(levels), levels)  # a level maps to itself
    # x/s = 0.35: -log2(0.35)·37/16 = 3.50... -> code 4 (48 -> 64 = 37+27: 2^-1·round(2^(-27/37)·30)/30 = 0.5·18/30)
    code = round(-math.log2(0.35) * 37 / 16)
    assert code == 4
    assert torch.equal(quantizer(torch.tensor([0.7])), torch.tensor([2.0 * 0.5 * 18 / 30]))
    # above s: code 0 (the top level s); zero and values below the grid (code >= 16): 0
    assert quantizer(torch.tensor([5.0, 0.0, 2.0 * 2.0 ** (-16 * 16 / 37 - 1)])).tolist() == [2.0, 0.0, 0.0]


def test_q_equal_r_is_log2() -> None:
    x = torch.rand(1000) * 3
    log2 = Log2Quantizer(4)
    log2.set_scale(torch.tensor(2.5))
    assert torch.equal(adalog(4, 2.5, 37)(x), log2(x))


def test_table_path_equals_the_official_forward() -> None:
    quantizer = adalog(3, 0.9, 23)
    x = torch.rand(4096) * 1.2
    official = adalog_dequant(x, quantizer.scale.reshape(1), quantizer.q.reshape(1), 37.0, 3, quantizer.table1, quantizer.table2)
    assert torch.equal(quantizer(x), official)


def test_export_is_the_level_table() -> None:
    grid = adalog(4, 1.5, 20).export()
    assert grid.kind == "non_uniform" and grid.bits == 4
    assert grid.levels.numel() == 17 and grid.levels[0] == 0 and grid.levels[-1] == 1.5
    assert torch.all(grid.levels[1:] >= grid.levels[:-1])


def test_straight_through_gradient_and_learnable_scale() -> None:
    quantizer = adalog(4, 1.0, 30)
    x = (torch.rand(64) * 0.9 + 0.05).requires_grad_()
    y = quantizer(x)  # the official training path: 2^(-e·q/r)·s with the code e rounded straight-through
    y.sum().backward()
    expected = (y / x).detach()  # d(2^(log2(x/s)·(rounded/unrounded))·s)/dx = ŷ/x; 0 below the grid
    assert torch.allclose(y.detach(), quantizer(x.detach()), rtol=0, atol=1 / 60)  # the table rounds T2 to 1/30
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=0) and expected.gt(0).any()
    assert quantizer.learnable_parameters() == {"scale": "range"}


def test_lazy_calibration_picks_a_q_in_range() -> None:
    quantizer = AdaLogQuantizer(4)
    quantizer.calibrating = True
    quantizer(torch.softmax(torch.randn(8, 50), dim=-1))
    assert quantizer.calibrated and 10 <= int(quantizer.q) <= 137


# ---------------------------------------------------------------------------------------------- shift variant


def test_shift_variant_and_bias_fold() -> None:
    quantizer = adalog(4, 3.0, 12, ShiftAdaLogQuantizer)
    x = torch.nn.functional.gelu(torch.randn(4, 10, 16) * 2)
    assert torch.equal(quantizer(x), adalog(4, 3.0, 12)(x + torch.tensor([GELU_MIN])) - torch.tensor([GELU_MIN]))
    assert (quantizer(x) < 0).any()  # GELU's negative values stay on the grid

    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    weight_quantizer = UniformQuantizer(4, granularity="channel", channel_dim=0)
    weight_quantizer.set_params(linear.weight.detach().abs().amax(1, keepdim=True) / 7, torch.full((8, 1), 8.0))
    layer = QuantLinear.convert_(linear, weight_quantizer, quantizer)
    before = layer(x)
    fold_shift_into_bias_(layer)
    assert bool(quantizer.bias_reparamed)
    assert torch.allclose(layer(x), before, atol=1e-5)  # -η·Ŵ moved from the input into the bias


def test_capabilities_and_registry() -> None:
    assert QUANTIZERS.get("adalog").capabilities == {"post_softmax", "log_domain"}
    assert QUANTIZERS.get("adalog_shift").capabilities == {"post_gelu", "log_domain"}
    with pytest.raises(ConfigError, match="cannot quantize post_gelu tensors"):  # it would zero every negative value
        build_method("minmax", BitWidth(4, 4), quantizers={"post_gelu": "adalog"})
    method = build_method("minmax", BitWidth(4, 4), quantizers={"post_softmax": "adalog"})
    assert method.quantizer_table()["post_softmax"].name == "adalog"
    with pytest.raises(ConfigError, match="post_softmax"):
        build_method("minmax", BitWidth(4, 4), quantizers={"post_softmax": "adalog_shift"})


# ---------------------------------------------------------------------------------------------- recipe


def test_recipe_options_and_refusals() -> None:
    with pytest.raises(ConfigError, match="takes no other quantizers"):
        build_method("adalog", BitWidth(4, 4), quantizers={"post_gelu": "uniform"})
    with pytest.raises(ConfigError, match="no option.s. qconv_a_bit"):  # the patch-embedding input is always float
        build_method("adalog", BitWidth(4, 4), qconv_a_bit=6)
    table = build_method("adalog", BitWidth(4, 4)).placement()
    assert table["patch_embed"] is None and table["post_softmax"].name == "adalog"
    assert table["post_layernorm"].options["granularity"] == "channel"
    # w != a: the official code does not reparameterize (wrap_net.py: cur_a_bit == cfg.w_bit)
    assert build_method("adalog", BitWidth(4, 8)).placement()["post_layernorm"].options["granularity"] == "tensor"


FAST = {"eq_n": 64, "search_round": 1, "steps": 3}


def test_w4a8_runs_without_reparameterization() -> None:
    model = tiny_vit()
    norm_weight = model.blocks[0].norm1.weight.detach().clone()
    calib = synthetic_batch(1000, 4, (3, 32, 32))
    with torch.no_grad():
        build_method("adalog", BitWidth(4, 8), **FAST).quantize(model, image_calibration(calib))
        logits = model(synthetic_batch(2000, 2, (3, 32, 32)))
    assert torch.equal(model.blocks[0].norm1.weight, norm_weight)
    assert torch.isfinite(logits).all()
    assert all(q.calibrated for _, q in named_quantizers(model))


# ---------------------------------------------------------------------------------------------- official pin


def _pin(fixture_name: str, **options) -> None:
    fixture, meta = load_fixture(fixture_name)
    assert meta["options"] == options
    model = tiny_vit()
    batches = oracle_batches(meta)
    with torch.no_grad():
        assert torch.equal(model(batches.eval), torch.from_numpy(fixture["logits/fp"]))
    logits = quantize_and_evaluate(build_method("adalog", BitWidth(meta["w_bits"], meta["a_bits"]), **options), model, batches)
    diffs = qparam_diffs(model, fixture, IGNORED_QPARAMS["adalog"])
    assert len(diffs) == meta["n_qparams"] - 1  # all but the unused 8-bit patch-embedding input quantizer
    worst = max(diffs, key=lambda d: d.max_abs)
    assert worst.max_abs == 0.0, worst  # bit-exact: scales, zero points, q, tables, shift
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_matches_official_code_on_tiny_vit_fast_config(bits: int) -> None:
    """Every quantizer parameter and the quantized logits equal the official code's (GoatWu/AdaLog @ 75a57d2, via
    oracles/adalog_family_tiny.py --method adalog --w-bits B --a-bits B --cfg eq_n=64,search_round=1,steps=3: on this
    tiny ViT, configs/{3,4,6}bit.py changed to eq_n 64, one search round, 3 FPCS steps: the same code paths at a sixth
    of the cost)."""
    _pin(f"adalog_tiny_w{bits}a{bits}_fast.npz", **FAST)


def test_matches_official_code_with_weights_and_activations_apart() -> None:
    """W4/A6: no post-LayerNorm reparameterization (the official code applies it only when w = a), every other
    search at its own bit-width; equal to the official run with s_bit and qhead_a_bit set to the activation bits
    (the official CLI's --a_bit leaves both at the config file's value)."""
    _pin("adalog_tiny_w4a6_fast.npz", **FAST)


def test_swin_agrees_with_official_code() -> None:
    """A tiny Swin (windows, shifted windows, patch merging; q scaled before Q·Kᵀ as the official Swin attention
    does) against the official run: FP logits, all 130 quantizer tensors and the quantized logits identical. The
    calibration batch size is the oracle's (its calibration size): the searches score candidates over slices of that
    size along dim 0, which on Swin's window attention are windows (4 images × 16), so another size sums in another
    order and flips near-ties (19 tensors one or two float steps apart at 32)."""
    fixture, meta = load_fixture("adalog_swin_tiny_w4a4_fast.npz")
    model = tiny_swin()
    batches = oracle_batches(meta)
    with torch.no_grad():
        assert torch.equal(model(batches.eval), torch.from_numpy(fixture["logits/fp"]))
    logits = quantize_and_evaluate(build_method("adalog", BitWidth(4, 4), **FAST, calib_batch_size=meta["calib_size"]), model, batches)
    diffs = qparam_diffs(model, fixture, IGNORED_QPARAMS["adalog"])
    assert len(diffs) == meta["n_qparams"] - 1 == 130 and max(d.max_abs for d in diffs) == 0.0
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


def test_chunking_moves_near_ties_only() -> None:
    """Another search memory splits the candidate stacks into other chunks: the scores' float summation changes, so
    near-tied candidates may rank differently, but only in the last bits (hence search_memory_gb is an option of
    the run's identity, and 8, the oracle's fake device, is the bit-exact setting)."""
    fixture, meta = load_fixture("adalog_tiny_w4a4_fast.npz")
    model = tiny_vit()
    batches = oracle_batches(meta)
    logits = quantize_and_evaluate(build_method("adalog", BitWidth(4, 4), **FAST, search_memory_gb=0.02), model, batches)
    worst = max(qparam_diffs(model, fixture, IGNORED_QPARAMS["adalog"]), key=lambda d: d.max_rel)
    assert worst.max_rel < 1e-5, worst
    assert torch.allclose(logits, torch.from_numpy(fixture["logits/q"]), atol=1e-3)


@pytest.mark.slow
def test_matches_official_code_on_tiny_vit_paper_config() -> None:
    """The same pin with configs/4bit.py as it is (eq_n 128, 3 rounds, 6 FPCS steps; 8 calibration images)."""
    _pin("adalog_tiny_w4a4.npz")


def test_weight_diffs_skip_quantizer_tensors() -> None:
    arrays = {"q_weight/head.weight": np.zeros((2, 2), np.float32), "q_weight/x.a_quantizer.q": np.zeros(1, np.float32),
              "qparam/x.a_quantizer.q": np.zeros(1, np.float32)}
    model = nn.Module()
    model.head = nn.Linear(2, 2)
    nn.init.zeros_(model.head.weight)
    assert [d.official for d in weight_diffs(model, arrays)] == ["head.weight"]


# ---------------------------------------------------------------------------------------------- optimize ("Retrain")


def test_optimize_options_enter_the_run_key_only_when_on() -> None:
    off = build_method("adalog", BitWidth(4, 4))
    assert not {"optimize", "iters", "optim_size", "lr_act"} & set(off.identity())  # earlier runs' keys unchanged
    assert off.calibration_size(32) == 32 and "blocks" not in off.needs()
    on = build_method("adalog", BitWidth(4, 4), optimize=True)
    assert on.identity()["optimize"] is True and on.identity()["iters"] == 20000 and on.identity()["optim_size"] == 1024
    assert on.calibration_size(32) == 32 + 1024 and "blocks" in on.needs()  # the search set, then the reconstruction set
    with pytest.raises(ConfigError, match="warmup"):
        build_method("adalog", BitWidth(4, 4), optimize=True, warmup=1.0)


def test_optimized_records_take_the_retrain_column() -> None:
    from ptq_bench.results.published import load_published, method_alias, published_value

    assert method_alias("adalog")[0] == method_alias({"name": "adalog"})[0] == "AdaLog (calibration only)"
    assert method_alias({"name": "adalog", "optimize": True})[0] == "AdaLog + BRECQ-style block recon ('Retrain')"
    table = load_published()
    assert published_value(table, "classification", "top1", {"name": "adalog"}, "DeiT-T", 3, 3)[0] == pytest.approx(31.56)
    assert published_value(table, "classification", "top1", {"name": "adalog", "optimize": True}, "DeiT-T", 3, 3)[0] == pytest.approx(48.78)


def test_optimize_agrees_with_official_code_on_tiny_vit() -> None:
    """configs/4bit.py (FAST: 64 candidates, 1 round, 3 FPCS steps) with --optimize: calibration on 4 images, reconstruction on 8
    others, 6 steps per unit (the regularizer from the second on), the generator seeded 7 before the reconstruction
    as the oracle reseeds the global one; the official run used the clamp gradient of torch <= 2.13 (its README's 1.10).
    Every weight the reconstruction and the folds wrote (AdaRound's hard rounding, the shift folded into fc2's bias
    after it), all 66 quantizer tensors and the quantized logits are identical (the uniform step sizes train through
    the literal expression, ``official_gradients``; with the fused straight-through node 7 learned scales were up to
    2e-5 relative apart)."""
    fixture, meta = load_fixture("adalog_tiny_w4a4_opt.npz")
    model = tiny_vit()
    batches = oracle_batches(meta)
    method = build_method("adalog", BitWidth(4, 4), **meta["options"], optimize=True, iters=meta["iters"],
                          optim_size=meta["optim_size"])
    # the method's own order on the fixture's two sets (FP copy, search, reconstruction, shift fold), the oracle's seed
    method.retrain_ = lambda m, fp, data, generator=None, _orig=method.retrain_: _orig(  # type: ignore[method-assign]
        m, fp, data, torch.Generator().manual_seed(meta["reseed"]))
    method.quantize(model, image_calibration(torch.cat([batches.calib, batches.optim])))
    with torch.no_grad():
        logits = model(batches.eval)
    diffs = qparam_diffs(model, fixture, IGNORED_QPARAMS["adalog"])
    assert len(diffs) == meta["n_qparams"] - 1 == 66 and max(d.max_abs for d in diffs) == 0.0
    weights = weight_diffs(model, fixture)
    assert len(weights) == 32 and max(d.max_abs for d in weights) == 0.0
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))
