"""Image classification: ImageNet-style folders or the shipped MNIST split; metric top-1/top-5 accuracy.

Calibration images are drawn from the train split with a seeded generator (their indices go into the record);
the evaluation transform is timm's pretrained config for zoo models, the model's own input size otherwise
(ptq_bench/eval_transform.py), overridden by the data config. Image-folder labels are the head's indices of the
class folders through a label map (ptq_bench/labels.py: ImageNet-1k wnids, ``data.class_map``, or the folder order
when the counts match), checked against the head before any work.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ptq_bench.calibration import CalibrationData, tensor_sha256
from ptq_bench.checks import boolean, choice, integer, number, optional_integer
from ptq_bench.datasets import MnistIdx, image_folder, resolve_workers
from ptq_bench.errors import ConfigError, DataError, NumericalError
from ptq_bench.eval_transform import eval_transform
from ptq_bench.labels import (
    DEFAULT_LABELS,
    FOLDER_ORDER,
    LABEL_SOURCES,
    MNIST_CLASSES,
    LabelMap,
    choose,
    folder_order,
    head_outputs,
)
from ptq_bench.models.build import ModelInfo, build_model
from tasks import TASKS
from tasks.base import Task

log = logging.getLogger(__name__)

#: Interpolations timm's eval transform accepts.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def make_dataset(data_cfg: DictConfig, split: str, transform: Any, label_map: LabelMap | None = None) -> Dataset:
    """A split of the data; image folders take their targets from ``label_map`` (None: the folders' sorted order)."""
    kind = data_cfg.kind
    if kind == "imagefolder":
        return image_folder(data_cfg.root, split, transform, channels=int(data_cfg.channels), label_map=label_map)
    if kind == "mnist":
        return MnistIdx(data_cfg.root, "train" if split == data_cfg.train_split else "val", transform, int(data_cfg.train_count))
    raise ConfigError(f"unknown data kind '{kind}' (imagefolder, mnist)")


def draw_indices(dataset_size: int, size: int, seed: int) -> list[int]:
    """``size`` distinct indices of a split, chosen by a generator seeded with ``seed``."""
    if size > dataset_size:
        raise DataError(f"calibration needs {size} images but the train split has {dataset_size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(dataset_size, generator=generator)[:size].tolist()


def eval_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded subset of ``limit`` images; the whole split (said in a warning when ``limit`` exceeds it)."""
    if limit and limit > len(dataset):
        log.warning("data.max_eval_images=%d is more than the %d images of the evaluation split: all of them are "
                    "evaluated (metrics.num_images)", limit, len(dataset))
    if not limit or limit >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed + 1)
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:limit].tolist())


@torch.no_grad()
def accuracy(
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    label: str,
    progress: bool,
    fp_model: nn.Module | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent over ``loader``; with ``fp_model`` also the label-free fidelity to it:
    top-1 agreement (% of images with the same prediction) and the mean cosine similarity of the logits."""
    correct1 = correct5 = total = agree = 0
    cosine = 0.0
    classes: set[int] = set()
    for images, labels in tqdm(loader, desc=f"eval {label}", unit="batch", disable=not progress):
        images, labels = images.to(device), labels.to(device)
        logits = forward(model, images)
        if not torch.isfinite(logits).all():
            raise NumericalError(f"the model under evaluation ({label}) produced NaN or Inf logits")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        total += len(labels)
        classes.update(labels.unique().tolist())
        if fp_model is not None:
            reference = forward(fp_model, images)
            agree += (reference.argmax(1) == top[:, 0]).sum().item()
            cosine += torch.nn.functional.cosine_similarity(logits, reference, dim=1).sum().item()
    if total == 0:
        raise DataError("evaluation split is empty")
    metrics = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "num_images": total, "num_classes": len(classes)}
    if fp_model is not None:
        metrics.update(fp_top1_agreement=100.0 * agree / total, logit_cosine=cosine / total)
    return metrics


@TASKS.register("classification")
class Classification(Task):
    """Top-1 of a classifier on an image folder or MNIST; the model is called as ``model(images)``."""

    name = "classification"
    primary_metric = "top1"
    compilable = True

    def __init__(self, cfg: DictConfig, progress: bool) -> None:
        super().__init__(cfg, progress)
        self.transform: Any = None
        self.transform_cfg: dict[str, Any] = {}
        self.val: Dataset | None = None
        self.num_outputs: int | None = None  # the head's output size (build_model)
        self.label_map: LabelMap | None = None  # image folders: the labels' map (check_data)
        self.relabels = False  # whether the map labels the val folders otherwise than their sorted order

    def validate(self) -> None:
        task, data = self.cfg.task, self.cfg.data
        integer(task.batch_size, "task.batch_size", 1)
        boolean(task.get("compare_fp", False), "task.compare_fp")
        choice(data.kind, "data.kind", ("imagefolder", "mnist"))
        optional_integer(data.get("max_eval_images"), "data.max_eval_images", 1)
        if data.kind == "mnist":
            integer(data.train_count, "data.train_count", 1)
        labels, class_map = data.get("labels", DEFAULT_LABELS), data.get("class_map")
        if data.kind == "mnist" and (labels != DEFAULT_LABELS or class_map is not None):
            raise ConfigError("data.labels/data.class_map apply to image folders: MNIST has its own labels (digits 0-9)")
        choice(labels, "data.labels", LABEL_SOURCES)
        if class_map is not None and (not isinstance(class_map, str) or not class_map.strip()):
            raise ConfigError(f"data.class_map={class_map!r}: must be the path of a file (one class folder name per line) or null")
        resolve_workers(data.get("workers"))
        if data.get("channels") is not None:
            choice(data.channels, "data.channels", (1, 3))
        if data.get("crop_pct") is not None:
            number(data.crop_pct, "data.crop_pct", 0.0, 1.0, low_open=True)
        if data.get("interpolation") is not None:
            choice(data.interpolation, "data.interpolation", INTERPOLATIONS)
        for key in ("mean", "std"):
            values = data.get(key)
            if values is not None:
                if not OmegaConf.is_list(values) or not values:
                    raise ConfigError(f"data.{key}={values!r}: must be a list of numbers, one per channel")
                for value in values:
                    number(value, f"data.{key}", 0.0 if key == "std" else -1e9, 1e9, low_open=key == "std")

    def identity(self) -> dict[str, Any]:
        """The data settings; for image folders the label map by content (``labels``: "imagenet-1k wnids" or the
        class map's sha256) instead of ``data.labels``/``data.class_map``/``data.label_map``, left out when it labels
        the val folders in their sorted order (as runs recorded before label maps existed did, so they keep their
        keys). Needs :meth:`check_data`."""
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        data.pop("workers", None)
        for key in ("labels", "class_map", "label_map"):
            data.pop(key, None)
        if self.cfg.data.kind == "imagefolder":
            if self.label_map is None:
                raise RuntimeError("Classification.identity() before check_data(): the label map is not known yet")
            if self.label_map.keyed and self.relabels:
                data["labels"] = self.label_map.identity
        return {"compare_fp": bool(self.cfg.task.get("compare_fp")), "data": data}

    def build_model(self) -> tuple[nn.Module, ModelInfo]:
        model, info = build_model(self.cfg.model)
        self.transform, self.transform_cfg = eval_transform(model, self.cfg.data)
        self.num_outputs = head_outputs(model, self.transform_cfg["input_size"])
        return model, info

    def describe_model(self, model: nn.Module, info: ModelInfo) -> dict[str, Any]:
        return {**super().describe_model(model, info), "transform": self.transform_cfg, "head_outputs": self.num_outputs}

    def check_data(self, calib_size: int) -> None:
        """Open the val split (and train when calibrating) with the labels checked against the head: a class folder
        not in the label map, more classes than outputs or a label set of another size than the head is one line."""
        val = self.open_val()
        self.val = eval_subset(val, self.cfg.data.get("max_eval_images"), int(self.cfg.seed))
        if calib_size:
            train_size = len(make_dataset(self.cfg.data, self.cfg.data.train_split, self.transform, self.label_map))
            if calib_size > train_size:
                raise ConfigError(f"method.calib_size={calib_size}: the train split has only {train_size} images")

    def open_val(self) -> Dataset:
        """The val split, its labels the head's indices; for image folders :attr:`label_map` is set and its identity
        written to ``data.label_map`` (the record's config says which map labelled the images)."""
        data = self.cfg.data
        if data.kind != "imagefolder":
            if self.num_outputs is not None and self.num_outputs != MNIST_CLASSES:
                raise ConfigError(f"the label set does not fit the model: MNIST has {MNIST_CLASSES} classes (digits 0-9) "
                                  f"but the model's head has {self.num_outputs} outputs")
            return make_dataset(data, data.val_split, self.transform)
        chosen = choose(str(data.get("labels", DEFAULT_LABELS)), data.get("class_map"), self.num_outputs)
        val = make_dataset(data, data.val_split, self.transform, chosen)
        self.label_map = chosen or folder_order(val.classes, self.num_outputs, f"split '{data.val_split}'")
        # a map that gives the val folders their sorted order (the full ImageNet val with timm's wnids) labels as
        # ImageFolder did: such runs keep the run keys and table cells they had before label maps existed
        self.relabels = [self.label_map.index[name] for name in sorted(val.classes)] != list(range(len(val.classes)))
        with open_dict(data):
            data.label_map = self.label_map.identity if self.relabels else FOLDER_ORDER
        log.info("labels: %s; split '%s' holds %d of the %d classes (%d images)", self.label_map.source, data.val_split,
                 len(val.classes), len(self.label_map.names), len(val))
        return val

    def calibration(self, size: int, seed: int, device: torch.device) -> CalibrationData:
        train = make_dataset(self.cfg.data, self.cfg.data.train_split, self.transform, self.label_map)
        indices = draw_indices(len(train), size, seed)
        loading = tqdm(indices, desc="calibration images", unit="img", leave=False, disable=not self.progress)
        images = torch.stack([train[i][0] for i in loading])
        identity = {"num_images": len(indices), "indices": indices, "images_sha256": tensor_sha256(images)}
        return CalibrationData(images.to(device), self.forward, logits=True, identity=identity)

    def forward(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch)

    def evaluate(self, model: nn.Module, device: torch.device, label: str, fp_model: nn.Module | None = None) -> dict[str, Any]:
        if self.val is None:
            self.check_data(0)
        loader = DataLoader(self.val, batch_size=int(self.cfg.task.batch_size), num_workers=resolve_workers(self.cfg.data.get("workers")))
        return accuracy(self.forward, model, loader, device, label, self.progress, fp_model)
