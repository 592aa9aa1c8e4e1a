"""COCO detection and instance segmentation with mmdet 3 / mmengine: metric box and mask AP (CocoMetric).

The detector is built from an mmdet config shipped in ``conf/mmdet/`` (``model.mmdet_config``; mmdet's ``_base_``
configs underneath) and loads ``model.checkpoint``: an mmdet 3 state dict, or one of the Swin repository's mmdet-2.x
checkpoints (SwinTransformer/Swin-Transformer-Object-Detection), whose backbone keys are converted on load with
mmdet's own ``swin_converter`` (``mmdet/models/backbones/swin.py``). Calibration images are drawn from train2017 with
the run's seed and pass mmdet's test pipeline (no augmentation), as the papers' calibration images do; evaluation
runs mmdet's test dataloader pipeline over val2017 and mmdet's ``CocoMetric`` in the loop of mmengine's ``TestLoop``
(``mmengine/runner/loops.py``: ``model.test_step`` then ``evaluator.process``; ``evaluator.evaluate`` gathers the
ranks' results under mmengine's distributed launcher, ``task.launcher``). AP is recorded in percent.

mmdet is imported only when this task runs (the base install does not need it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ptq_bench.calibration import CalibrationData
from ptq_bench.checks import integer, optional_integer
from ptq_bench.errors import CheckpointError, ConfigError, DataError
from ptq_bench.models.build import ModelInfo, parameters_sha256, read_checkpoint
from ptq_bench.paths import conf_path, expand_path
from tasks import TASKS
from tasks.base import Task
from tasks.classification import draw_indices

log = logging.getLogger(__name__)

MMDET_CONFIGS = conf_path("mmdet")
INSTALL_HINT = "task=coco needs the detection extra: run scripts/install_det.sh (README.md, Detection)"
#: CocoMetric stat names → record suffixes (AP, AP50, AP75, APs/m/l).
COCO_STATS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


def require_mmdet() -> None:
    """Import mmdet/mmengine and register mmdet's modules as the default scope; one line when the extra is missing."""
    try:
        import mmcv.ops  # noqa: F401  (compiled RoIAlign/NMS: the source build of scripts/install_det.sh)
        from mmdet.utils import register_all_modules
    except ImportError as error:
        raise ConfigError(f"{INSTALL_HINT} ({error})") from None
    register_all_modules(init_default_scope=True)


def mmdet_config(model_cfg: DictConfig) -> Any:
    """The mmengine ``Config`` of ``model.mmdet_config`` (a file in conf/mmdet/ or a path) with ``model.cfg_options``
    (dotted keys, mmengine's ``merge_from_dict``) applied."""
    from mmengine.config import Config

    name = str(model_cfg.get("mmdet_config") or "")
    path = expand_path(name) if Path(name).is_absolute() else MMDET_CONFIGS / name
    if not name or not path.is_file():
        raise ConfigError(f"model.mmdet_config={name!r}: no such mmdet config (conf/mmdet/ holds {', '.join(sorted(p.name for p in MMDET_CONFIGS.glob('*.py')))})")
    cfg = Config.fromfile(str(path))
    options = model_cfg.get("cfg_options")
    options = OmegaConf.to_container(options, resolve=True) if OmegaConf.is_config(options) else dict(options or {})
    if options:
        cfg.merge_from_dict(options)
    return cfg


def quiet_init_weights(model: nn.Module) -> None:
    """mmengine's ``init_weights`` (random init of every layer), without its INFO line per parameter."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------------ checkpoints


def is_mmdet2_swin(state: dict[str, torch.Tensor]) -> bool:
    """A detector state dict whose backbone uses the Swin repository's names (``backbone.layers.N.blocks...``)."""
    return any(k.startswith("backbone.layers.") for k in state) and not any(k.startswith("backbone.stages.") for k in state)


