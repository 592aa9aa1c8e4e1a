"""A user's own model: builder configs, its own input (no silent resize), builder errors, self-loaded weights, paths."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from conftest import REPO, make_image_folder
from ptq_bench.datasets import resolve_workers
from ptq_bench.paths import expand_path
from ptq_bench.errors import ConfigError
from ptq_bench.eval_transform import eval_transform, eval_transform_config
from ptq_bench.models.build import load_checkpoint_, state_dict_sha256

FAST = ["logger=none", "task.progress=false", "data.workers=0", "method=fp", "data.mean=[0.5]", "data.std=[0.5]"]
BUILDERS = '''
import torch
from timm.models.vision_transformer import VisionTransformer


def build(num_classes):
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=num_classes, embed_dim=32, depth=1,
                             num_heads=2)


def build_trained(path):
    model = build(3)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model
'''


def tiny_vit() -> torch.nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=32, depth=1, num_heads=2)


def run_cli(*args: str, pythonpath: Path, home: Path | None = None) -> subprocess.CompletedProcess:
    """``python run.py`` with ``pythonpath`` importable (and ``$HOME`` set to ``home``)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0",
           "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def only_record(runs: Path) -> dict:
    (path,) = runs.glob("*.json")
    return json.loads(path.read_text())


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def builders(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "mybuilders.py").write_text(BUILDERS)
    (folder / "broken.py").write_text("import missing_dependency_xyz\n")
    return folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("digits"), size=28)


def test_strict_builder_through_copied_config(tmp_path, builders, digits):
    config = (REPO / "conf/model/custom_vit.yaml").read_text()
    target = "    _target_: ptq_bench.custom_models.example_vit"
    assert target in config
    (tmp_path / "conf/model").mkdir(parents=True)
    (tmp_path / "conf/model/my_vit.yaml").write_text(
        config.replace("name: custom_vit", "name: my_vit").replace(target, "    _target_: mybuilders.build\n    num_classes: 3"))
    result = run_cli("--config-dir", str(tmp_path / "conf"), "model=my_vit", f"data.root={digits}",
                     f"results_dir={tmp_path / 'runs'}", *FAST, pythonpath=builders)
    assert result.returncode == 0, result.stderr
    record = only_record(tmp_path / "runs")
    assert record["model"]["transform"]["input_size"] == [1, 28, 28] and record["model"]["transform"]["crop_pct"] == 1.0
    assert record["config"]["data"]["img_size"] == 28 and record["config"]["data"]["channels"] == 1
    assert "eval transform" not in result.stdout + result.stderr  # 28x28 images: nothing resized

    # the same from the command line: the replacement target gets only the keys given to it
    result = run_cli("model=custom_vit", "model.builder._target_=mybuilders.build", "+model.builder.num_classes=3",
                     f"data.root={digits}", f"results_dir={tmp_path / 'cli'}", *FAST, pythonpath=builders)
    assert result.returncode == 0, result.stderr


def test_own_input_size_is_untouched():
    data = {"img_size": None, "channels": None, "mean": [0.5], "std": [0.5], "crop_pct": None, "interpolation": None}
    transform, config = eval_transform(tiny_vit(), data)
    assert data["img_size"] == 28 and data["channels"] == 1 and config["crop_pct"] == 1.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    expected = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])(image)
    assert torch.equal(transform(image), expected)


def test_resize_is_warned_once(caplog):
    data = {"img_size": None, "channels": 1, "mean": [0.5], "std": [0.5], "crop_pct": 0.875, "interpolation": None}
    transform, _ = eval_transform(tiny_vit(), data)
    image = Image.new("L", (28, 28))
    with caplog.at_level(logging.WARNING, logger="ptq_bench.eval_transform"):
        assert transform(image).shape == (1, 28, 28)
        transform(image)
    (warning,) = caplog.messages
    assert "28x28 images are resized (shorter side 32) and center-cropped to 28x28" in warning

    transform, _ = eval_transform(tiny_vit(), {**data, "crop_pct": None})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ptq_bench.eval_transform"):
        transform(Image.new("L", (40, 60)))
    assert "40x60 images are resized (shorter side 28)" in caplog.messages[0]


@pytest.mark.parametrize("key, value, phrase", [
    ("img_size", 32, "data.img_size=32 does not match the model's input size 28x28"),
    ("channels", 3, "data.channels=3 does not match the model's in_chans 1"),
])
def test_data_shape_is_checked_against_the_model(key, value, phrase):
    data = {"img_size": None, "channels": None, "mean": [0.5], "std": [0.5], "crop_pct": None, "interpolation": None}
    with pytest.raises(ConfigError, match=phrase):
        eval_transform(tiny_vit(), {**data, key: value})


