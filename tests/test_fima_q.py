"""FIMA-Q: option refusals and pins of the whole reconstruction (Fisher refreshes included) against the official code
(tests/fixtures/fimaq_{,tcw_,swin_}tiny_w4a4_it4.npz, ShiheWang/FIMA-Q @ 64c4b00; regenerated bit for bit by
oracles/adalog_family_tiny.py --method fimaq, each fixture's meta ``oracle`` names the flags)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from pins import assert_weights_equal, calibrate_and_reconstruct, load_fixture, oracle_batches, tiny_swin, tiny_vit

from ptq_bench.calibration import image_calibration
from ptq_bench.compare import qparam_diffs, weight_diffs
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.unit_training import official_gradients


def test_options_refused() -> None:
    with pytest.raises(ConfigError, match="option k"):
        build_method("fima_q", BitWidth(4, 4), k=0)
    with pytest.raises(ConfigError, match="iters must be 0 or >= k"):
        build_method("fima_q", BitWidth(4, 4), iters=3, k=5)
    with pytest.raises(ConfigError, match="temp"):
        build_method("fima_q", BitWidth(4, 4), temp=0.0)


def _run(fixture_name: str, **options: object) -> tuple[dict[str, np.ndarray], torch.nn.Module, torch.Tensor]:
    """The fixture, and our model after calibration and reconstruction on its images with its FP weights."""
    fixture, meta = load_fixture(fixture_name)
    model = tiny_vit()
    model.load_state_dict({k[len("fp_weight/"):]: torch.from_numpy(v) for k, v in fixture.items() if k.startswith("fp_weight/")})
    batches = oracle_batches(meta)
    method = build_method("fima_q", BitWidth(meta["w_bits"], meta["a_bits"]), iters=meta["iters"], k=meta["k"], **options)
    logits = calibrate_and_reconstruct(method, model, batches, meta["reseed"])
    return fixture, model, logits


def _assert_identical(fixture: dict[str, np.ndarray], model: torch.nn.Module, logits: torch.Tensor) -> None:
    """All 54 quantizer tensors, the 22 weights the fold and the rounding changed, and the logits, bit for bit."""
    diffs = qparam_diffs(model, fixture, ("patch_embed.proj.a_quantizer.",))
    assert len(diffs) == 54 and [d for d in diffs if d.max_abs != 0] == []
    weights = weight_diffs(model, fixture)
    assert len(weights) == 22 and max(d.max_abs for d in weights) == 0.0
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


def test_reconstruction_matches_official_code_on_tiny_vit() -> None:
    """configs/4bit/best.py with token_channel_wise off and k = 2 (calibration on 4 images, reconstruction on 8, 4
    steps per unit: Fisher refreshes at steps 0 and 2 of the patch embedding and both blocks; generator seeded 7
    before the reconstruction, the official clamp gradient of torch <= 2.13): identical to the official run."""
    _assert_identical(*_run("fimaq_tiny_w4a4_it4.npz", token_wise=False))


def test_token_wise_scales_match_official_code_on_tiny_vit() -> None:
    """The configs' token_channel_wise (k = 2, else as above): per-token scales for the Linear inputs, per head and
    row/column for the matmul operands, learned to the same bits as the official run."""
    fixture, model, logits = _run("fimaq_tcw_tiny_w4a4_it4.npz")
    assert tuple(model.blocks[0].attn.matmul2.quantizer_b.scale.shape) == (3, 1, 16)  # per head and V channel
    _assert_identical(fixture, model, logits)


def test_literal_gradient_with_inclusive_clamp() -> None:
    """official_gradients: autograd through the official expression, the clamp passing the gradient on its bounds
    (torch <= 2.13): ∂/∂x and ∂/∂s equal the official chain's with the oracle's inclusive clamp, bit for bit."""
    q = UniformQuantizer(4)
    q.set_params(torch.full((1, 5, 1), 0.37), torch.tensor(3.0))
    x = torch.linspace(-2, 5, 40).reshape(2, 5, 4)
    g = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    x1, s1 = x.clone().requires_grad_(True), q.scale.clone().requires_grad_(True)
    q.scale = s1
    with official_gradients([q]):
        q(x1).backward(g)
    x2, s2 = x.clone().requires_grad_(True), q.scale.detach().clone().requires_grad_(True)
    r = x2 / s2
    t = (r.round() - r).detach() + r + q.zero_point  # the official round_ste
    inside = (t >= 0) & (t <= 15)
    ((torch.where(inside, t, t.detach().clamp(0, 15)) - q.zero_point) * s2).backward(g)
    assert inside.logical_not().any() and (t == 15).any()  # bounds reached and passed
    assert torch.equal(x1.grad, x2.grad) and torch.equal(s1.grad, s2.grad)
    assert not q.literal_gradient and not q.inclusive_clamp


def test_task_without_logits_refused() -> None:
    data = dataclasses.replace(image_calibration(torch.zeros(2, 3, 32, 32)), logits=False)
    with pytest.raises(ConfigError, match="class logits"):
        build_method("fima_q", BitWidth(4, 4), iters=5).quantize(tiny_vit(), data)


def test_reconstruction_matches_official_code_on_tiny_swin() -> None:
    """configs/4bit/best.py with token_channel_wise off and k = 2 on the tiny Swin of test_qdrop.py (timm's init after
    torch.manual_seed(0), the AdaLog Swin pin's weights; calibration on 4 images, reconstruction on 8, 4 steps per
    unit: patch_embed, layers.0.blocks.{0,1}, layers.1.downsample, layers.1.blocks.{0,1}, head; generator seeded 7,
    the official clamp gradient of torch <= 2.13): FP logits, all 106 quantizer tensors, the 46 weights the folds and
    the rounding changed, and the quantized logits identical to the official run bit for bit."""
    fixture, meta = load_fixture("fimaq_swin_tiny_w4a4_it4.npz")
    model = tiny_swin()
    batches = oracle_batches(meta)
    with torch.no_grad():
        assert torch.equal(model(batches.eval), torch.from_numpy(fixture["logits/fp"]))
    method = build_method("fima_q", BitWidth(meta["w_bits"], meta["a_bits"]), iters=meta["iters"], k=meta["k"], token_wise=False,
                          calib_batch_size=meta["calib_size"])  # the oracle's --calib-batch-size (test_qdrop.py)
    logits = calibrate_and_reconstruct(method, model, batches, meta["reseed"])
    diffs = qparam_diffs(model, fixture, ("patch_embed.proj.a_quantizer.",))
    assert len(diffs) == meta["n_qparams"] - 1 == 106 and max(d.max_abs for d in diffs) == 0.0
    assert_weights_equal(model, fixture, 46)
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))