def convert_mmdet2_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdet-2.x Swin detector keys → mmdet 3: backbone keys through mmdet's ``swin_converter`` (layers→stages,
    attn→attn.w_msa, mlp.fc1/fc2→ffn.layers.0.0/1, patch_embed.proj→projection, patch-merging channel order);
    neck, RPN and RoI-head keys are the same in both versions."""
    from mmdet.models.backbones.swin import swin_converter

    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    return {**swin_converter(backbone), **rest}  # swin_converter prefixes "backbone." again


def load_detector_checkpoint_(model: nn.Module, path: Path) -> tuple[bool, str]:
    """Load ``path`` (weights_only) strictly into ``model``, converting mmdet-2.x Swin keys; whether it converted,
    and the file's sha256 (of the bytes loaded: one read)."""
    state, sha256 = read_checkpoint(path)
    converted = is_mmdet2_swin(state)
    if converted:
        state = convert_mmdet2_swin(state)
        log.info("converted %s from mmdet-2.x Swin keys (Swin-Transformer-Object-Detection) to mmdet 3 keys", path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{len(keys)} {label} (e.g. {keys[0]})" for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit model.mmdet_config: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return converted, sha256


# ------------------------------------------------------------------------------------------------ data


def coco_files(data_cfg: DictConfig, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` (train|val); one-line DataError when either is missing."""
    if data_cfg.get("root") in (None, "", "???"):
        raise DataError("data.root is not set: point it at the COCO folder (annotations/, train2017/, val2017/)")
    root = expand_path(data_cfg.root)
    if not root.is_dir():
        raise DataError(f"COCO root not found: {root}")
    ann, images = root / str(data_cfg[f"{split}_ann"]), root / str(data_cfg[f"{split}_images"])
    if not ann.is_file():
        raise DataError(f"COCO annotation file not found: {ann}")
    if not images.is_dir():
        raise DataError(f"COCO image folder not found: {images}")
    return ann, images


def coco_dataset(cfg: Any, data_cfg: DictConfig, split: str) -> Any:
    """mmdet's ``CocoDataset`` of ``split`` with the config's test pipeline (test_mode: every image, no filtering)."""
    from mmdet.registry import DATASETS

    ann, images = coco_files(data_cfg, split)
    dataset_cfg = cfg.test_dataloader.dataset.copy()
    dataset_cfg.update(data_root="", ann_file=str(ann), data_prefix=dict(img=str(images) + "/"), test_mode=True)
    try:
        dataset = DATASETS.build(dataset_cfg)
    except Exception as error:  # mmengine wraps a bad annotation file in its own error types
        raise DataError(f"cannot read COCO {split} annotations {ann}: {str(error).splitlines()[0]}") from None
    if len(dataset) == 0:
        raise DataError(f"COCO {split} split is empty: {ann}")
    return dataset


def subset_indices(size: int, limit: int | None, seed: int) -> list[int] | None:
    """A seeded subset of ``limit`` images (sorted), or None for the whole split."""
    if not limit or limit >= size:
        return None
    generator = torch.Generator().manual_seed(seed + 1)
    return sorted(torch.randperm(size, generator=generator)[: int(limit)].tolist())


def samples_sha256(samples: list[dict]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(str(sample["data_samples"].img_id).encode())
        digest.update(sample["inputs"].contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ the task


@TASKS.register("coco")
class Coco(Task):
    """Box and mask AP of an mmdet detector on COCO val2017; the model is called as ``model.test_step(batch)``."""

    name = "coco"
    primary_metric = "bbox_mAP"

    def __init__(self, cfg: DictConfig, progress: bool) -> None:
        super().__init__(cfg, progress)
        require_mmdet()
        self._init_distributed()
        self.mmcfg = mmdet_config(cfg.model)
        self.val: Any = None
        self.train: Any = None
        self.eval_indices: list[int] | None = None
        self.converted = False

    def _init_distributed(self) -> None:
        launcher = str(self.cfg.task.get("launcher", "none"))
        if launcher not in LAUNCHERS:
            raise ConfigError(f"task.launcher={launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        from mmengine.dist import init_dist, is_distributed

        if launcher == "none" or is_distributed():
            return
        if launcher == "pytorch" and not torch.cuda.is_available():  # CPU ranks: mmengine's launcher assumes CUDA
            torch.distributed.init_process_group("gloo")
        else:
            init_dist(launcher)

    def identity(self) -> dict[str, Any]:
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        data.pop("workers", None)
        model_text = json.dumps(self.mmcfg.model.to_dict(), sort_keys=True, default=str)
        return {
            "metrics": list(self.cfg.task.metrics),
            "batch_size": int(self.cfg.task.batch_size),  # images padded together change the result
            "data": data,
            "mmdet_model_sha256": hashlib.sha256(model_text.encode()).hexdigest(),
        }

    def build_model(self) -> tuple[nn.Module, ModelInfo]:
        from mmdet.registry import MODELS

        model = MODELS.build(self.mmcfg.model)
        quiet_init_weights(model)
        checkpoint = expand_path(self.cfg.model.checkpoint) if self.cfg.model.get("checkpoint") else None
        if checkpoint:
            self.converted, sha = load_detector_checkpoint_(model, checkpoint)
        else:
            sha = parameters_sha256(model)  # random init: buffers (BN statistics, position indices) are their defaults
            log.warning("model '%s' has random weights (no model.checkpoint): AP is not comparable with published numbers", self.cfg.model.name)
        model.eval()
        num_params = sum(p.numel() for p in model.parameters())
        return model, ModelInfo(str(self.cfg.model.name), str(checkpoint) if checkpoint else None, sha, num_params, checkpoint is None)

    def describe_model(self, model: nn.Module, info: ModelInfo) -> dict[str, Any]:
        return {**super().describe_model(model, info), "mmdet_config": str(self.cfg.model.mmdet_config),
                "checkpoint_converted_from_mmdet2": self.converted}

    def validate(self) -> None:
        integer(self.cfg.task.batch_size, "task.batch_size", 1)
        optional_integer(self.cfg.data.get("max_eval_images"), "data.max_eval_images", 1)
        metrics = list(self.cfg.task.metrics)
        if not metrics or "bbox" not in metrics or not set(metrics) <= {"bbox", "segm"}:
            raise ConfigError(f"task.metrics={metrics}: expected [bbox] or [bbox, segm]")

    def check_data(self, calib_size: int) -> None:
        self.val = coco_dataset(self.mmcfg, self.cfg.data, "val")
        self.eval_indices = subset_indices(len(self.val), self.cfg.data.get("max_eval_images"), int(self.cfg.seed))
        if self.eval_indices is not None:
            self.val.get_subset_(self.eval_indices)
        if calib_size:  # calibration reads train2017: its annotations are loaded once, here, before any work
            self.train = coco_dataset(self.mmcfg, self.cfg.data, "train")
            if calib_size > len(self.train):
                raise ConfigError(f"method.calib_size={calib_size}: the COCO train split has only {len(self.train)} images")

    def calibration(self, size: int, seed: int, device: torch.device) -> CalibrationData:
        from mmengine.dataset import pseudo_collate

        if self.train is None:
            self.train = coco_dataset(self.mmcfg, self.cfg.data, "train")
        indices = draw_indices(len(self.train), size, seed)
        loading = tqdm(indices, desc="calibration images", unit="img", leave=False, disable=not self.progress)
        samples = [self.train[i] for i in loading]
        identity = {
            "num_images": len(samples),
            "split": "train",
            "indices": indices,
            "image_ids": [int(s["data_samples"].img_id) for s in samples],
            "sha256": samples_sha256(samples),
        }
        return CalibrationData(samples, self.forward, collate=pseudo_collate, logits=False, identity=identity, uniform_shapes=False)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """mmengine's test step: the detector's data preprocessor (normalise, pad to 32), then ``predict``."""
        return model.test_step(batch)

    def evaluate(self, model: nn.Module, device: torch.device, label: str, fp_model: nn.Module | None = None) -> dict[str, Any]:
        from mmengine.dataset import DefaultSampler, pseudo_collate

        if self.val is None:
            self.check_data(0)
        evaluator = self.evaluator()
        loader = DataLoader(
            self.val,
            batch_size=int(self.cfg.task.batch_size),
            sampler=DefaultSampler(self.val, shuffle=False),
            num_workers=int(self.cfg.data.get("workers") or 0),
            collate_fn=pseudo_collate,
        )
        model.eval()
        with torch.no_grad():
            for batch in tqdm(loader, desc=f"eval {label}", unit="batch", disable=not self.progress):
                evaluator.process(data_samples=self.forward(model, batch), data_batch=batch)
        return self.record_metrics(evaluator.evaluate(len(self.val)))

    def evaluator(self) -> Any:
        """mmengine's ``Evaluator`` with the config's ``CocoMetric`` on the val annotations (restricted to the
        evaluated images' ids when ``data.max_eval_images`` takes a subset)."""
        from mmengine.evaluator import Evaluator

        metric_cfg = self.mmcfg.test_evaluator.copy()
        ann, _ = coco_files(self.cfg.data, "val")
        metric_cfg.update(ann_file=str(ann), metric=list(self.cfg.task.metrics), format_only=False)
        evaluator = Evaluator(metric_cfg)
        evaluator.dataset_meta = self.val.metainfo
        if self.eval_indices is not None:
            evaluator.metrics[0].img_ids = [int(self.val.get_data_info(i)["img_id"]) for i in range(len(self.val))]
        return evaluator

    def record_metrics(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``coco/bbox_mAP`` (fraction) → ``bbox_mAP`` (percent), for every metric and COCO stat; -1 (no ground truth
        in that range) → None."""
        metrics: dict[str, Any] = {}
        for kind in self.cfg.task.metrics:
            for stat in COCO_STATS:
                value = raw.get(f"coco/{kind}_{stat}")
                if value is not None:
                    metrics[f"{kind}_{stat}"] = round(100.0 * float(value), 2) if float(value) >= 0 else None
        if metrics.get(self.primary_metric) is None:
            raise DataError("COCO evaluation gave no box AP: the evaluated images hold no annotations")
        metrics["num_images"] = len(self.val)
        metrics["eval_subset"] = None if self.eval_indices is None else f"{len(self.eval_indices)} images (seed {int(self.cfg.seed) + 1})"
        return metrics
