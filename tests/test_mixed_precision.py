"""Per-layer bit-widths (``bits.layers``): the matched layers' quantizers are built at their bits (grids of that
size), a map that sets every layer to W8A8 reproduces the uniform W8A8 run exactly, the map enters the run key and
the table label (never the uniform cell), and bad maps are refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from ptq_bench.bits import BitWidth, layer_bits
from ptq_bench.calibration import image_calibration
from ptq_bench.errors import ConfigError
from ptq_bench.methods import build_method
from ptq_bench.models import named_quantizers
from tests.conftest import run_cli

QUIET = ["logger=none", "task.progress=false", "data.max_eval_images=500"]


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()


def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["minmax", "repq_vit"])
def test_matched_layers_get_their_bits_and_grids(method):
    bits = BitWidth(4, 4, layer_bits({"head": "W8A8", "blocks.0.*": "A6", "blocks.1.mlp.fc2": {"w": 3}}))
    model = build_method(method, bits).quantize(tiny_vit(), image_calibration(images()))
    expected = {"head": (8, 8), "blocks.1.mlp.fc2": (3, 4)}
    checked = 0
    for name, quantizer in named_quantizers(model):
        if not quantizer.enabled:
            continue
        layer = name.rsplit(".", 1)[0]
        if layer == "patch_embed.proj" and quantizer.role != "weight" and method == "repq_vit":
            continue  # RepQ-ViT's patch-embedding input is a fixed 8 bits, whatever the run's bits
        w, a = expected.get(layer, (4, 6) if layer.startswith("blocks.0.") else (4, 4))
        want = w if quantizer.role == "weight" else a
        grid = quantizer.export()
        assert quantizer.bits == grid.bits == want, (name, quantizer.bits, want)
        if grid.kind == "affine":  # the fitted grid really has 2**bits levels
            assert grid.qmax - grid.qmin + 1 == 2**want, name
        checked += 1
    assert checked > 20


def test_rules_in_order_first_match_wins_and_bad_maps_are_one_line(tmp_path):
    bits = BitWidth(4, 4, layer_bits({"blocks.0.attn.qkv": "W6", "blocks.0.*": "W8A8"}))
    assert (bits.for_layer("blocks.0.attn.qkv"), bits.for_layer("blocks.0.mlp.fc1")) == (BitWidth(6, 4), BitWidth(8, 8))
    path = tmp_path / "mp.yaml"
    path.write_text("head: W8A8\n'blocks.*.attn.qkv': A8\n")
    assert BitWidth(4, 4, layer_bits(str(path))).layers_record() == [["head", "W8A8"], ["blocks.*.attn.qkv", "A8"]]
    for bad in ({"head": "8"}, {"head": {"w": 9}}, {"head": {"bits": 8}}, [1, 2], str(tmp_path / "none.yaml")):
        with pytest.raises(ConfigError):
            layer_bits(bad)
    shadowed = BitWidth(4, 4, layer_bits({"blocks.*": "W8A8", "blocks.0.attn.qkv": "W6"}))
    with pytest.raises(ConfigError, match="'blocks.0.attn.qkv' set.s. the bits of no quantized layer"):
        build_method("minmax", shadowed).quantize(tiny_vit(), image_calibration(images()))


def test_cli_all_layers_w8a8_equals_uniform_w8a8_and_keys_apart(tmp_path):
    runs = tmp_path / "runs"
    common = ["method=minmax", f"results_dir={runs}", *QUIET]
    assert run_cli(*common, "bits=w8a8").returncode == 0
    every_layer = tmp_path / "all_w8a8.yaml"
    every_layer.write_text("'*': W8A8\n")  # Hydra's override grammar takes no '*' key: a file
    mixed = run_cli(*common, "bits=w4a4", f"bits.layers={every_layer}")
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    records = {len(r["bits"].get("layers", [])): r for r in (json.loads(p.read_text()) for p in Path(runs).glob("*.json"))}
    uniform, every = records[0], records[1]
    assert every["metrics"]["top1"] == uniform["metrics"]["top1"]
    assert every["run_key"] != uniform["run_key"] and every["bits"]["layers"] == [["*", "W8A8"]]
    assert every["method_label"] == "minmax [eval 500 imgs; layers: *=W8A8]"
    assert {q["bits"] for m in every["quantized"] for q in m["quantizers"].values()} == {8}


@pytest.mark.parametrize("args, message", [
    (["method=ptq4vit", "bits.layers={head:W8A8}"], "method ptq4vit does not take per-layer bit-widths"),
    (["method=minmax", "bits.layers={heads:W8A8}"], "'heads' matches no module of the model"),
    (["method=minmax", "bits.layers={head:W9}"], "must be an integer in 2..8"),
])
def test_cli_refuses_bad_maps_in_one_line(tmp_path, args, message):
    result = run_cli(*args, f"results_dir={tmp_path}", *QUIET)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and not list(tmp_path.glob("*.json"))