def test_zoo_model_keeps_timms_transform():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    data = {"img_size": None, "channels": 3, "mean": None, "std": None, "crop_pct": None, "interpolation": None}
    assert eval_transform_config(model, data) == timm.data.resolve_data_config({}, model=model)
    transform, _ = eval_transform(model, data)
    assert [type(t).__name__ for t in transform.transforms] == ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"]
    assert data["img_size"] is None  # the data config (and so the run key) is left as it was


@pytest.mark.parametrize("target, phrase", [
    ("no_such_module.build", "cannot import builder 'no_such_module.build': no module named 'no_such_module'; "
                             "the builder's module must be importable"),
    ("mybuilders.nothere", "'mybuilders' has no attribute or submodule 'nothere'"),
    ("broken.build", "ModuleNotFoundError: No module named 'missing_dependency_xyz'"),
])
def test_builder_import_error_is_one_line_with_its_cause(tmp_path, builders, target, phrase):
    result = run_cli("model=custom_vit", f"model.builder._target_={target}", f"data.root={tmp_path}",
                     f"results_dir={tmp_path}", *FAST, pythonpath=builders)
    (line,) = error_lines(result)
    assert phrase in line, result.stderr


def test_builder_loaded_weights_are_not_random(tmp_path, builders, digits):
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "trained.pth")
    args = ["model=custom_vit", "model.builder._target_=mybuilders.build_trained",
            f"+model.builder.path={tmp_path / 'trained.pth'}", f"data.root={digits}", *FAST]
    result = run_cli(*args, "model.weights=builder", f"results_dir={tmp_path / 'builder'}", pythonpath=builders)
    assert result.returncode == 0, result.stderr
    record = only_record(tmp_path / "builder")["model"]
    assert record["random_init"] is False and record["weights_sha256"] == state_dict_sha256(model)
    assert "random weights" not in result.stdout + result.stderr

    result = run_cli(*args, f"results_dir={tmp_path / 'default'}", pythonpath=builders)  # not declared: as before
    assert result.returncode == 0 and only_record(tmp_path / "default")["model"]["random_init"] is True


def test_home_and_variables_expand(tmp_path, monkeypatch, builders, digits):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA", "/data")
    assert expand_path("~/x.pth") == tmp_path / "x.pth" and expand_path("$DATA/imagenet") == Path("/data/imagenet")

    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "digits").symlink_to(digits)
    result = run_cli("model=custom_vit", "model.builder._target_=mybuilders.build", "+model.builder.num_classes=3",
                     "model.checkpoint='~/vit.pth'", "data.root='$HOME/digits'", f"results_dir={tmp_path / 'runs'}",
                     *FAST, pythonpath=builders, home=tmp_path)
    assert result.returncode == 0, result.stderr
    record = only_record(tmp_path / "runs")["model"]
    assert record["checkpoint"] == str(tmp_path / "vit.pth") and record["random_init"] is False


def test_resolve_workers(monkeypatch):
    assert resolve_workers(3) == 3 and resolve_workers(0) == 0
    for cpus, expected in ((1, 0), (2, 1), (4, 3), (64, 8)):
        monkeypatch.setattr("ptq_bench.datasets.available_cpus", lambda cpus=cpus: cpus)
        assert resolve_workers("auto") == expected and resolve_workers(None) == expected
    for bad in (-1, "four", 2.5):
        with pytest.raises(ConfigError, match="data.workers"):
            resolve_workers(bad)


def test_converted_checkpoint_loads(tmp_path):
    model = tiny_vit()
    foreign = {}
    for key, value in model.state_dict().items():  # timm names → the converter's example codebase
        for timm_name, theirs in (("patch_embed.proj.", "patch_embedding.conv."), ("cls_token", "class_token"),
                                  ("pos_embed", "position_embedding"), ("blocks.", "encoder.layers."),
                                  (".attn.", ".attention."), (".mlp.fc", ".mlp.linear"), ("head.", "classifier.")):
            key = key.replace(timm_name, theirs)
        foreign["encoder.norm." + key[5:] if key.startswith("norm.") else key] = value
    foreign["aux.weight"] = torch.zeros(1)
    torch.save({"model": foreign}, tmp_path / "theirs.pth")
    script = REPO / "scripts/convert_checkpoint_example.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "theirs.pth"), str(tmp_path / "ours.safetensors"),
                             "--drop", r"^aux\."], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    converted = tiny_vit()
    load_checkpoint_(converted, tmp_path / "ours.safetensors")
    assert state_dict_sha256(converted) == state_dict_sha256(model)
    assert set(load_file(str(tmp_path / "ours.safetensors"))) == set(model.state_dict())
