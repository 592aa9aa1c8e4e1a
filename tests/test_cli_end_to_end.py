"""The CLI end to end: a generated ImageFolder with random-init DeiT-T and a custom architecture, resume,
the report tool, and the embedded MNIST demo sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

QUIET = ["logger=none", "task.progress=false", "data.workers=0"]
MNIST_CHECKPOINT = REPO / "checkpoints" / "mnist_vit.safetensors"


def records(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def test_folder_run_writes_a_record_resumes_and_reports(tmp_path, image_folder_root):
    runs = tmp_path / "runs"
    args = ["model=deit_tiny", "data=imagenet", f"data.root={image_folder_root}", "method=minmax", "bits=w4a4",
            "method.calib_size=2", "task.compare_fp=true", f"results_dir={runs}", f"hydra.run.dir={tmp_path / 'out'}", *QUIET]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    (record,) = records(runs)
    assert record["model"]["name"] == "deit_tiny" and len(record["model"]["weights_sha256"]) == 64
    assert record["bits"] == {"w": 4, "a": 4, "label": "W4A4"}
    assert len(record["calibration"]["indices"]) == 2 and record["metrics"]["num_images"] == 12
    assert record["env"]["packages"]["torch"] and "commit" in record["env"]["git"]
    assert record["config"]["method"]["name"] == "minmax" and record["timings"]["eval_s"] > 0
    assert record["model"]["transform"]["crop_pct"] == 0.9  # timm's pretrained config for this model
    assert 0 <= record["metrics"]["fp_top1_agreement"] <= 100 and -1 <= record["metrics"]["logit_cosine"] <= 1
    before = (runs / f"{record['run_key']}.json").stat().st_mtime_ns

    second = run_cli(*args)
    assert second.returncode == 0 and "skipped" in second.stdout + second.stderr
    assert (runs / f"{record['run_key']}.json").stat().st_mtime_ns == before

    out = tmp_path / "tables"
    report = subprocess.run([sys.executable, "-m", "ptq_bench.report", "--runs", str(runs), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "DeiT-T" in report.stdout and "minmax" in report.stdout
    assert {p.suffix for p in out.iterdir()} >= {".md", ".tex", ".csv"}


def test_custom_architecture_and_transform_from_config(tmp_path, image_folder_root):
    result = run_cli(
        "model=custom_vit", "+model.builder.img_size=32", "+model.builder.patch_size=8", "+model.builder.depth=1",
        "+model.builder.embed_dim=48", "+model.builder.num_classes=3", "data=folder", f"data.root={image_folder_root}",
        "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "data.crop_pct=1.0",
        "method=minmax", "bits.w=5", "bits.a=7", "method.calib_size=3", f"results_dir={tmp_path}", *QUIET)
    assert result.returncode == 0, result.stderr
    (record,) = records(tmp_path)
    assert record["bits"]["label"] == "W5A7" and record["model"]["transform"]["input_size"] == [3, 32, 32]


@pytest.mark.skipif(not MNIST_CHECKPOINT.is_file(), reason="train it with scripts/train_mnist_vit.py")
def test_mnist_demo_sweep_gives_a_table(tmp_path):
    runs, sweep = tmp_path / "runs", tmp_path / "sweep"
    result = run_cli("-m", "method=fp,minmax", "bits=w8a8,w4a4", f"results_dir={runs}", f"hydra.sweep.dir={sweep}", *QUIET)
    assert result.returncode == 0, result.stderr
    by_cell = {(r["method"]["name"], (r["bits"] or {}).get("label")): r["metrics"]["top1"] for r in records(runs)}
    assert set(by_cell) == {("fp", None), ("minmax", "W8A8"), ("minmax", "W4A4")}  # FP ran once, not per bit-width
    fp = by_cell[("fp", None)]
    assert fp > 90.0  # the shipped model really learned the digits
    assert abs(by_cell[("minmax", "W8A8")] - fp) < 1.5  # 8-bit MinMax is near-lossless
    assert by_cell[("minmax", "W4A4")] < by_cell[("minmax", "W8A8")]
    assert "| minmax" in result.stdout and "W4A4" in result.stdout and "MNIST-ViT" in result.stdout
    assert (sweep / "report.md").is_file() and (sweep / "report.tex").is_file()
