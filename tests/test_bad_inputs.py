"""Every bad input is one `error:` line naming the key or file, exit code 2, no traceback and no record.

One parametrized test per class of input (issue "nothing silent, nothing lost"): values that used to run silently
with a wrong meaning, values that used to end in a traceback, and bad files (checkpoints, images, results dir).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, make_image_folder, run_cli

#: The shipped MNIST model with a small budget; each case adds one bad override.
BASE = ["logger=none", "task.progress=false", "method=minmax", "method.calib_size=4", "data.max_eval_images=20"]


def assert_refused(result, tmp_path: Path, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    assert not list((tmp_path / "runs").glob("*.json")), "a record was written"


SILENTLY_WRONG = [
    ("bits.w=2.5", "bits.w=2.5: must be an integer"),
    ("method.calib_size=-7990", "method.calib_size=-7990: must be an integer >= 1"),
    ("method.calib_size=2.7", "method.calib_size=2.7: must be an integer"),
    ("data.max_eval_images=0", "data.max_eval_images=0: must be an integer >= 1"),
    ("data.max_eval_images=-5", "data.max_eval_images=-5"),
    ("data.train_count=-1", "data.train_count=-1"),
    ("force=maybe", "force='maybe': must be true or false"),
    ("seed=-1", "seed=-1: must be an integer >= 0"),
]


@pytest.mark.parametrize("override, phrase", SILENTLY_WRONG)
def test_values_that_used_to_run_with_a_wrong_meaning(tmp_path: Path, override: str, phrase: str) -> None:
    assert_refused(run_cli(*BASE, override, f"results_dir={tmp_path / 'runs'}"), tmp_path, phrase)


TRACEBACKS = [
    ("method.calib_size=0", "method.calib_size=0"),
    ("task.batch_size=0", "task.batch_size=0"),
    ("task.batch_size=-3", "task.batch_size=-3"),
    ("data.workers=-1", "data.workers"),
    ("seed=abc", "seed='abc'"),
    ("device=tpu", "device='tpu'"),
    ("data.mean=[0.1,0.2]", "data.mean"),
    ("data.std=[0]", "data.std=0"),
    ("+method.x=1", "has no option(s) x"),
    ("method.x=1", "has no option(s) x"),  # without +: refused before Hydra's struct error
    ("data.img_size=32", "data.img_size=32"),
    ("data.channels=3", "data.channels=3"),
    ("method.calib_size=9000", "method.calib_size=9000: the train split has only 8000 images"),
    ("data.crop_pct=0", "data.crop_pct=0"),
]


@pytest.mark.parametrize("override, phrase", TRACEBACKS)
def test_values_that_used_to_end_in_a_traceback(tmp_path: Path, override: str, phrase: str) -> None:
    assert_refused(run_cli(*BASE, override, f"results_dir={tmp_path / 'runs'}"), tmp_path, phrase)


def mnist_state(transform) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(REPO / "checkpoints" / "mnist_vit.safetensors"))
    return {k: transform(k, v) for k, v in state.items()}


def bomb_png(path: Path) -> Path:
    """A tiny PNG whose header claims 20000×20000 pixels (PIL refuses it as a decompression bomb)."""
    Image.new("L", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def bad_file_case(kind: str, tmp_path: Path) -> tuple[list[str], str]:
    if kind == "nan checkpoint":
        from safetensors.torch import save_file

        path = tmp_path / "nan.safetensors"
        save_file(mnist_state(lambda k, v: v.clone().fill_(float("nan")) if k == "blocks.1.attn.qkv.weight" else v), str(path))
        return [f"model.checkpoint={path}"], "contain NaN or Inf (first in 'blocks.1.attn.qkv.weight')"
    if kind == "inf checkpoint":
        from safetensors.torch import save_file

        path = tmp_path / "inf.safetensors"
        save_file(mnist_state(lambda k, v: v.clone().fill_(float("inf")) if k == "head.bias" else v), str(path))
        return [f"model.checkpoint={path}"], "'head.bias'"
    if kind == "integer checkpoint":
        path = tmp_path / "int.pth"
        torch.save(mnist_state(lambda k, v: v.to(torch.int64) if k == "head.weight" else v), path)
        return [f"model.checkpoint={path}"], "'head.weight' is int64 where the model has float32"
    if kind == "unwritable results dir":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a directory")
        return [f"results_dir={blocker / 'runs'}"], "results_dir="
    if kind == "decompression bomb":
        root = make_image_folder(tmp_path / "images", classes=10, per_class=2, size=28)  # the MNIST head's 10 classes
        bomb = bomb_png(root / "val" / "class_0" / "img_0.png")
        return ["data=folder", f"data.root={root}", "data.channels=1", "data.img_size=28", "data.mean=[0.5]", "data.std=[0.5]",
                "data.workers=0", "method=fp"], str(bomb)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan checkpoint", "inf checkpoint", "integer checkpoint", "unwritable results dir", "decompression bomb"])
def test_bad_files(tmp_path: Path, kind: str) -> None:
    args, phrase = bad_file_case(kind, tmp_path)
    if not any(arg.startswith("results_dir=") for arg in args):
        args.append(f"results_dir={tmp_path / 'runs'}")
    result = run_cli(*BASE, *args)
    assert_refused(result, tmp_path, phrase)


def test_a_damaged_record_of_the_resumed_run_is_set_aside_and_the_run_redone(tmp_path: Path) -> None:
    args = [*BASE, "method=fp", f"results_dir={tmp_path / 'runs'}"]
    assert run_cli(*args).returncode == 0
    (record,) = (tmp_path / "runs").glob("*.json")
    record.write_text('{"run_key": "truncat')
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert '"metrics"' in record.read_text()  # redone and rewritten
    assert len(list((tmp_path / "runs").glob("*.json.damaged-*"))) == 1


def test_an_eval_subset_larger_than_the_split_says_the_whole_split_is_evaluated(caplog) -> None:
    from tasks.classification import eval_subset

    split = list(range(10))
    with caplog.at_level("WARNING"):
        assert eval_subset(split, 50, seed=0) is split
    assert "data.max_eval_images=50 is more than the 10 images" in caplog.text
    assert len(eval_subset(split, 4, seed=0)) == 4
