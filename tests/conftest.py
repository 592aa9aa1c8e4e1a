"""Shared fixtures: a generated ImageFolder dataset, CLI runner, quiet wandb, single-threaded torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# tests/pins.py holds the pin tests' shared assertions: pytest explains their failures as it does a test's
pytest.register_assert_rewrite("pins")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)


#: The first ImageNet-1k wnids in timm's class order (timm/data/_info/imagenet_synsets.txt): folder names that an
#: ImageNet-1k model's label map accepts (ptq_bench/labels.py).
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40, seed: int = 0,
                      names: Sequence[str] | None = None) -> Path:
    """``root/{train,val}/<name>/img_i.png`` with random RGB images; names ``class_k`` unless ``names`` are given."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / (names[c] if names else f"class_{c}")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three ImageNet-1k wnid classes: data for an ImageNet-1k model (a class subset) and for a 3-class model."""
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"), names=WNIDS)


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python run.py <args>`` as a user would; returns the completed process (text output)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
