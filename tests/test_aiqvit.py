"""AIQViT: DFQ, low-rank compensation, rank search, curriculum and resumable block reconstruction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ptq_bench.calibration import image_calibration
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.methods.aiqvit import AIQViT
from ptq_bench.quant import QUANTIZERS, UniformQuantizer
from ptq_bench.quant.dfq import DynamicFocusingQuantizer
from ptq_bench.quant.layers import QuantLinear
from ptq_bench.quant.log import Log2Quantizer
from ptq_bench.transforms.lowrank import LowRankBranch, LowRankQuantLinear, attach_lowrank_, fold_lowrank_, usable_ranks
from ptq_bench.transforms.reconstruction import Curriculum, ReconStep, reconstruct_block

FAST = {
    "reparam": "none",
    "search_iters": 6,
    "iters": 12,
    "batch_size": 4,
    "candidate_ranks": [2, 4, 8],
    "curriculum_rerank_every": 4,
    "init_size": 8,
}


def tiny_vit(depth: int = 2, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0, num_classes=5).eval()


def images(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ DFQ
def dfq_with_interval(bits: int, b1: float, b2: float, below: str = "b1") -> DynamicFocusingQuantizer:
    q = DynamicFocusingQuantizer(bits, below=below)
    with torch.no_grad():
        q.b1.fill_(b1)
        q.b2.fill_(b2)
    q.calibrated = True
    return q


def test_dfq_is_registered():
    assert QUANTIZERS.get("dfq") is DynamicFocusingQuantizer


def test_dfq_grid_is_uniform_inside_and_clamps_outside():
    q = dfq_with_interval(2, 0.1, 0.4)  # step 0.1, levels {0.1, 0.2, 0.3, 0.4}
    x = torch.tensor([0.0, 0.05, 0.1, 0.16, 0.24, 0.34, 0.4, 0.7, 1.0])
    expected = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.2, 0.3, 0.4, 0.4, 0.4])
    torch.testing.assert_close(q(x), expected)
    assert torch.unique(q(torch.rand(1000))).numel() <= 4


def test_dfq_zero_mode_sends_values_below_b1_to_zero():
    q = dfq_with_interval(2, 0.1, 0.4, below="zero")
    torch.testing.assert_close(q(torch.tensor([0.0, 0.05, 0.16, 0.9])), torch.tensor([0.0, 0.0, 0.2, 0.4]))


def test_dfq_gradients_reach_both_bounds():
    q = dfq_with_interval(2, 0.1, 0.4)
    q(torch.tensor([0.9, 0.95])).sum().backward()  # clamped above: x̂ = b2
    assert q.b2.grad.item() == pytest.approx(2.0, abs=1e-5)
    q.b1.grad = q.b2.grad = None
    q(torch.tensor([0.02])).sum().backward()  # clamped below: x̂ = b1
    assert q.b1.grad.item() == pytest.approx(1.0, abs=1e-5)
    q.b1.grad = q.b2.grad = None
    q(torch.tensor([0.16, 0.27, 0.33])).sum().backward()  # inside: LSQ-style step-size gradient
    assert q.b1.grad is not None and q.b2.grad is not None
    assert q.b1.grad.abs().item() + q.b2.grad.abs().item() > 0


def test_dfq_learns_a_better_interval():
    x = torch.softmax(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    q = DynamicFocusingQuantizer(3, init="max")
    q.calibrating = True
    start = (q(x) - x).pow(2).mean().item()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    assert (q(x) - x).pow(2).mean().item() < 0.95 * start
    b1, b2 = q.interval()
    assert 0.0 <= b1.item() < b2.item() <= 1.0


def test_dfq_mse_init_beats_max_init():
    x = torch.softmax(torch.randn(32, 50, generator=torch.Generator().manual_seed(0)) * 2, dim=-1)
    errors = {}
    for init in ("max", "mse"):
        q = DynamicFocusingQuantizer(4, init=init)
        q.calibrating = True
        errors[init] = (q(x) - x).pow(2).mean().item()
        assert q.b1.item() == 0.0 and q.b2.item() <= x.max().item() + 1e-6
    assert errors["mse"] < errors["max"]


# ------------------------------------------------------------------ low-rank branch
def calibrated_linear(out_features: int = 12, in_features: int = 16) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear.convert_(
        nn.Linear(in_features, out_features),
        UniformQuantizer(3, granularity="channel", channel_dim=0),
        UniformQuantizer(4),
    )
    layer.weight_quantizer.calibrating = layer.input_quantizer.calibrating = True
    layer(torch.randn(8, in_features))
    layer.weight_quantizer.calibrating = layer.input_quantizer.calibrating = False
    return layer


@pytest.mark.parametrize("placement", ["merged", "side"])
@pytest.mark.parametrize("ranks", [[4], [2, 4, 8]])
def test_zero_b_branch_leaves_output_unchanged(placement, ranks):
    layer = calibrated_linear()
    x = torch.randn(5, 16)
    reference = layer(x)
    attach_lowrank_(layer, LowRankBranch(12, 16, ranks), placement)
    assert torch.equal(layer(x), reference)
    assert not layer.weight.requires_grad


def test_branch_changes_output_and_folds_into_the_weight():
    layer = calibrated_linear()
    x = torch.randn(5, 16)
    reference = layer(x)
    branch = LowRankBranch(12, 16, [4])
    with torch.no_grad():
        branch.B[0].normal_(0, 0.5)
    attach_lowrank_(layer, branch, "merged")
    with torch.no_grad():
        compensated = layer(x)
    assert not torch.allclose(compensated, reference)
    folded = fold_lowrank_(layer)
    assert type(folded) is QuantLinear and folded.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(folded(x), compensated)


def test_branch_selection_is_argmax_and_warm_start_keeps_contribution():
    branch = LowRankBranch(12, 16, [2, 4, 8])
    with torch.no_grad():
        branch.alpha.copy_(torch.tensor([0.1, 0.7, 0.2]))
        for b in branch.B:
            b.normal_()
    assert branch.chosen_rank() == 4
    warm = branch.select(warm_start=True)
    expected = branch.mixing_weights()[1] * (branch.B[1] @ branch.A[1])
    torch.testing.assert_close(warm.eval().delta(), expected)
    assert branch.select(warm_start=False).B[0].abs().sum() == 0


def test_usable_ranks_drop_ranks_above_the_layer_size():
    assert usable_ranks([10, 20, 50, 100, 150], 192, 64) == (10, 20, 50)
    assert usable_ranks([100, 150], 32, 96) == (32,)


# ------------------------------------------------------------------ curriculum
def test_curriculum_fraction_grows_linearly_from_lambda0():
    c = Curriculum(lambda0=0.5)
    assert [c.fraction(t, 100) for t in (0, 50, 100, 200)] == [0.5, 0.75, 1.0, 1.0]
    assert [c.count(t, 100, 10) for t in (0, 1, 50, 99)] == [5, 6, 8, 10]
    with pytest.raises(ConfigError):
        Curriculum(lambda0=0.0)


class _Recorder(nn.Module):
    """y = w·x; records which samples (x holds the sample index) each training batch (grad enabled) used."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen: list[set[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.seen.append({int(v) for v in x[:, 0]})
        return self.w * x


