"""Never a silently wrong quantized model: every quantizer ran, FP-preserving transforms are checked at run time,
and torch's own transformer layers (nn.TransformerEncoderLayer, nn.MultiheadAttention, torchvision's ViT) are
quantized through explicit forwards instead of their fused fast paths."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

import ptq_bench.transforms.reparam as reparam
from ptq_bench.calibration import image_calibration
from ptq_bench.errors import ConfigError, CoverageError, InvariantError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.models import named_quantizers, quantizers_off
from ptq_bench.models.coverage import check_calibrated, check_ran, quantized_modules, tracking_calls
from ptq_bench.quant.layers import QuantLinear, QuantMatMul
from ptq_bench.transforms.invariants import RELATIVE_TOLERANCE
from test_task_seam import post_norm_vit, tiny_vit


class EncoderViT(nn.Module):
    """A small ViT built from torch's own layers: patch conv, nn.TransformerEncoder, Linear head."""

    def __init__(self, norm_first: bool, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, 32, 8, 8)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, activation="gelu", batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(images).flatten(2).transpose(1, 2)
        tokens = self.encoder(tokens if self.batch_first else tokens.transpose(0, 1))
        return self.head((tokens if self.batch_first else tokens.transpose(0, 1)).mean(dim=1))


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    return TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)


def images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def quantize_and_check(model: nn.Module, method: str, size: int = 32, **options) -> nn.Module:
    """Quantize ``model``, then assert every quantizer ran in calibration and in a forward pass, and that with every
    quantizer off the model is the FP one."""
    model.eval()
    x = images(size=size)
    with torch.no_grad():
        reference = model(x)
    quantized = build_method(method, BitWidth(8, 8), **options).quantize(model, image_calibration(x))
    check_calibrated(quantized)
    with tracking_calls(quantized) as calls, torch.no_grad():
        out = quantized(x)
    check_ran(calls)
    assert torch.isfinite(out).all()
    with quantizers_off(quantized), torch.no_grad():
        assert torch.allclose(quantized(x), reference, atol=1e-5, rtol=1e-4)
    return quantized


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("method", ["minmax", "repq_vit"])
def test_torch_encoder_vit_quantizes_fully(norm_first: bool, batch_first: bool, method: str) -> None:
    options = {"post_norm": "skip"} if method == "repq_vit" and not norm_first else {}
    quantized = quantize_and_check(EncoderViT(norm_first, batch_first), method, **options)
    linears = [n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)]
    assert {"encoder.layers.0.self_attn.in_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.0.linear1",
            "encoder.layers.0.linear2"} <= set(linears)
    assert sum(isinstance(m, QuantMatMul) for m in quantized.modules()) == 4
    roles = {row["module"]: row["quantizers"]["input_quantizer"]["role"] for row in quantized_modules(quantized) if "input_quantizer" in row["quantizers"]}
    assert roles["encoder.layers.1.self_attn.in_proj"] == ("post_layernorm" if norm_first else "linear")


def test_post_norm_encoder_refuses_the_fold_unless_asked() -> None:
    with pytest.raises(ConfigError, match="is post-norm: LayerNorm→Linear reparameterization cannot be applied"):
        build_method("repq_vit", BitWidth(8, 8)).check(EncoderViT(norm_first=False))


@pytest.mark.parametrize("method", ["minmax", "repq_vit"])
def test_torchvision_vit_quantizes_fully(method: str) -> None:
    quantized = quantize_and_check(torchvision_vit(), method)
    roles = {row["module"]: row["quantizers"]["input_quantizer"]["role"] for row in quantized_modules(quantized) if "input_quantizer" in row["quantizers"]}
    assert roles["encoder.layers.encoder_layer_0.self_attention.in_proj"] == "post_layernorm"
    assert roles["conv_proj"] == "patch_embed" and roles["heads.head"] == "head"


