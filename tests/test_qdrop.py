"""QDrop (as the APHQ-ViT authors reproduce it): AdaRound and the QDrop mixing by hand, the official generator
stream, and pins of the whole reconstruction against the official code on a tiny ViT and a tiny Swin
(tests/fixtures/qdrop_tiny_w4a4_it4.npz, qdrop_swin_tiny_w4a4_it4.npz; GoatWu/APHQ-ViT @ 84c9fde; regenerated bit for
bit by oracles/adalog_family_tiny.py --method aphqvit --cfg optim_metric=mse,use_mean_hessian=False,pct=0.99 ..., each
fixture's meta ``oracle`` names the flags)."""

from __future__ import annotations

import pytest
import torch
from pins import assert_weights_equal, calibrate_and_reconstruct, load_fixture, oracle_batches, tiny_swin, tiny_vit
from torch import nn

from ptq_bench.compare import qparam_diffs
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.methods.qdrop import lp_loss
from ptq_bench.quant.layers import QuantLinear
from ptq_bench.quant.uniform import UniformQuantizer
from ptq_bench.transforms.adaround import (
    AdaRoundQuantizer,
    RoundingAnnealing,
    attach_,
    bake_,
)
from ptq_bench.transforms.qdrop import (
    dropping_activations,
    mask_like,
    mixed_inputs,
    skip_loader_seeds,
)

def _layer() -> QuantLinear:
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.26, -0.74, 0.5], [0.1, 0.9, -0.05]]))
    quantizer = UniformQuantizer(4, granularity="channel", channel_dim=0)
    quantizer.set_params(torch.tensor([[0.5], [0.2]]), torch.tensor([[8.0], [8.0]]))
    return QuantLinear.convert_(linear, quantizer, None)


