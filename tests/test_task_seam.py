"""The seam between task, method and architecture: methods run the model only through the task's forward, and an
architecture no adapter can serve as a method needs is refused in one line before any calibration."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ptq_bench.calibration import CalibrationData, image_calibration
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.models import named_quantizers, set_quantizers_enabled

#: Every calibrating method at a tiny budget (options the YAML does not size for a unit test).
TINY = {
    "minmax": {},
    "repq_vit": {},
    "ptq4vit": {"eq_n": 8},
    "base_ptq": {"eq_n": 8},
    "dopq_vit": {"iters": 2, "batch_size": 4, "init_calib_size": 4},
    "aiqvit": {"search_iters": 2, "iters": 2, "batch_size": 4, "candidate_ranks": [2, 4], "init_size": 4},
    "erq": {"refine_steps": 5},
    "ias_vit": {"iters": 2, "batch_size": 4, "init_size": 4},
}


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5).eval()


class DictInputModel(nn.Module):
    """A classifier whose forward takes a dict batch (as detectors do): ``model(tensor)`` fails loudly."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = tiny_vit()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(batch, dict):
            raise AssertionError(f"the model was called with {type(batch).__name__}, not the task's dict batch")
        return self.vit(batch["pixels"])


class DictSamples:
    """Samples that slice into dict batches."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice) -> dict[str, torch.Tensor]:
        return {"pixels": self.images[index]}


def dict_calibration(n: int = 8) -> CalibrationData:
    images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return CalibrationData(DictSamples(images), lambda model, batch: model(batch), logits=True, identity={"sha256": "x"})


@pytest.mark.parametrize("name", sorted(TINY))
def test_methods_call_the_model_only_through_the_task_forward(name: str) -> None:
    model = DictInputModel()
    data = dict_calibration()
    with torch.no_grad():
        reference = model(data.batch(0, 4))
    quantized = build_method(name, BitWidth(8, 8), **TINY[name]).quantize(model, data)
    quantizers = dict(named_quantizers(quantized))
    assert quantizers and all(q.calibrated for q in quantizers.values() if q.enabled)
    with torch.no_grad():
        out = quantized(data.batch(0, 4))
    assert out.shape == reference.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------- refusals


class OwnAttention(nn.Module):
    """Attention that no adapter knows (its own class, its own matmuls)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)


class OwnTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = OwnAttention()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.norm(x)).mean(dim=1))


class PostNormBlock(Block):
    """A timm Block subclass computing ``norm1(x + attn(x))`` (post-norm): the LayerNorm→Linear fold breaks it."""

    def forward(self, x: torch.Tensor, attn_mask: Any = None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class ScaledAttention(Attention):
    """A timm Attention subclass with its own forward: swapping in our forward would change the model."""

    def forward(self, x: torch.Tensor, attn_mask: Any = None) -> torch.Tensor:
        return 2 * super().forward(x, attn_mask=attn_mask)


def post_norm_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, block_fn=PostNormBlock).eval()


def scaled_attention_vit() -> VisionTransformer:
    model = tiny_vit()
    for block in model.blocks:
        block.attn.__class__ = ScaledAttention
    return model


@pytest.mark.parametrize("name", sorted(TINY))
def test_unknown_architecture_is_refused_in_one_line(name: str) -> None:
    data = image_calibration(torch.randn(4, 5, 16))
    with pytest.raises(ConfigError, match="no architecture adapter recognises OwnTransformer") as error:
        build_method(name, BitWidth(8, 8), **TINY[name]).quantize(OwnTransformer(), data)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["repq_vit", "dopq_vit", "aiqvit", "erq", "ias_vit"])
def test_post_norm_blocks_are_refused_by_layernorm_reparameterization(name: str) -> None:
    model = post_norm_vit()
    with pytest.raises(ConfigError, match="PostNormBlock.*not a known pre-norm block"):
        build_method(name, BitWidth(8, 8), **TINY[name]).check(model)


