"""Bad input gives a one-line ``error: ...`` naming the problem and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from conftest import REPO, WNIDS, make_image_folder, run_cli

FAST = ["logger=none", "task.progress=false", "data.workers=0", "method.calib_size=2"]


def assert_clean_error(result, *phrases: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")] or result.stderr.splitlines()
    text = " ".join(error_lines)
    for phrase in phrases:
        assert phrase in text, result.stderr


def folder_args(root: Path, tmp_path: Path) -> list[str]:
    return ["model=deit_tiny", "data=imagenet", f"data.root={root}", f"results_dir={tmp_path / 'runs'}", *FAST]


def test_unknown_model_config(tmp_path):
    assert_clean_error(run_cli("model=not_a_model", f"results_dir={tmp_path}"), "unknown model 'not_a_model'")


def test_unknown_timm_architecture(tmp_path, image_folder_root):
    args = folder_args(image_folder_root, tmp_path) + ["model.builder.model_name=vit_imaginary_patch3"]
    assert_clean_error(run_cli(*args), "unknown timm model", "vit_imaginary_patch3")


def test_unknown_method_name(tmp_path):
    assert_clean_error(run_cli("method=magic", f"results_dir={tmp_path}"), "unknown method 'magic'")
    assert_clean_error(run_cli("method.name=magic", f"results_dir={tmp_path}", *FAST), "unknown method 'magic'")


@pytest.mark.parametrize("override, phrase", [("bits.w=9", "weight bit-width 9"), ("bits.a=1", "activation bit-width 1"), ("bits.w=four", "bits.w='four': must be an integer")])
def test_impossible_bit_width(tmp_path, override, phrase):
    assert_clean_error(run_cli(override, f"results_dir={tmp_path}", *FAST), phrase)


def test_missing_data_root(tmp_path):
    assert_clean_error(run_cli("model=deit_tiny", "data=imagenet", f"results_dir={tmp_path}", *FAST), "data.root")
    # the README/issue form: an ImageNet model selects data=imagenet by itself
    result = run_cli("model=deit_small", "method=minmax", "bits=w4a4", f"data.root={tmp_path / 'nowhere'}", f"results_dir={tmp_path}", *FAST)
    assert_clean_error(result, "dataset root not found", "nowhere")


def test_empty_split(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=1, per_class=1, names=WNIDS)
    for image in (root / "val").rglob("*.png"):
        image.unlink()
    assert_clean_error(run_cli(*folder_args(root, tmp_path)), "split 'val' is empty")


def test_corrupt_image_through_a_worker_process(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=1, per_class=2, names=WNIDS)
    bad = root / "val" / WNIDS[0] / "img_1.png"
    bad.write_bytes(b"this is not a png")
    result = run_cli(*folder_args(root, tmp_path), "data.workers=1", "method=fp")
    assert_clean_error(result, "corrupt or unreadable image", str(bad))


def test_checkpoint_that_does_not_fit(tmp_path, image_folder_root):
    other = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1)
    path = tmp_path / "vit_small.pth"
    torch.save({"model": other.state_dict()}, path)
    result = run_cli(*folder_args(image_folder_root, tmp_path), f"model.checkpoint={path}")
    assert_clean_error(result, "does not fit the model", "wrong shape")
    assert_clean_error(run_cli(*folder_args(image_folder_root, tmp_path), f"model.checkpoint={tmp_path / 'no.pth'}"), "checkpoint not found")


@pytest.mark.parametrize("arg, phrase", [
    ("+experiment=nonexistent", "unknown experiment 'nonexistent' (known: aiqvit_table1, "),
    ("+experiment=demo_table,repqvit_tabel1", "unknown experiment 'repqvit_tabel1'"),
    ("experiment=nonexistent", "unknown experiment 'nonexistent'"),
    ("experiment=demo_table", "write +experiment=demo_table"),
])
def test_unknown_experiment_is_one_line_before_any_work(tmp_path, arg, phrase):
    result = run_cli(arg, f"results_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert_clean_error(result, phrase)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert not any(tmp_path.iterdir())  # no Hydra output folder, no results folder


@pytest.mark.parametrize("arg, phrase", [
    ("model=not_a_model", "unknown model 'not_a_model' (known: cascade_mask_rcnn_swin_s, "),
    ("method=fp,magic", f"unknown method 'magic' (known: {', '.join(sorted(p.stem for p in (REPO / 'conf' / 'method').glob('*.yaml')))})"),
    ("bits=w5a5", "unknown bits 'w5a5' (known: "),
    ("+experiments=demo_table", "unknown config key 'experiments' (top-level keys: "),
    ("+methd.iters=3", "unknown config key 'methd'"),
])
def test_unknown_config_choice_is_one_line_before_any_work(tmp_path, arg, phrase):
    result = run_cli("-m", arg, f"results_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert_clean_error(result, phrase)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert not any(tmp_path.iterdir())


def test_config_choices_from_a_config_dir_are_known(tmp_path):
    """A group's configs in a ``--config-dir`` folder count as known; an unknown one there is still one line."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "my_vit.yaml").write_text("name: my_vit\n")
    result = run_cli("--config-dir", str(tmp_path / "conf"), "model=my_vt", f"results_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert_clean_error(result, "unknown model 'my_vt' (known: ", "my_vit")
