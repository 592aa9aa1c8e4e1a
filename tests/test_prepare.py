"""Module swapping on real timm architectures: every site gets a quantizer, and with all quantizers off the
prepared model computes exactly the FP function (Swin's relative position bias and shift mask included)."""

import pytest
import timm
import torch

from ptq_bench.models import calibrating, layernorm_linear_pairs, named_quantizers, prepare_, set_quantizers_enabled
from ptq_bench.quant import UniformQuantizer
from ptq_bench.quant.layers import QuantConv2d, QuantLinear

ARCHS = ["deit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224"]


def small(name: str) -> torch.nn.Module:
    """The real architecture at reduced depth (same module types), so the test stays fast."""
    torch.manual_seed(0)
    if name.startswith("swin"):
        return timm.create_model(name, pretrained=False, depths=(2, 2, 2, 2), embed_dim=48, num_heads=(2, 2, 2, 2)).eval()
    return timm.create_model(name, pretrained=False, depth=2).eval()


def factory(site):
    if site.is_weight:
        return UniformQuantizer(4, granularity="channel", channel_dim=0)
    return UniformQuantizer(4)


@pytest.mark.parametrize("name", ARCHS)
def test_disabled_quantizers_reproduce_fp_logits(name):
    model = small(name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = model(x)
    prepare_(model, factory)
    set_quantizers_enabled(model, False)
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_every_linear_conv_and_matmul_is_quantized_with_roles(name):
    model = small(name)
    prepare_(model, factory)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, QuantLinear) for m in linears)
    assert isinstance(model.patch_embed.proj, QuantConv2d)
    roles = {q.role for _, q in named_quantizers(model)}
    assert {"weight", "patch_embed", "post_layernorm", "attn_proj", "post_gelu", "head", "query", "key", "post_softmax", "value"} <= roles
    if name.startswith("swin"):  # patch-merging reduction input is post-LayerNorm too
        reductions = [m for n, m in model.named_modules() if n.endswith("downsample.reduction")]
        assert reductions and all(m.input_quantizer.role == "post_layernorm" for m in reductions)
    with torch.no_grad(), calibrating(model):
        model(torch.randn(2, 3, 224, 224))
    assert all(q.calibrated for _, q in named_quantizers(model))


def test_layernorm_linear_pairs_cover_blocks_and_patch_merging():
    vit, swin = small(ARCHS[0]), small(ARCHS[2])
    assert len(layernorm_linear_pairs(vit)) == 2 * 2
    assert len(layernorm_linear_pairs(swin)) == 2 * 8 + 3  # two per block, one per patch merging


def test_weights_are_quantized_once_and_cached():
    model = small(ARCHS[0])
    prepare_(model, factory)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), calibrating(model):
        model(x)
    fc = model.blocks[0].mlp.fc1
    calls = []
    fc.weight_quantizer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(x)
        model(x)
        assert calls == []  # cached since calibration
        assert torch.equal(fc.quantized_weight(), fc.weight_quantizer(fc.weight))
    calls.clear()
    fc.weight_quantizer.reset()
    fc.weight_quantizer.calibrating = True
    with torch.no_grad():
        model(x)
    assert calls == [1]  # recomputed once after the quantizer changed


def test_quantizers_are_created_on_the_device_of_their_layer():
    """A model moved to a device before quantization (the task does so for GPUs) gets its quantizers there."""
    model = small(ARCHS[0]).to("meta")
    prepare_(model, factory)
    assert {q.scale.device.type for _, q in named_quantizers(model)} == {"meta"}