def test_reconstruction_uses_the_easiest_samples_first():
    n, iters = 8, 10
    inputs = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # loss of sample i ∝ i²
    targets = torch.zeros_like(inputs)
    block = _Recorder()
    curriculum = Curriculum(lambda0=0.5, rerank_every=1)
    step = ReconStep(torch.optim.SGD(block.parameters(), lr=0.0), torch.arange(n), curriculum)
    reconstruct_block(block, inputs, targets, [step], iters, 2, torch.Generator().manual_seed(0))
    assert len(block.seen) == iters
    for t, batch in enumerate(block.seen):
        assert max(batch) < curriculum.count(t, iters, n)
    assert max(block.seen[0]) < n // 2


# ------------------------------------------------------------------ method
def run(options: dict, depth: int = 2, bits: BitWidth = BitWidth(4, 4)) -> tuple[AIQViT, nn.Module]:
    method = build_method({"name": "aiqvit", **FAST, **options}, bits)
    model = method.quantize(tiny_vit(depth), image_calibration(images()))
    return method, model


def test_rank_search_selects_ranks_and_the_branch_reduces_block_error():
    method, model = run({"softmax_quantizer": "uniform", "learn_act_scales": False, "curriculum": False, "iters": 30}, bits=BitWidth(3, 8))
    assert set(method.ranks) == {f"blocks.{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(method.ranks.values()) <= {2, 4, 8}
    for before, after in method.block_errors.values():
        assert after < before
    assert not any(isinstance(m, LowRankQuantLinear) for m in model.modules())  # merged: folded into W


def test_ablation_switches_pick_the_quantizers():
    method, model = run({"lowrank": False, "curriculum": False, "softmax_quantizer": "log2"}, depth=1)
    assert method.ranks == {}
    assert isinstance(model.blocks[0].attn.matmul2.quantizer_a, Log2Quantizer)
    method, model = run({"rank": 4, "softmax_quantizer": "dfq"}, depth=1)
    assert set(method.ranks.values()) == {4}
    assert isinstance(model.blocks[0].attn.matmul2.quantizer_a, DynamicFocusingQuantizer)


def test_side_placement_keeps_the_branch():
    _, model = run({"placement": "side", "rank": 2}, depth=1)
    assert sum(isinstance(m, LowRankQuantLinear) for m in model.modules()) == 4


def test_reparameterization_after_reconstruction_makes_post_layernorm_per_tensor():
    _, model = run({"reparam": "after"}, depth=1)
    assert model.blocks[0].attn.qkv.input_quantizer.granularity == "tensor"
    assert model.blocks[0].mlp.fc1.input_quantizer.granularity == "tensor"
    assert torch.isfinite(model(images(4))).all()


def test_bad_options_raise_config_errors():
    for options in ({"rank": "auto"}, {"rank": 0}, {"softmax_quantizer": "twin_gelu"}, {"placement": "side"}, {"unknown": 1}):
        with pytest.raises(ConfigError):
            build_method({"name": "aiqvit", **options}, BitWidth(4, 4))


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    options = {"state_dir": str(tmp_path / "state")}
    _, reference = run({}, depth=2)

    calls = []
    original = AIQViT._optimize_block

    def interrupt_at_second_block(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AIQViT, "_optimize_block", interrupt_at_second_block)
    with pytest.raises(KeyboardInterrupt):
        run(options, depth=2)
    assert (tmp_path / "state" / "blocks.0.pt").is_file() and not (tmp_path / "state" / "blocks.1.pt").exists()

    calls.clear()
    method, resumed = run(options, depth=2)
    assert calls == ["blocks.1"]  # block 0 was loaded, not optimized again
    assert set(method.block_errors) == {"blocks.0", "blocks.1"}
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == new_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(value, new_state[key]), key

    with pytest.raises(ConfigError):  # a different run must not reuse these states
        run({**options, "iters": 13}, depth=2)


def test_hydra_config_builds_the_method():
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/method/aiqvit.yaml")
    method = build_method(cfg, BitWidth(4, 4))
    assert method.options.candidate_ranks == (10, 20, 50, 100, 150)
    assert method.options.rank == "search" and method.options.reparam == "after"
