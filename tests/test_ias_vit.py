"""I&S-ViT: its quantizer table, reconstruction units and loss, refusals, and pins of the whole three-stage pipeline
against the official code on the tiny ViT (tests/fixtures/ias_vit_tiny_*.npz, made by oracles/ias_oracle.py from
zysxmu/IaS-ViT @ 9300cea, with the global generator reseeded before every unit; the fixture's meta ``oracle`` names the
command, oracles/check_fixtures.py re-makes and checks it)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from pins import load_fixture, oracle_batches, synthetic_batch, tiny_swin, tiny_vit
from timm.models.swin_transformer import SwinTransformer

from ptq_bench.calibration import image_calibration
from ptq_bench.compare import qparam_diffs
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.methods.options import method_defaults
from ptq_bench.quant.observers import ranks_in_input_dtype
from ptq_bench.quant.sulq import SulqQuantizer
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.block_capture import BlockInputs
from ptq_bench.transforms.sos import (
    lp_loss,
    reconstruction_units,
    trainable_parameters,
    unit_loss,
)


def _torch_as_the_fixtures() -> bool:
    """The fixtures were made under torch 2.14: torch.quantile ranks in double, and clamp's gradient is 0 at scalar
    bounds (both enter the official run and ours alike)."""
    x = torch.zeros(1, requires_grad=True)
    torch.clamp(x, 0, 1).sum().backward()
    return not ranks_in_input_dtype() and x.grad.item() == 0.0


def _run(name: str, model: torch.nn.Module | None = None) -> tuple[dict[str, np.ndarray], dict, torch.nn.Module, torch.Tensor]:
    """The fixture, its meta, and our model (default the tiny ViT) quantized as the oracle run was (same images,
    iterations, batch, seed)."""
    if not _torch_as_the_fixtures():
        pytest.skip("the fixtures were made under torch 2.14; regenerate them with oracles/ias_oracle.py "
                    "(the command is in each fixture's meta 'oracle')")
    fixture, meta = load_fixture(name)
    model = tiny_vit() if model is None else model
    batches = oracle_batches(meta)
    if model.__class__.__name__ == "SwinTransformer":  # timm 1.x's ViT attention is fused: 1e-7 apart, not equal
        with torch.no_grad():
            assert torch.equal(model(batches.eval), torch.from_numpy(fixture["logits/fp"]))
    method = build_method("ias_vit", BitWidth(meta["w_bits"], meta["a_bits"]), seed=meta["reseed"], iters=meta["iters"],
                          batch_size=meta["batch_size"])
    method.quantize(model, image_calibration(batches.calib))
    with torch.no_grad():
        logits = model(batches.eval)
    return fixture, meta, model, logits


def test_quantizer_table() -> None:
    table = build_method("ias_vit", BitWidth(4, 4)).quantizer_table()
    assert table["post_softmax"].name == "sulq" and table["patch_embed"] is None
    assert table["weight"].options == {"granularity": "channel", "channel_dim": 0, "observer": "ias_weight"}
    assert table["post_layernorm"].options["granularity"] == "channel"


def test_units_are_the_official_ones_in_forward_order() -> None:
    model = tiny_vit()
    assert [name for name, _ in reconstruction_units(model)] == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]
    block = model.blocks[0]
    trained = {id(p) for p in trainable_parameters(block)}
    assert not any(id(p) in trained for p in (*block.norm1.parameters(), *block.norm2.parameters()))
    assert len(trained) == 8  # qkv, proj, fc1, fc2: weight and bias


def test_swin_reductions_are_units_quantized_per_tensor_and_not_folded() -> None:
    """quant_model.py puts per-channel input quantizers on qkv and fc1 only, and stage 2 folds norm1/norm2 only."""
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                            num_classes=10).eval()
    assert [name for name, _ in reconstruction_units(model)] == [
        "patch_embed.proj", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample.reduction", "layers.1.blocks.0",
        "layers.1.blocks.1", "head.fc"]
    method = build_method("ias_vit", BitWidth(4, 4), iters=1, batch_size=4, init_size=4)
    method.quantize(model, image_calibration(synthetic_batch(0, 4, (3, 32, 32))))
    reduction = model.layers[1].downsample.reduction.input_quantizer
    assert reduction.granularity == "tensor" and reduction.observer_name == "percentile"
    folded = method.transforms[0]["folded"]
    assert len(folded) == 8 and not any("downsample" in pair for pair in folded)


def test_lp_loss_sums_over_dim_1() -> None:
    assert lp_loss(torch.ones(2, 3, 4), torch.zeros(2, 3, 4)).item() == 3.0


def test_unit_loss_weighs_groups_of_detector_samples() -> None:
    """Samples of different sizes (a detector's): each group's lp_loss weighted by its samples."""
    linear = torch.nn.Linear(2, 2)
    xs = [torch.randn(1, 3, 2), torch.randn(1, 5, 2), torch.randn(1, 3, 2)]
    inputs = BlockInputs(xs, [()] * 3)
    targets = BlockInputs([torch.zeros(1, 3, 2), torch.zeros(1, 5, 2), torch.zeros(1, 3, 2)], [()] * 3)
    with torch.no_grad():
        expected = (lp_loss(linear(torch.cat([xs[0], xs[2]])), torch.zeros(2, 3, 2)) * 2 + lp_loss(linear(xs[1]), torch.zeros(1, 5, 2))) / 3
        assert torch.allclose(unit_loss(linear, inputs, targets), expected)


def test_literal_gradient_is_the_official_expression() -> None:
    """∂/∂x of (clamp(round_ste(x/s) + z) − z)·s through autograd: (g·s)·m/s, not g·m (they differ in rounding)."""
    q = UniformQuantizer(4)
    q.set_params(torch.tensor(0.37), torch.tensor(3.0))
    x = torch.linspace(-2, 5, 101, requires_grad=True)
    g = torch.randn(101, generator=torch.Generator().manual_seed(0))
    q.literal_gradient = True
    q(x).backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    r = x2 / q.scale
    t = (r.round() - r).detach() + r + q.zero_point  # the official round_ste
    ((torch.clamp(t, 0, 15) - q.zero_point) * q.scale).backward(g)
    assert torch.equal(x.grad, x2.grad)
    q.literal_gradient = False
    x3 = x.detach().clone().requires_grad_(True)
    q(x3).backward(g)
    assert not torch.equal(x3.grad, x2.grad)  # ptq_bench/quant/ste.py's fused node: g·m, and inclusive bounds


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="lr"):
        build_method("ias_vit", BitWidth(4, 4), lr=0.0)
    with pytest.raises(ConfigError, match="batch_size 64"):
        build_method("ias_vit", BitWidth(4, 4)).quantize(tiny_vit(), image_calibration(synthetic_batch(0, 8, (3, 32, 32))))


def test_smoke_budget_caps_fit_its_images() -> None:
    """budget=smoke caps calib_size, init_size, batch_size and iters: the capped run trains on its 32 images."""
    caps = OmegaConf.load(REPO / "conf" / "budget" / "smoke.yaml").caps
    defaults = method_defaults("ias_vit")
    capped = {k: min(v, caps[k]) for k, v in defaults.items() if k in caps and isinstance(v, int)}
    assert capped == {"calib_size": 32, "init_size": 32, "batch_size": 32, "iters": 20}
    method = build_method("ias_vit", BitWidth(4, 4), **{k: v for k, v in capped.items() if k != "calib_size"})
    model = method.quantize(tiny_vit(), image_calibration(synthetic_batch(0, capped["calib_size"], (3, 32, 32))))
    assert all(q.calibrated for q in model.modules() if isinstance(q, UniformQuantizer))


def test_pipeline_matches_official_code_w4a4() -> None:
    """8 images in batches of 4, 4 steps per unit and stage: all 56 quantizer tensors (the SULQ shift and log2 range
    included), the 32 final weights, biases and LayerNorm affines (sha256 of their bytes) and the quantized logits
    equal the official run's bit for bit."""
    fixture, meta, model, logits = _run("ias_vit_tiny_w4a4_it4.npz")
    diffs = qparam_diffs(model, fixture)
    assert len(diffs) == meta["n_qparams"] == 56 and max(d.max_abs for d in diffs) == 0.0
    assert any(d.ours.endswith("matmul2.quantizer_a.shift") for d in diffs)
    digests = json.loads(str(fixture["q_weight_sha256"]))
    state = model.state_dict()
    assert len(digests) == 32
    for name, digest in digests.items():
        assert hashlib.sha256(state[name].contiguous().numpy().tobytes()).hexdigest() == digest, name
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))
    assert isinstance(model.blocks[0].attn.matmul2.quantizer_a, SulqQuantizer)
    assert model.blocks[0].attn.qkv.input_quantizer.granularity == "tensor"  # folded by the reparameterization


