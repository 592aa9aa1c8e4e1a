"""Ablation of DopQ-ViT and AIQViT components against RepQ-ViT at W4A4 and W3A3, on the shipped MNIST ViT and a
random-init DeiT-T, with identical calibration data per model; one table per metric from the report tool.

DeiT-T is random-init (no weights can be downloaded here), evaluated on generated images, so its metric is the
label-free fidelity to the FP model (top-1 agreement); MNIST uses real top-1. Budgets are CPU-sized and equal for
both models (32 calibration images, 20-40 iterations per block): the table shows what each component does at this budget,
not the papers' ImageNet numbers.

    python benchmarks/ablation_seed_methods.py [--out results/ablations] [--runs results/ablations/runs] [--device auto]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BUDGET = {
    "repq_vit": ["method.calib_size=32"],
    "dopq_vit": ["method.calib_size=32", "method.iters=30"],
    "aiqvit": ["method.calib_size=32", "method.search_iters=20", "method.iters=40"],
}
VARIANTS = [
    ("repq_vit", []),
    ("dopq_vit", []),
    ("dopq_vit", ["method.softmax_quantizer=log_sqrt2"]),
    ("dopq_vit", ["method.scale_factor=mean"]),
    ("dopq_vit", ["method.reconstruction=false"]),
    ("aiqvit", []),
    ("aiqvit", ["method.rank=20"]),
    ("aiqvit", ["method.softmax_quantizer=log2"]),
    ("aiqvit", ["method.curriculum=false"]),
    ("aiqvit", ["method.lowrank=false"]),
]


def noise_folder(root: Path, classes: int = 10, per_class: int = 20, seed: int = 0) -> Path:
    """Generated 224x224 RGB images in ImageFolder layout (train and val)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                smooth = rng.normal(size=(8, 8, 3)).repeat(28, 0).repeat(28, 1) * 60 + 128
                pixels = np.clip(smooth + rng.normal(scale=20, size=smooth.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "ablations")
    parser.add_argument("--runs", type=Path, default=None)
    parser.add_argument("--models", nargs="+", default=["mnist_vit", "deit_tiny"])
    parser.add_argument("--device", default="auto", help="the runs' device= (auto: cuda when available)")
    args = parser.parse_args()
    runs = args.runs or args.out / "runs"
    data = {
        "mnist_vit": [],
        "deit_tiny": ["data=folder", f"data.root={noise_folder(args.out / 'noise_images')}", "data.workers=0"],
    }
    common = ["logger=none", "task.progress=false", "task.compare_fp=true", f"results_dir={runs}", "bits=w4a4,w3a3",
              f"device={args.device}"]
    for model in args.models:
        for method, options in VARIANTS:
            command = [sys.executable, str(REPO / "run.py"), "-m", f"model={model}", f"method={method}",
                       *BUDGET[method], *options, *data[model], *common,
                       f"hydra.sweep.dir={args.out / 'sweeps' / model / '_'.join([method, *options]).replace('=', '-')}"]
            print(" ".join(command[2:]), flush=True)
            subprocess.run(command, cwd=REPO, check=True)
    for metric in ("top1", "fp_top1_agreement", "logit_cosine"):
        subprocess.run([sys.executable, "-m", "ptq_bench.report", "--runs", str(runs), "--out", str(args.out),
                        "--name", f"ablation_{metric}", "--metric", metric], cwd=REPO, check=True)


if __name__ == "__main__":
    main()
