"""Image classification: ImageNet-style folders or the shipped MNIST split; metric top-1/top-5 accuracy.

Calibration images are drawn from the train split with a seeded generator (their indices go into the record);
the evaluation transform is timm's pretrained config of the model unless the data config overrides it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ptq_bench.datasets import MnistIdx, image_folder
from ptq_bench.errors import ConfigError, DataError
from ptq_bench.eval_transform import eval_transform
from ptq_bench.methods import BitWidth, Method, build_method
from ptq_bench.methods.base import RUNTIME_OPTIONS
from ptq_bench.models.build import build_model
from ptq_bench.results.environment import peak_memory, start_memory_tracking
from ptq_bench.results.store import SCHEMA_VERSION, run_key
from tasks import TASKS

log = logging.getLogger(__name__)


def make_dataset(data_cfg: DictConfig, split: str, transform: Any) -> Dataset:
    kind = data_cfg.kind
    if kind == "imagefolder":
        return image_folder(data_cfg.root, split, transform, channels=int(data_cfg.channels))
    if kind == "mnist":
        return MnistIdx(data_cfg.root, "train" if split == data_cfg.train_split else "val", transform, int(data_cfg.train_count))
    raise ConfigError(f"unknown data kind '{kind}' (imagefolder, mnist)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def parse_bits(cfg: DictConfig) -> BitWidth:
    try:
        return BitWidth(int(cfg.bits.w), int(cfg.bits.a))
    except (TypeError, ValueError):
        raise ConfigError(f"bits.w and bits.a must be integers, got w={cfg.bits.w!r} a={cfg.bits.a!r}") from None


def draw_calibration(train: Dataset, size: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """``size`` images of the train split chosen by a generator seeded with ``seed``."""
    if size > len(train):
        raise DataError(f"calibration needs {size} images but the train split has {len(train)}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(train), generator=generator)[:size].tolist()
    images = torch.stack([train[i][0] for i in tqdm(indices, desc="calibration images", unit="img", leave=False, disable=not progress)])
    return images, indices


def eval_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if not limit or limit >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed + 1)
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:limit].tolist())


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, label: str, progress: bool, fp_model: nn.Module | None = None
) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent over ``loader``; with ``fp_model`` also the label-free fidelity to it:
    top-1 agreement (% of images with the same prediction) and the mean cosine similarity of the logits."""
    correct1 = correct5 = total = agree = 0
    cosine = 0.0
    for images, labels in tqdm(loader, desc=f"eval {label}", unit="batch", disable=not progress):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        total += len(labels)
        if fp_model is not None:
            reference = fp_model(images)
            agree += (reference.argmax(1) == top[:, 0]).sum().item()
            cosine += torch.nn.functional.cosine_similarity(logits, reference, dim=1).sum().item()
    if total == 0:
        raise DataError("evaluation split is empty")
    metrics = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "num_images": total}
    if fp_model is not None:
        metrics.update(fp_top1_agreement=100.0 * agree / total, logit_cosine=cosine / total)
    return metrics


def identity(cfg: DictConfig, method: Method, bits: BitWidth, weights_sha256: str) -> dict[str, Any]:
    """What determines the result; its hash is the run key (batch size, workers, logging excluded)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("workers", None)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("checkpoint", None)
    model.pop("display", None)
    return {
        "task": "classification",
        "compare_fp": bool(cfg.task.get("compare_fp")),
        "model": model,
        "weights_sha256": weights_sha256,
        "data": data,
        "method": {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in RUNTIME_OPTIONS},
        "bits": [bits.w, bits.a] if method.uses_bits else None,
        "seed": int(cfg.seed),
    }


@TASKS.register("classification")
def run(cfg: DictConfig, store: Any, label: str) -> dict[str, Any]:
    """Quantize and evaluate one (model, method, bits); returns the record (or the stored one when resuming)."""
    bits = parse_bits(cfg)
    method = build_method(cfg.method, bits)
    device = resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    model, info = build_model(cfg.model)
    transform, transform_cfg = eval_transform(model, cfg.data)
    val = eval_subset(make_dataset(cfg.data, cfg.data.val_split, transform), cfg.data.get("max_eval_images"), int(cfg.seed))
    key = run_key(identity(cfg, method, bits, info.weights_sha256))
    if store.has(key) and not cfg.force:
        log.info("run %s already has a record (%s): skipped; pass force=true to redo it", key, store.path(key))
        return store.load(key)

    start = time.perf_counter()
    rss_baseline = start_memory_tracking(device)
    calibration: dict[str, Any] = {"num_images": 0}
    model.to(device)
    fp_model = copy.deepcopy(model) if cfg.task.get("compare_fp") and method.uses_calibration else None
    if method.uses_calibration:
        train = make_dataset(cfg.data, cfg.data.train_split, transform)
        images, indices = draw_calibration(train, int(cfg.method.calib_size), int(cfg.seed), bool(cfg.task.progress))
        calibration = {
            "num_images": len(indices),
            "indices": indices,
            "images_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
        }
        calib_start = time.perf_counter()
        model = method.quantize(model, images.to(device))
        calibration["seconds"] = time.perf_counter() - calib_start
    model.eval()

    loader = DataLoader(val, batch_size=int(cfg.task.batch_size), num_workers=int(cfg.data.workers))
    eval_start = time.perf_counter()
    metrics = evaluate(model, loader, device, label, bool(cfg.task.progress), fp_model)
    eval_seconds = time.perf_counter() - eval_start
    return {
        "schema": SCHEMA_VERSION,
        "run_key": key,
        "task": "classification",
        "model": {**info.__dict__, "display": cfg.model.get("display", info.name), "transform": transform_cfg},
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "bits": {"w": bits.w, "a": bits.a, "label": bits.label} if method.uses_bits else None,
        "seed": int(cfg.seed),
        "calibration": calibration,
        "metrics": metrics,
        "timings": {
            "calibration_s": calibration.get("seconds", 0.0),
            "eval_s": eval_seconds,
            "total_s": time.perf_counter() - start,
        },
        "device": str(device),
        "memory": peak_memory(device, rss_baseline),
    }
