"""APHQ-ViT: the recipe's placement and options, the fork's searches, and pins against the official code's
calibration and whole pipeline on a tiny ViT and a tiny Swin (tests/fixtures/aphq_vit_tiny_w*a*.npz,
aphq_vit_swin_tiny_w4a4_it4.npz; GoatWu/APHQ-ViT @ 84c9fde; regenerated bit for bit by
oracles/adalog_family_tiny.py --method aphqvit, each fixture's meta ``oracle`` names the flags)."""

from __future__ import annotations

import pytest
import torch
from pins import (
    assert_weights_equal,
    calibrate_and_reconstruct,
    load_fixture,
    oracle_batches,
    quantize_and_evaluate,
    synthetic_batch,
    tiny_swin,
    tiny_vit,
)

from ptq_bench.calibration import image_calibration
from ptq_bench.compare import qparam_diffs
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.methods.adalog_search import SearchSettings
from ptq_bench.methods.aphq_vit_search import (
    PercentileConvSearch,
    UpperLowerMatMulSearch,
    bounds_grid,
)

#: the official patch-embedding input quantizer exists but never acts at qconv_a_bit = 8
UNUSED = ("patch_embed.proj.a_quantizer.",)
#: the calibration alone (no reconstruction)
CALIBRATION_ONLY = {"iters": 0, "reconstruct_mlp": False}


def test_placement_and_refusals() -> None:
    table = build_method("aphq_vit", BitWidth(4, 4)).placement()
    assert table["patch_embed"] is None
    assert {table[r].name for r in ("post_softmax", "query", "key", "value", "activation")} == {"uniform"}
    assert table["post_softmax"].options == {"granularity": "channel", "channel_dim": 1}  # per head
    assert table["post_layernorm"].options["granularity"] == "channel"
    assert build_method("aphq_vit", BitWidth(4, 8)).placement()["post_layernorm"].options["granularity"] == "tensor"
    with pytest.raises(ConfigError, match="no option.s. qconv_a_bit"):  # the patch-embedding input is always float
        build_method("aphq_vit", BitWidth(4, 4), qconv_a_bit=6)
    with pytest.raises(ConfigError, match="takes no other quantizers"):
        build_method("aphq_vit", BitWidth(4, 4), quantizers={"post_gelu": "log2"})


def test_bounds_grid_by_hand() -> None:
    """[-1, 2] at 2 bits: s = 3/3 = 1, z = -round(-1/1) = 1."""
    scale, zero_point = bounds_grid(torch.tensor([2.0]), torch.tensor([-1.0]), 4)
    assert scale.tolist() == [1.0] and zero_point.tolist() == [1.0]


def test_matmul_bounds_span_the_quantile_ranges() -> None:
    """eq_n + 1 upper bounds from the 0.99 to the 0.99999 quantile per head, lower bounds mirrored."""
    a = torch.randn(2, 3, 5, 7)
    settings = SearchSettings(eq_n=8, search_round=1, fpcs=False, steps=1, batch_size=2, memory_bytes=2**30)
    search = UpperLowerMatMulSearch(a, a.transpose(-1, -2), a @ a.transpose(-1, -2), 4, 4, settings)
    upper, lower = search.bounds(a)
    assert upper.shape == lower.shape == (9, 1, 3, 1, 1)
    head = a[:, 1].reshape(-1)
    assert torch.allclose(upper[0, 0, 1], torch.quantile(head, 0.99)) and torch.allclose(upper[-1, 0, 1], torch.quantile(head, 0.99999))
    assert torch.allclose(lower[-1, 0, 1], torch.quantile(head, 0.01)) and torch.allclose(lower[0, 0, 1], torch.quantile(head, 0.00001))


def test_conv_percentiles() -> None:
    """Upper percentiles 0.99 + 0.0099·(i/(eq_n-1))^0.5, then 1 (the maximum)."""
    conv = torch.nn.Conv2d(3, 4, 2, 2)
    settings = SearchSettings(eq_n=4, search_round=1, fpcs=False, steps=1, batch_size=2, memory_bytes=2**30)
    x = torch.randn(2, 3, 4, 4)
    upper, lower = PercentileConvSearch(conv, x, conv(x), 4, settings).bounds()
    w = conv.weight.detach().view(4, -1)
    assert upper.shape == (5, 4, 1)
    assert torch.equal(upper[-1, :, 0], w.amax(1)) and torch.equal(lower[-1, :, 0], w.amin(1))
    assert torch.allclose(upper[1, :, 0], torch.quantile(w, 0.99 + 0.0099 * (1 / 3) ** 0.5, dim=1))


