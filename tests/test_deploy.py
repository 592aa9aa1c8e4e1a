"""deploy=x86_int8: the integer model built from a method's own grids agrees with its fake-quant model, and every
site that cannot run in int8 is listed as float with its reason (docs/deploy.md)."""

from __future__ import annotations

import pytest
import timm
import torch
from test_compiled_eval import mnist_cfg

from ptq_bench import harness, report
from ptq_bench.calibration import image_calibration
from ptq_bench.deploy import check_deploy
from ptq_bench.deploy.int8_layers import Int8Conv2d, Int8Linear
from ptq_bench.deploy.measure import agreement
from ptq_bench.deploy.sites import plan
from ptq_bench.deploy.x86 import integer_model
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.results.formatting import deploy_text
from ptq_bench.results.report import with_deploy
from ptq_bench.results.store import run_key
from tasks import TASKS


def quantized_deit_tiny(method: str, bits: BitWidth) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random-init deit_tiny calibrated by ``method`` on 2 images, and 4 evaluation images."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    images = torch.randn(4, 3, 224, 224)
    return build_method(method, bits).quantize(model, image_calibration(images[:2])).eval(), images


def test_deploy_is_refused_in_one_line_and_enters_the_run_key_only_when_set(tmp_path) -> None:
    cfg = mnist_cfg(tmp_path)
    assert cfg.deploy is None  # off by default (conf/config.yaml)
    settings = harness.read_settings(cfg, True)
    method = build_method(cfg.method, settings.bits, seed=0)
    task = TASKS.get("classification")(cfg, False)
    plain = harness.identity(task, cfg, method, settings, "sha")
    deployed = harness.identity(task, mnist_cfg(tmp_path, "deploy=x86_int8"), method, settings, "sha")
    assert "deploy" not in plain and deployed == {**plain, "deploy": "x86_int8"} and run_key(deployed) != run_key(plain)
    with pytest.raises(ConfigError, match=r"^deploy='arm': unknown backend \(backends: x86_int8; null: off\)$"):
        check_deploy("arm", torch.device("cpu"), True)
    with pytest.raises(ConfigError, match="^deploy=x86_int8 runs on the CPU"):
        check_deploy("x86_int8", torch.device("cuda"), True)
    with pytest.raises(ConfigError, match="^deploy=x86_int8: the task does not call its model as model"):
        check_deploy("x86_int8", torch.device("cpu"), False)


@pytest.mark.slow
def test_mnist_integer_model_runs_int8_kernels_and_agrees(tmp_path, capsys) -> None:
    """The default run (MNIST-ViT, MinMax W4A4: 4-bit values stored as int8), 200 test images, compiled with the
    oneDNN kernels. Measured: 100 % top-1 agreement, logit cosine 0.99999."""
    record = harness.run(mnist_cfg(tmp_path / "runs", "deploy=x86_int8", "device=cpu", "data.workers=0"), [], tmp_path / "out")
    deploy = record["deploy"]
    sites = {site["layer"]: site for site in deploy["sites"]}
    linear = [s for s in sites.values() if s["op"] == "linear" and s["runs"] == "int8"]
    assert record["bits"]["label"] == "W4A4" and sites["patch_embed.proj"]["runs"] == "int8" and len(linear) == 17
    assert deploy["int8_kernels"] == {"qlinear": 17, "qconv": 1}  # every int8 site lowered to a oneDNN kernel
    assert all(s["runs"] == "float" and "no int8 kernel" in s["reason"] for s in sites.values() if s["op"] == "matmul")
    assert deploy["agreement"]["top1_agreement"] >= 99.0 and deploy["agreement"]["cosine"] >= 0.999
    assert abs(deploy["metrics"]["top1"] - record["metrics"]["top1"]) <= 1.0
    assert deploy["fake_quant_metrics"]["top1"] == record["metrics"]["top1"]
    assert deploy["bytes"]["int8"] < 0.4 * deploy["bytes"]["fp"] and deploy["latency"]["int8"]["median_ms"] > 0
    assert report.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "tables"), "--deploy"]) == 0
    assert deploy_text(deploy) in capsys.readouterr().out