def test_pipeline_matches_official_code_w3a3() -> None:
    """W3A3, 8 steps per unit and stage: quantizer tensors and quantized logits bit for bit."""
    fixture, meta, model, logits = _run("ias_vit_tiny_w3a3_it8.npz")
    diffs = qparam_diffs(model, fixture)
    assert len(diffs) == meta["n_qparams"] == 56 and max(d.max_abs for d in diffs) == 0.0
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


def test_pipeline_matches_official_code_on_swin() -> None:
    """The tiny Swin (tests/pins.py TINY_SWIN, seeded weights; timm 0.4.12's layout in the official run, same FP
    logits bit for bit), W4A4, 4 steps per unit and stage, drop_path_rate 0 in the official model (timm's Swin default
    0.1 would train its blocks with stochastic depth, which we do not): all 110 quantizer tensors (the per-tensor
    patch-merging reduction input included), the 63 final weights, biases, relative-position tables and LayerNorm
    affines (sha256) and the quantized logits equal the official run's bit for bit. Needs the loss summed over the
    tokens of the channels-last Swin outputs (``token_loss``)."""
    fixture, meta, model, logits = _run("ias_vit_swin_tiny_w4a4_it4.npz", tiny_swin(seeded=True))
    diffs = qparam_diffs(model, fixture)
    assert len(diffs) == meta["n_qparams"] == 110 and max(d.max_abs for d in diffs) == 0.0
    assert any(d.ours == "layers.1.downsample.reduction.input_quantizer.scale" for d in diffs)
    digests = json.loads(str(fixture["q_weight_sha256"]))
    state = model.state_dict()
    assert len(digests) == 63
    for name, digest in digests.items():
        assert hashlib.sha256(state[name].contiguous().numpy().tobytes()).hexdigest() == digest, name
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))