def _pin(fixture_name: str, **options) -> None:
    fixture, meta = load_fixture(fixture_name)
    model = tiny_vit()
    batches = oracle_batches(meta)
    with torch.no_grad():
        assert torch.equal(model(batches.eval), torch.from_numpy(fixture["logits/fp"]))
    logits = quantize_and_evaluate(build_method("aphq_vit", BitWidth(meta["w_bits"], meta["a_bits"]), **options), model, batches)
    diffs = qparam_diffs(model, fixture, UNUSED)
    assert len(diffs) == meta["n_qparams"] - 1 == 54
    worst = max(diffs, key=lambda d: d.max_abs)
    assert worst.max_abs == 0.0, worst  # bit-exact: every scale and zero point
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


@pytest.mark.parametrize("bits", [3, 4])
def test_calibration_matches_official_code_on_tiny_vit(bits: int) -> None:
    """configs/{3,4}bit/best.py as they are (eq_n 128, 3 rounds), calibration only (``--calibrate``), 4 images."""
    _pin(f"aphq_vit_tiny_w{bits}a{bits}.npz", **CALIBRATION_ONLY)


def test_aph_loss_and_positive_quantile_by_hand() -> None:
    from ptq_bench.transforms.aph import aph_loss
    from ptq_bench.transforms.aph_mlp import positive_quantile

    out, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert aph_loss(out, target, torch.tensor([[2.0, -1.0]])).item() == (2 * 1 + 1 * 4) / 4  # |H| weights
    # positives 1..10: rank ceil(10·0.98) - 1 = 9 -> 10; ceil(10·0.5) - 1 = 4 -> 5
    x = torch.cat([torch.arange(1.0, 11.0), -torch.ones(5), torch.zeros(3)])
    assert positive_quantile(x, 0.98) == 10.0 and positive_quantile(x, 0.5) == 5.0


def test_mlp_pct_follows_the_weight_bits() -> None:
    assert build_method("aphq_vit", BitWidth(3, 3)).mlp_pct == 0.99
    assert build_method("aphq_vit", BitWidth(4, 4)).mlp_pct == 0.98


@pytest.mark.parametrize("bits", [3, 4])
def test_full_pipeline_matches_official_code_on_tiny_vit(bits: int) -> None:
    """configs/{3,4}bit/best.py (fc2 clamp percentile 0.99, 0.98) with --reconstruct-mlp (calibration on 4 images, MLP and block reconstruction on 8, 4
    steps each, the generator seeded 7 before each reconstruction as the oracle reseeds the global one): the ReLU MLPs'
    weights, all 54 quantizer tensors, every weight and bias and the quantized logits equal the official run's bit for
    bit (clamp gradient of torch <= 2.13 at the grid bounds, as the official README's torch 1.10; see test_qdrop.py)."""
    fixture, meta = load_fixture(f"aphq_vit_tiny_w{bits}a{bits}_it4.npz")
    model = tiny_vit()
    batches = oracle_batches(meta)
    method = build_method("aphq_vit", BitWidth(meta["w_bits"], meta["a_bits"]), iters=meta["iters"], mlp_iters=meta["iters"])

    def relu_mlps(model: torch.nn.Module, fp: torch.nn.Module) -> None:  # after prepare_fp_, before the calibration
        assert isinstance(model.blocks[0].mlp.act, torch.nn.ReLU) and not isinstance(fp.blocks[0].mlp.act, torch.nn.ReLU)

    logits = calibrate_and_reconstruct(method, model, batches, meta["reseed"], after_prepare=relu_mlps)
    diffs = qparam_diffs(model, fixture, UNUSED)
    assert len(diffs) == meta["n_qparams"] - 1 == 54 and max(d.max_abs for d in diffs) == 0.0
    state = model.state_dict()
    weights = [k[len("q_weight/"):] for k in fixture if k.startswith("q_weight/")]
    assert len(weights) == 30
    for name in weights:
        assert torch.equal(state[name], torch.from_numpy(fixture[f"q_weight/{name}"])), name
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