def test_deploy_cell_text() -> None:
    section = {"backend": "x86_int8", "latency": {"ratio": 0.4961}, "bytes": {"int8": 6_300_000, "fp": 22_900_000},
               "agreement": {"top1_agreement": 99.5}}
    assert deploy_text(section) == "x86_int8 0.50x FP, 6.3/22.9 MB, 99.5% agr."
    assert deploy_text(None) == "" and with_deploy("72.10", "") == "72.10"
    assert with_deploy("72.10", deploy_text(section)) == "72.10 [x86_int8 0.50x FP, 6.3/22.9 MB, 99.5% agr.]"


def test_w8_asymmetric_weights_run_int8_with_an_offset_and_agree() -> None:
    """MinMax W8A8 (asymmetric per-channel weights: 256 values of q - z) on a random deit_tiny, Q/DQ form run
    eagerly: stored as int8 q - z - o with the float term s·o·Σx̂. Measured: cosine 0.99962, max diff 4 % of
    the largest logit (single rounding flips of x·(1/s) against x/s, amplified through 12 random blocks)."""
    model, images = quantized_deit_tiny("minmax", BitWidth(8, 8))
    sites = plan(model)
    integer = integer_model(model, sites)
    assert sum(s.runs == "int8" for s in sites) == 50  # 48 block Linears, head, patch embedding
    layers = [m for m in integer.modules() if isinstance(m, (Int8Linear, Int8Conv2d))]
    assert len(layers) == 50 and all(m.offset_scale is not None for m in layers)
    with torch.no_grad():
        measured = agreement([integer(images)], [model(images)])
    assert measured["cosine"] >= 0.999 and measured["max_abs_diff"] <= 0.1 * measured["reference_max_abs"]


def test_non_uniform_and_fractional_grids_stay_float_with_the_reason() -> None:
    """RepQ-ViT W4A4: the log√2 post-Softmax operand and the reparameterized post-LayerNorm inputs (a fractional
    zero point) are listed as float, never dropped; the rest runs in int8 (4-bit weights stored as int8)."""
    model, _ = quantized_deit_tiny("repq_vit", BitWidth(4, 4))
    sites = {site.layer: site for site in plan(model)}
    assert "post_softmax operand: non-uniform grid (LogSqrt2Quantizer" in sites["blocks.0.attn.matmul2"].reason
    assert sites["blocks.0.attn.qkv"].reason == sites["blocks.0.mlp.fc1"].reason == "input: fractional zero point (UniformQuantizer)"
    assert sites["blocks.0.attn.proj"].runs == sites["blocks.0.mlp.fc2"].runs == sites["head"].runs == "int8"
    weight = sites["head"].weight
    assert weight.values.dtype == torch.int8 and int(weight.values.abs().max()) <= 15 and not weight.offset.any()
    assert len(sites) == 74 and all(s.runs == "int8" or s.reason for s in sites.values())
    assert sum(s.runs == "int8" for s in sites.values()) == 26


def test_scales_spread_per_token_are_never_read_as_one_input_scale() -> None:
    """FIMA-Q spreads a per-tensor input scale over tokens after calibration (shape (N, 1)): the exported grid names
    the axis it varies along, and the site stays float instead of taking the first token's scale."""
    from ptq_bench.deploy.sites import input_grid
    from ptq_bench.quant.uniform import UniformQuantizer

    quantizer = UniformQuantizer(8, granularity="tensor")
    quantizer.calibrate(torch.randn(2, 5, 4))
    per_tensor = quantizer.export()
    assert per_tensor.axis is None and input_grid(quantizer)[0] is not None
    quantizer.scale = quantizer.scale.reshape(1, 1).expand(5, 1).clone() * torch.linspace(1, 2, 5).reshape(5, 1)
    spread = quantizer.export()
    assert spread.axis == -2 and "varies along dims [-2]" in spread.note
    grid, reason = input_grid(quantizer)
    assert grid is None and reason.startswith("input: per-channel activation grid")
