"""Quantizer placement as data: a quantizer registered from this test module is selected by methods that were not
touched (minmax through ``quantizers``, repq_vit through its ``softmax_quantizer``), placements are checked up
front, and every quantizer exports its grid and declares what it learns and folds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from ptq_bench.bits import BitWidth
from ptq_bench.calibration import image_calibration
from ptq_bench.errors import ConfigError
from ptq_bench.methods import build_method
from ptq_bench.methods.options import method_defaults
from ptq_bench.models import named_quantizers
from ptq_bench.quant import QUANTIZERS, UniformQuantizer
from ptq_bench.quant.base import QuantGrid, Quantizer
from ptq_bench.quant.dfq import DFQOptions, DynamicFocusingQuantizer
from ptq_bench.quant.log import Log2Quantizer, LogSqrt2Quantizer
from ptq_bench.quant.tanq import TanQOptions, TanQuantizer
from ptq_bench.quant.twin_uniform import TwinGeluQuantizer, TwinSoftmaxQuantizer
from tests.conftest import REPO, run_cli


@dataclass(frozen=True)
class ToyOptions:
    levels_above_zero: int = 3


class ToyQuantizer(Quantizer):
    """A post-Softmax quantizer defined outside the package: a fixed grid {0, 1/k, ..., 1} (k from its options)."""

    Options = ToyOptions
    capabilities = frozenset({"post_softmax"})

    def calibrate(self, x: torch.Tensor) -> None:
        self.seen = tuple(x.shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        k = self.options.levels_above_zero
        return torch.round(x.clamp(0, 1) * k) / k

    def export(self) -> QuantGrid:
        k = self.options.levels_above_zero
        return QuantGrid("non_uniform", self.bits, levels=torch.arange(k + 1) / k)


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    if "toy" not in QUANTIZERS:
        QUANTIZERS.register("toy")(ToyQuantizer)
    yield


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.randn((n, 3, 32, 32), generator=torch.Generator().manual_seed(1))


def softmax_quantizers(model: torch.nn.Module) -> list[Quantizer]:
    return [q for _, q in named_quantizers(model) if q.role == "post_softmax"]


@pytest.mark.parametrize("method, options", [
    ("minmax", {"quantizers": {"post_softmax": {"name": "toy", "levels_above_zero": 5}}}),
    ("repq_vit", {"softmax_quantizer": "toy"}),
])
def test_a_quantizer_registered_in_a_test_is_selected_by_untouched_methods(method: str, options: dict[str, Any]) -> None:
    model = build_method(method, BitWidth(4, 4), **options).quantize(tiny_vit(), image_calibration(images()))
    toys = softmax_quantizers(model)
    assert len(toys) == 2 and all(isinstance(q, ToyQuantizer) and q.calibrated for q in toys)
    assert toys[0].seen == (4, 3, 17, 17)  # it quantized the attention map of the calibration batch
    assert toys[0].options.levels_above_zero == (5 if method == "minmax" else 3)
    logits = model(images(2))
    assert torch.isfinite(logits).all()


def test_quantizers_enter_the_identity_only_when_set() -> None:
    plain = build_method("minmax", BitWidth(4, 4))
    chosen = build_method("minmax", BitWidth(4, 4), quantizers={"post_gelu": "twin_gelu", "post_softmax": {"name": "toy"}})
    assert "quantizers" not in plain.identity()  # run keys of earlier runs unchanged
    assert chosen.identity()["quantizers"] == {"post_gelu": {"name": "twin_gelu"},  # every option, defaults too
                                               "post_softmax": {"name": "toy", "levels_above_zero": 3}}
    explicit = build_method("minmax", BitWidth(4, 4), quantizers={"post_softmax": {"name": "toy", "levels_above_zero": 3}})
    assert explicit.identity()["quantizers"]["post_softmax"] == chosen.identity()["quantizers"]["post_softmax"]


@pytest.mark.parametrize("method, options, message", [
    ("minmax", {"quantizers": {"weight": "log2"}}, "method.quantizers.weight='log2' (minmax): cannot quantize weight tensors"),
    ("minmax", {"quantizers": {"post_gelu": "twin_softmax"}}, "cannot quantize post_gelu tensors"),
    ("minmax", {"quantizers": {"post_softmax": "nope"}}, "no such quantizer"),
    ("minmax", {"quantizers": {"attention": "uniform"}}, "unknown quantization role(s) attention"),
    ("minmax", {"quantizers": {"post_softmax": {"name": "tanq", "alphas": "x"}}}, "TanQuantizer.alphas='x': expected a list"),
    ("minmax", {"quantizers": {"post_softmax": 3}}, "a quantizer name, or a mapping"),
    ("repq_vit", {"quantizers": {"post_softmax": "log2"}}, "chooses this quantizer with method.softmax_quantizer"),
    ("repq_vit", {"quantizers": {"post_layernorm": {"name": "uniform", "granularity": "tensor"}}}, "cannot be folded"),
    ("repq_vit", {"softmax_quantizer": "twin_gelu"}, "method.softmax_quantizer='twin_gelu' (repq_vit): cannot quantize post_softmax"),
    ("ptq4vit", {"quantizers": {"post_gelu": "uniform"}}, "takes no other quantizers"),
])
def test_bad_placements_are_refused_before_any_work(method: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_method(method, BitWidth(4, 4), **options)


def test_quantizer_defaults_live_in_the_options_dataclass_only() -> None:
    dopq, aiqvit = method_defaults("dopq_vit"), method_defaults("aiqvit")
    assert dopq["tanq_alphas"] == [0.25 * k for k in range(1, 13)] == list(TanQOptions().alphas)  # the values of before
    assert dopq["tanq_centers"] == [0.5] and dopq["tanq_granularity"] == "tensor" == TanQOptions().granularity
    assert (aiqvit["dfq_init"], aiqvit["dfq_below"]) == ("mse", "b1") == (DFQOptions().init, DFQOptions().below)
    for name in ("dopq_vit", "aiqvit"):  # the YAML refers to the default instead of restating it
        text = (REPO / "conf" / "method" / f"{name}.yaml").read_text()
        assert "${quantizer_default:" in text
    assert "0.25, 0.5" not in (REPO / "conf" / "method" / "dopq_vit.yaml").read_text()


def calibrated(quantizer: Quantizer, x: torch.Tensor) -> Quantizer:
    quantizer.calibrating = True
    quantizer(x)
    quantizer.calibrating = False
    return quantizer


def test_uniform_export_is_its_affine_grid() -> None:
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    q = calibrated(UniformQuantizer(4, granularity="channel", channel_dim=0), w)
    grid = q.export()
    assert (grid.kind, grid.bits, grid.axis, grid.qmin, grid.qmax) == ("affine", 4, 0, 0, 15) and grid.integer_zero_point
    integers = torch.clamp(torch.round(w / grid.scale) + grid.zero_point, grid.qmin, grid.qmax)
    assert torch.equal((integers - grid.zero_point) * grid.scale, q(w))  # the grid reproduces the fake quantizer
    assert UniformQuantizer(8, granularity="token").export().kind == "dynamic_affine"
    assert q.learnable_parameters() == {"scale": "step_size"} and not q.foldable
    assert UniformQuantizer(4, granularity="channel", channel_dim=-1).foldable


@pytest.mark.parametrize("quantizer", [
    LogSqrt2Quantizer(4), Log2Quantizer(3), TanQuantizer(3), TwinSoftmaxQuantizer(4), DynamicFocusingQuantizer(3, below="zero"),
])
def test_non_uniform_export_lists_every_value_the_quantizer_outputs(quantizer: Quantizer) -> None:
    attention = torch.softmax(3 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    calibrated(quantizer, attention)
    grid = quantizer.export()
    assert grid.kind == "non_uniform" and grid.levels.numel() <= 2**quantizer.bits + 1
    outputs = quantizer(attention).unique()
    assert torch.isin(outputs, grid.levels.flatten()).all()


def test_twin_gelu_and_dfq_exports() -> None:
    x = torch.nn.functional.gelu(2 * torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    gelu = calibrated(TwinGeluQuantizer(4), x)
    assert torch.isin(gelu(x).unique(), gelu.export().levels).all()
    dfq = calibrated(DynamicFocusingQuantizer(3), torch.rand(64, generator=torch.Generator().manual_seed(0)))
    grid = dfq.export()
    assert grid.kind == "affine" and grid.integer_zero_point and (grid.qmin, grid.qmax) == (0, 7)
    assert dfq.learnable_parameters() == {"b1": "range", "b2": "range"}


@pytest.mark.slow
def test_cli_quantizers_option_labels_the_record(tmp_path) -> None:
    result = run_cli("method=minmax", "bits=w8a8", "budget=smoke", "data.max_eval_images=64", "logger=none",
                     f"results_dir={tmp_path}", "method.quantizers={post_gelu: log2}")
    assert result.returncode != 0 and "cannot quantize post_gelu tensors" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("*.json"))
    result = run_cli("method=minmax", "bits=w8a8", "budget=smoke", "data.max_eval_images=64", "logger=none",
                     f"results_dir={tmp_path}", "method.quantizers={post_softmax: log2}")
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["option_changes"] == {"quantizers": {"post_softmax": "log2"}} and record["transforms"] == []
    assert record["method_label"].startswith("minmax [quantizers={post_softmax:log2}")
    matmul2 = next(m for m in record["quantized"] if m["module"] == "blocks.0.attn.matmul2")
    assert matmul2["quantizers"]["quantizer_a"]["quantizer"] == "Log2Quantizer"