def test_post_norm_blocks_still_quantize_with_methods_that_need_no_fold() -> None:
    model = post_norm_vit()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    quantized = build_method("minmax", BitWidth(8, 8)).quantize(model, image_calibration(x))
    set_quantizers_enabled(quantized, False)
    with torch.no_grad():
        assert torch.allclose(quantized(x), reference, atol=1e-5)


def test_attention_subclass_with_its_own_forward_is_refused() -> None:
    with pytest.raises(ConfigError, match="ScaledAttention.*overrides the forward"):
        build_method("minmax", BitWidth(8, 8)).quantize(scaled_attention_vit(), image_calibration(torch.randn(2, 3, 16, 16)))


def test_unsupported_multihead_attention_is_refused() -> None:
    class CrossAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            memory = x[..., :8]
            return self.head(self.attn(x, memory, memory)[0].mean(dim=1))

    with pytest.raises(ConfigError, match="MultiheadAttention with separate q/k/v weights"):
        build_method("minmax", BitWidth(8, 8)).quantize(CrossAttention().eval(), image_calibration(torch.randn(2, 5, 16)))


def test_method_options_come_from_the_yaml_typed() -> None:
    method = build_method("aiqvit", BitWidth(4, 4))
    assert method.options.iters == 6000 and method.options.search_iters == 2000  # conf/method/aiqvit.yaml (paper)
    for bad, phrase in (
        ({"iters": 2.5}, "method.iters=2.5: expected an integer"),
        ({"lowrank": "maybe"}, "method.lowrank='maybe': expected true or false"),
        ({"loss": "l1"}, "must be one of mse, fro"),
        ({"search_iterz": 3}, "has no option(s) search_iterz"),
    ):
        with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
            build_method("aiqvit", BitWidth(4, 4), **bad)
    with pytest.raises(ConfigError, match=r"options: .*\biters\b.*, calib_size\)$"):  # every key a user may set
        build_method("aiqvit", BitWidth(4, 4), search_iterz=3)


def test_runtime_options_stay_out_of_the_identity() -> None:
    method = build_method("ptq4vit", BitWidth(4, 4))
    assert "capture_mb" not in method.identity() and "search_chunk_mb" not in method.identity()
    assert build_method("ptq4vit", BitWidth(4, 4), capture_mb=7).identity() == method.identity()


def test_a_revision_enters_the_identity_only_when_raised() -> None:
    """A fixed method (I&S-ViT's Swin loss, ERQ's Swin reduction: revision 1) gets new run keys; the others keep
    theirs."""
    assert build_method("ias_vit", BitWidth(4, 4)).identity()["revision"] == 1
    assert build_method("erq", BitWidth(4, 4)).identity()["revision"] == 1
    assert "revision" not in build_method("repq_vit", BitWidth(4, 4)).identity()


def test_global_seed_drives_the_method_rng() -> None:
    data = image_calibration(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3)))

    def scales(seed: int) -> list[torch.Tensor]:
        model = build_method("dopq_vit", BitWidth(4, 4), seed=seed, **TINY["dopq_vit"]).quantize(tiny_vit(), data)
        return [q.scale.clone() for _, q in named_quantizers(model) if hasattr(q, "scale")]

    assert all(torch.equal(a, b) for a, b in zip(scales(0), scales(0)))
    assert not all(torch.equal(a, b) for a, b in zip(scales(0), scales(1)))


def test_aiqvit_rank_search_with_a_single_usable_rank_per_layer() -> None:
    """Layers narrower than every candidate but one leave nothing to search: the block still reconstructs."""
    data = image_calibration(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    options = {**TINY["aiqvit"], "candidate_ranks": [2, 500]}
    quantized = build_method("aiqvit", BitWidth(4, 4), **options).quantize(tiny_vit(), data)
    assert all(q.calibrated for _, q in named_quantizers(quantized) if q.enabled)


def test_weights_hash_covers_zero_dimensional_integer_buffers() -> None:
    from ptq_bench.models.build import state_dict_sha256

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))  # num_batches_tracked: a 0-d int64 buffer
    assert len(state_dict_sha256(model)) == 64
    assert state_dict_sha256(tiny_vit()) == state_dict_sha256(tiny_vit())
