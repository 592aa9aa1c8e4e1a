"""Datasets: ImageNet-style image folders and the MNIST test set shipped with the repository."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ptq_bench.errors import ConfigError, DataError
from ptq_bench.paths import expand_path
from ptq_bench.labels import LabelMap

#: At most this many DataLoader workers when ``data.workers`` is ``auto``.
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS reports it, as torch's DataLoader counts them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(value: int | str | None, cap: int = MAX_AUTO_WORKERS) -> int:
    """DataLoader workers for ``data.workers``: an integer >= 0 as given; ``auto``/null: one per CPU beyond the first
    (the main process runs the model), at most ``cap``; 0 on a single CPU."""
    if value is None or value == "auto":
        return max(0, min(cap, available_cpus() - 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.workers must be an integer >= 0 or auto, got {value!r}")
    return value


def image_loader(mode: str) -> Callable[[str], Image.Image]:
    """A PIL loader that converts to ``mode`` and turns an unreadable file into a one-line DataError."""

    def load(path: str) -> Image.Image:
        try:
            with open(path, "rb") as handle:
                image = Image.open(handle)
                return image.convert(mode)
        except Image.DecompressionBombError:
            raise DataError(f"image too large to decode safely (PIL decompression-bomb limit): {path}") from None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            raise DataError(f"corrupt or unreadable image: {path} ({type(error).__name__})") from None

    return load


class MappedImageFolder(ImageFolder):
    """An ``ImageFolder`` whose targets are the head's indices of its class folders (``label_map``), not their rank
    among the folders present; a folder not in the map is a one-line DataError. Samples keep ImageFolder's order
    (folders by name, files by name), so calibration indices draw the same images whatever the map."""

    def __init__(self, root: str, label_map: LabelMap, where: str, **kwargs: Any) -> None:
        self.label_map, self.where = label_map, where
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes, _ = super().find_classes(directory)
        return classes, self.label_map.class_to_idx(classes, self.where)


def image_folder(root: str | Path, split: str, transform: Callable, channels: int = 3, label_map: LabelMap | None = None) -> ImageFolder:
    """``<root>/<split>/<class>/<image>``; raises DataError for a missing root/split or an empty split. With
    ``label_map``, targets are the map's indices and a class folder not in it is refused
    (:class:`MappedImageFolder`); without, the folders present are numbered in sorted order."""
    root = expand_path(root)
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"split '{split}' not found: {split_dir} is not a directory")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"image folders support 1 or 3 channels, got {channels}")
    try:
        if label_map is None:
            return ImageFolder(str(split_dir), transform=transform, loader=image_loader(mode))
        return MappedImageFolder(str(split_dir), label_map, f"split '{split}'", transform=transform, loader=image_loader(mode))
    except FileNotFoundError:
        raise DataError(f"split '{split}' is empty: no class folders with images in {split_dir}") from None


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format: magic, dims, big-endian uint8 payload)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class MnistIdx(Dataset):
    """The MNIST test set (10,000 images) split by index: ``train`` = the first ``train_count``, ``val`` = the rest.

    Images are returned through ``transform`` as PIL images (mode "L"), like an image folder would.
    """

    def __init__(self, root: str | Path, split: str, transform: Optional[Callable] = None, train_count: int = 8000) -> None:
        root = expand_path(root)
        images_file, labels_file = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
        for path in (images_file, labels_file):
            if not path.is_file():
                raise DataError(f"MNIST file not found: {path}")
        images, labels = _read_idx(images_file), _read_idx(labels_file)
        if split not in ("train", "val"):
            raise DataError(f"unknown MNIST split '{split}' (train, val)")
        part = slice(0, train_count) if split == "train" else slice(train_count, None)
        self.images, self.labels = images[part], labels[part].astype(np.int64)
        if len(self.images) == 0:
            raise DataError(f"MNIST split '{split}' is empty (train_count={train_count})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index], mode="L")
        return (self.transform(image) if self.transform else image), int(self.labels[index])