def test_full_pipeline_matches_official_code_on_tiny_swin() -> None:
    """configs/4bit/best.py with --reconstruct-mlp on the tiny Swin of test_qdrop.py with seeded_state_dict weights
    (timm's init gives logits of about 0.05, so the perturbation Hessians are about 1e-20, their squares underflow and
    the MLP reconstruction's unit-RMS scaling gives NaN weights, in the official run as in ours: a pre-norm network's
    LayerNorms cancel a shift of every element, so the Hessian is float rounding noise). Calibration on 4 images, MLP
    and block reconstruction on 8, 4 steps each, generator seeded 7 before each. The ReLU MLPs, all 106 quantizer
    tensors, all 50 changed weights and biases and the quantized logits bit-identical (the literal gradient of
    test_qdrop.py's Swin pin; the fused node left one post-Softmax scale one float step apart)."""
    fixture, meta = load_fixture("aphq_vit_swin_tiny_w4a4_it4.npz")
    model = tiny_swin(seeded=True)
    batches = oracle_batches(meta)
    with torch.no_grad():
        assert torch.equal(model(batches.eval), torch.from_numpy(fixture["logits/fp"]))
    method = build_method("aphq_vit", BitWidth(meta["w_bits"], meta["a_bits"]), iters=meta["iters"], mlp_iters=meta["iters"],
                          calib_batch_size=meta["calib_size"])  # the oracle's --calib-batch-size (test_qdrop.py)
    logits = calibrate_and_reconstruct(method, model, batches, meta["reseed"])
    diffs = qparam_diffs(model, fixture, UNUSED)
    assert len(diffs) == meta["n_qparams"] - 1 == 106 and max(d.max_abs for d in diffs) == 0.0
    assert_weights_equal(model, fixture, 50)
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


def test_underflowing_hessian_refused() -> None:
    """timm's init of the tiny Swin: MLP Hessians of about 1e-20 cannot be scaled to unit RMS in float32 (the
    official code trains NaN weights there): refused, naming the block."""
    from ptq_bench.methods.qdrop import fp_copy

    model = tiny_swin()
    fp = fp_copy(model)
    method = build_method("aphq_vit", BitWidth(4, 4), iters=1, mlp_iters=1)
    with pytest.raises(ConfigError, match="layers.0.blocks.0: the perturbation Hessian"):
        method.prepare_fp_(model, fp, image_calibration(synthetic_batch(3000, 8, (3, 32, 32))))


def test_mlp_reconstruction_alone_is_the_fp_model_inside_an_aphq_vit_run() -> None:
    """aphq_vit_mlp (the READMEs' "MLP Recon." column): ReLU MLPs retrained, nothing quantized, and the very weights
    aphq_vit's own MLP stage gives with the same options and seed (the stage the full pipeline pins above)."""
    from ptq_bench.methods.qdrop import fp_copy
    from ptq_bench.models import named_quantizers

    data = image_calibration(synthetic_batch(11, 8, (3, 32, 32)))
    options = {"batch_size": 4, "mlp_iters": 3}
    alone = tiny_vit()
    reference = {k: v.clone() for k, v in alone.state_dict().items()}
    method = build_method("aphq_vit_mlp", BitWidth(4, 4), seed=5, **options)
    assert not method.uses_bits and method.options.mlp_pct == 0.98  # configs/4bit/best.py
    alone = method.quantize(alone, data)
    assert not list(named_quantizers(alone))
    assert all(isinstance(block.mlp.act, torch.nn.ReLU) for block in alone.blocks)
    record = method.transforms[0]
    assert record["mlps"] == len(alone.blocks) and all(loss == loss for loss in record["final_losses"])

    staged = tiny_vit()
    build_method("aphq_vit", BitWidth(4, 4), seed=5, **options).prepare_fp_(staged, fp_copy(staged), data)
    changed = 0
    for key, value in staged.state_dict().items():
        assert torch.equal(alone.state_dict()[key], value), key
        changed += not torch.equal(value, reference[key])
    assert changed == 4 * len(alone.blocks)  # fc1 and fc2, weight and bias, of every block
    with pytest.raises(ConfigError, match="option mlp_pct must be in"):
        build_method("aphq_vit_mlp", BitWidth(4, 4), mlp_pct=0)