def test_adaround_starts_at_the_fractional_part_and_bakes_the_hard_choice() -> None:
    layer = _layer()
    (rounder,) = attach_([layer])
    assert isinstance(layer.weight_quantizer, AdaRoundQuantizer)
    w = layer.weight.detach()
    rest = w / torch.tensor([[0.5], [0.2]]) - torch.floor(w / torch.tensor([[0.5], [0.2]]))
    assert torch.allclose(rounder.rounding(), rest, atol=1e-6)  # h(α₀) = w/s - floor(w/s)
    assert torch.allclose(layer.quantized_weight(), w, atol=1e-6)  # soft: floor + rest = the FP weight
    with torch.no_grad():
        rounder.alpha.copy_(torch.tensor([[1.0, -1.0, 0.0], [-2.0, 3.0, 1.0]]))
    bake_([layer])
    # (floor(w/s) + [α ≥ 0])·s: 0.26/0.5 -> 0 + 1; -0.74/0.5 -> -2 + 0; 0.5/0.5 -> 1 + 1; 0.1/0.2 -> 0 + 0 (0.5 floors to 0);
    # 0.9/0.2 -> 4 + 1; -0.05/0.2 -> -1 + 1
    expected = torch.tensor([[0.5, -1.0, 1.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(layer.weight, expected, atol=1e-6)
    assert isinstance(layer.weight_quantizer, UniformQuantizer)
    assert torch.allclose(layer.quantized_weight(), expected, atol=1e-6)  # the uniform grid keeps the baked levels


def test_regularizer_and_annealing_by_hand() -> None:
    layer = _layer()
    (rounder,) = attach_([layer])
    with torch.no_grad():
        rounder.alpha.fill_(0.0)  # h = 0.5·1.2 - 0.1 = 0.5: each element costs 1 - 0^b = 1
    assert rounder.regularizer(2.0).item() == pytest.approx(6.0)
    annealing = RoundingAnnealing(iters=100, warmup=0.2, start_b=20, end_b=2)
    assert not annealing.active(19) and annealing.active(20)
    assert annealing.b(20) == 20 and annealing.b(60) == pytest.approx(11.0) and annealing.b(100) == 2


def test_masks_fill_the_input_layout_like_rand_like() -> None:
    k_t = torch.randn(2, 5, 3, 4, 6).permute(2, 0, 3, 1, 4)[1].transpose(-2, -1)  # a K-transposed operand
    torch.manual_seed(3)
    expected = torch.rand_like(k_t) < 0.5
    assert torch.equal(mask_like(k_t, 0.5, torch.Generator().manual_seed(3)), expected)


def test_mixing_extremes() -> None:
    q, fp = torch.zeros(4, 5), torch.ones(4, 5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(mixed_inputs(q, fp, 1.0, g), q) and torch.equal(mixed_inputs(q, fp, 0.0, g), fp)
    quantizer = UniformQuantizer(2)
    quantizer.set_params(torch.tensor(1.0), torch.tensor(0.0))
    x = torch.full((3, 3), 0.4)
    with dropping_activations([quantizer], 0.0, g):
        assert torch.equal(quantizer(x), x)  # never quantized
    assert torch.equal(quantizer(x), torch.zeros(3, 3))  # the hook is gone


def test_loader_seed_draws_are_a_dataloader_pass() -> None:
    """One iteration over a torch DataLoader draws one int64 from the global generator (its base seed)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=2)
    torch.manual_seed(11)
    for _ in loader:
        pass
    expected = torch.randperm(16)
    g = torch.Generator().manual_seed(11)
    skip_loader_seeds(g, 1)
    assert torch.equal(torch.randperm(16, generator=g), expected)


def test_lp_loss_sums_over_tokens() -> None:
    assert lp_loss(torch.ones(2, 3, 4), torch.zeros(2, 3, 4)).item() == 3.0


def test_options_refused() -> None:
    with pytest.raises(ConfigError, match="drop_prob"):
        build_method("qdrop", BitWidth(4, 4), drop_prob=1.5)
    with pytest.raises(ConfigError, match="warmup"):
        build_method("qdrop", BitWidth(4, 4), warmup=1.0)


def test_reconstruction_matches_official_code_on_tiny_vit() -> None:
    """configs/4bit/qdrop_baseline.py (calibration on 4 images, reconstruction on 8, 4 steps per unit, generator
    seeded 7 before the reconstruction as the oracle reseeds the global one): every quantizer tensor, every baked
    weight and the quantized logits equal the official run's bit for bit. The official code ran with torch's
    clamp gradient of torch <= 2.13 at the bounds (its README pins torch 1.10), which ptq_bench/quant/ste.py fixes."""
    fixture, meta = load_fixture("qdrop_tiny_w4a4_it4.npz")
    model = tiny_vit()
    batches = oracle_batches(meta)
    method = build_method("qdrop", BitWidth(meta["w_bits"], meta["a_bits"]), iters=meta["iters"])
    logits = calibrate_and_reconstruct(method, model, batches, meta["reseed"])
    diffs = qparam_diffs(model, fixture, ("patch_embed.proj.a_quantizer.",))
    assert len(diffs) == meta["n_qparams"] - 1 == 54 and max(d.max_abs for d in diffs) == 0.0
    assert_weights_equal(model, fixture, 15)  # patch embedding, per block 2 LayerNorms (folded) and 4 Linears, head
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))


def test_reconstruction_matches_official_code_on_tiny_swin() -> None:
    """The same recipe on the tiny Swin (AdaLog Swin pin's weights): units patch_embed, layers.0.blocks.{0,1},
    layers.1.downsample (PatchMerging), layers.1.blocks.{0,1}, head (ClassifierHead with its pooling; the final norm
    in no unit), as the official ``types_of_block``. FP logits, all 106 quantizer tensors, all 46 weights the
    calibration folds and AdaRound changed, and the quantized logits bit-identical (the step sizes train through the
    literal expression, :func:`ptq_bench.transforms.unit_training.official_gradients`; the fused straight-through
    node left the post-Softmax scale of layers.0.blocks.0 1.6e-6 relative apart)."""
    fixture, meta = load_fixture("qdrop_swin_tiny_w4a4_it4.npz")
    model = tiny_swin()
    batches = oracle_batches(meta)
    with torch.no_grad():
        assert torch.equal(model(batches.eval), torch.from_numpy(fixture["logits/fp"]))
    # the oracle's --calib-batch-size is its calib_size: on a Swin it slices the searches' windows (dim 0), so it
    # sets their float summation order
    method = build_method("qdrop", BitWidth(meta["w_bits"], meta["a_bits"]), iters=meta["iters"],
                          calib_batch_size=meta["calib_size"])
    logits = calibrate_and_reconstruct(method, model, batches, meta["reseed"])
    diffs = qparam_diffs(model, fixture, ("patch_embed.proj.a_quantizer.",))
    assert len(diffs) == meta["n_qparams"] - 1 == 106 and max(d.max_abs for d in diffs) == 0.0
    assert_weights_equal(model, fixture, 46)  # every baked conv/Linear weight, the folded LayerNorms, qkv/fc1/reduction biases
    assert torch.equal(logits, torch.from_numpy(fixture["logits/q"]))