def test_attention_masks_are_kept() -> None:
    model = EncoderViT(norm_first=True).eval()
    tokens = torch.randn(2, 6, 32)
    mask = torch.zeros(6, 6, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    with torch.no_grad():
        reference = model.encoder(tokens, mask=mask, src_key_padding_mask=padding)
    build_method("minmax", BitWidth(8, 8)).quantize(model, image_calibration(images()))
    with quantizers_off(model), torch.no_grad():
        out = model.encoder(tokens, mask=mask, src_key_padding_mask=padding)
    assert torch.allclose(out, reference, atol=1e-5)


def test_post_norm_timm_block_runs_without_the_fold_when_asked() -> None:
    quantized = quantize_and_check(post_norm_vit(), "repq_vit", size=16, post_norm="skip")
    assert all(q.granularity == "tensor" for n, q in named_quantizers(quantized) if n.endswith("qkv.input_quantizer"))


class Bypass(nn.Module):
    """Reads its Linear's weight directly (as torch's fused paths do): the swapped-in QuantLinear never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = tiny_vit()
        self.extra = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.vit(x), self.extra.weight, self.extra.bias)


def test_bypassed_quantizers_stop_the_run() -> None:
    x = torch.randn(4, 3, 16, 16)
    model = build_method("minmax", BitWidth(8, 8)).quantize(Bypass().eval(), image_calibration(x))
    with pytest.raises(CoverageError, match="2 quantizer\\(s\\) never observed data during calibration: extra.weight_quantizer, extra.input_quantizer"):
        check_calibrated(model)
    with tracking_calls(model) as calls, torch.no_grad():
        model.vit(x)  # evaluation that skips the head's own path
    with pytest.raises(CoverageError, match="never ran during evaluation: .*extra"):
        check_ran(calls)


def test_invariant_check_catches_a_wrong_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    def fold_without_compensation(linear: nn.Linear, ratio: torch.Tensor, shift: torch.Tensor) -> None:
        linear.weight.data = linear.weight.data * ratio  # the bias compensation W·b is forgotten

    monkeypatch.setattr(reparam, "_fold_into_linear_", fold_without_compensation)
    with pytest.raises(InvariantError, match="RepQ-ViT LayerNorm→Linear reparameterization changed the FP function: outputs part at 'blocks.0'"):
        build_method("repq_vit", BitWidth(4, 4)).quantize(tiny_vit(), image_calibration(torch.randn(8, 3, 16, 16)))


def test_record_lists_what_was_quantized_and_the_report_prints_it(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from conftest import REPO, run_cli

    result = run_cli("method=repq_vit", "method.calib_size=8", "data.max_eval_images=50", "logger=none",
                     "task.progress=false", f"results_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    modules = {row["module"]: row for row in record["quantized"]}
    assert len(modules) == 4 * 6 + 2  # per block: qkv, proj, fc1, fc2, two matmuls; the patch conv and the head
    assert modules["blocks.0.attn.qkv"]["quantizers"]["input_quantizer"] == {"role": "post_layernorm", "bits": 4, "quantizer": "UniformQuantizer"}
    assert modules["blocks.0.attn.matmul2"]["quantizers"]["quantizer_a"]["quantizer"] == "LogSqrt2Quantizer"
    shown = subprocess.run([sys.executable, "-m", "ptq_bench.report", "--runs", str(tmp_path), "--quantized", record["run_key"]],
                           cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and "blocks.3.mlp.fc2" in shown.stdout and "post_gelu" in shown.stdout


def test_the_record_lists_each_fold_and_the_difference_it_measured() -> None:
    """RepQ-ViT's record entry: every LayerNorm→Linear pair folded and the FP difference the check measured."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8).eval()
    method = build_method("repq_vit", BitWidth(4, 4))
    method.quantize(model, image_calibration(torch.randn(4, 3, 32, 32)))
    (entry,) = method.transforms
    assert entry["folded"] == ["blocks.0.norm1 → blocks.0.attn.qkv", "blocks.0.norm2 → blocks.0.mlp.fc1",
                               "blocks.1.norm1 → blocks.1.attn.qkv", "blocks.1.norm2 → blocks.1.mlp.fc1"]
    assert 0.0 < entry["fp_relative_error"] < 1e-5 and entry["tolerance"] == RELATIVE_TOLERANCE


def test_post_norm_refusal_names_the_skip_option_only_where_the_method_has_it() -> None:
    with pytest.raises(ConfigError, match=r"\(method.post_norm=skip runs without it there\)"):
        build_method("repq_vit", BitWidth(8, 8)).check(EncoderViT(norm_first=False))
    with pytest.raises(ConfigError, match=r"is post-norm: .*\(this method folds every block\)$"):
        build_method("erq", BitWidth(8, 8)).check(EncoderViT(norm_first=False))
