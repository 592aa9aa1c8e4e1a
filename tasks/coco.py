"""COCO detection and instance segmentation with mmdet 3 / mmengine: metric box and mask AP (CocoMetric).

The detector is built from an mmdet config shipped in ``conf/mmdet/`` (``model.mmdet_config``; mmdet's ``_base_``
configs underneath) and loads ``model.checkpoint``: an mmdet 3 state dict, or one of the Swin repository's mmdet-2.x
checkpoints (SwinTransformer/Swin-Transformer-Object-Detection), whose backbone keys are converted on load with
mmdet's own ``swin_converter`` (``mmdet/models/backbones/swin.py``). Calibration images pass mmdet's test pipeline (no
augmentation) and come from ``data.calib_split`` (train2017 by default), drawn with the run's seed or, with
``data.calib_draw=first``, the first images of the annotation file that mmdet's training filter keeps (a box of the
detector's classes, both sides at least 32 px), as APHQ-ViT's detection fork reads them (a train-mode CocoDataset
with shuffle=False, ``Object-Detection/tools/test.py``); evaluation
runs mmdet's test dataloader pipeline over val2017 and mmdet's ``CocoMetric`` in the loop of mmengine's ``TestLoop``
(``mmengine/runner/loops.py``: ``model.test_step`` then ``evaluator.process``; ``evaluator.evaluate`` gathers the
ranks' results under mmengine's distributed launcher, ``task.launcher``). AP is recorded in percent.

mmdet is imported only when this task runs (the base install does not need it); the OpenMMLab plumbing (imports,
configs, init, launcher) is :mod:`tasks.mm`'s.
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
from ptq_bench.paths import expand_path
from tasks import TASKS
from tasks.base import Task
from tasks.classification import draw_indices
from tasks.mm import init_launcher, mmdet_config, quiet_init_weights, require_mmdet

log = logging.getLogger(__name__)

#: CocoMetric stat names → record suffixes (AP, AP50, AP75, APs/m/l).
COCO_STATS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


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


#: values of data.calib_split and data.calib_draw (conf/data/coco.yaml)
CALIB_SPLITS = ("train", "val")
CALIB_DRAWS = ("seeded", "first")
#: mmdet's training filter (``CocoDataset.filter_data``), as the detection fork's train-mode dataset applies it
TRAINING_FILTER = {"filter_empty_gt": True, "min_size": 32}


def coco_dataset(cfg: Any, data_cfg: DictConfig, split: str, filtered: bool = False) -> Any:
    """mmdet's ``CocoDataset`` of ``split`` with the config's test pipeline: every image (test_mode), or with
    ``filtered`` only those mmdet's training filter keeps, in the annotation file's order."""
    from mmdet.registry import DATASETS

    ann, images = coco_files(data_cfg, split)
    dataset_cfg = cfg.test_dataloader.dataset.copy()
    dataset_cfg.update(data_root="", ann_file=str(ann), data_prefix=dict(img=str(images) + "/"), test_mode=not filtered)
    if filtered:
        dataset_cfg.update(filter_cfg=dict(TRAINING_FILTER))
    try:
        dataset = DATASETS.build(dataset_cfg)
    except Exception as error:  # mmengine wraps a bad annotation file in its own error types
        raise DataError(f"cannot read COCO {split} annotations {ann}: {str(error).splitlines()[0]}") from None
    if len(dataset) == 0:
        raise DataError(f"COCO {split} split is empty: {ann}")
    return dataset


def check_categories(dataset: Any, ann: Path, num_classes: list[int]) -> None:
    """The evaluated labels mean what the detector's head means: mmdet numbers the annotation file's categories that
    carry a class name of the metainfo, in the file's order (``CocoDataset.cat_ids``), and ``CocoMetric`` turns label
    k into the k-th of them; so the file must list exactly the metainfo's classes, in its order, and every box head
    must have that many classes. One-line DataError otherwise (a trimmed, reordered or renamed category list)."""
    classes = list(dataset.metainfo["classes"])
    with open(ann, encoding="utf-8") as handle:
        categories = json.load(handle).get("categories") or []
    names = [c.get("name") for c in categories if c.get("name") in classes]  # pycocotools' get_cat_ids order
    if names != classes:
        missing = [name for name in classes if name not in names]
        what = f"missing {len(missing)}, e.g. {missing[0]!r}" if missing else "in another order"
        raise DataError(f"{ann}: its categories are not the detector's {len(classes)} classes ({what}); mmdet maps "
                        "label k to the k-th of the file's categories, so every label would be wrong")
    wrong = sorted({n for n in num_classes if n != len(classes)})
    if wrong:
        raise DataError(f"the detector's box head has {wrong[0]} classes but the dataset's metainfo has {len(classes)}")


def box_head_classes(model: nn.Module) -> list[int]:
    """``num_classes`` of every box head of a two-stage detector (Cascade R-CNN has one per stage)."""
    heads = getattr(getattr(model, "roi_head", None), "bbox_head", None)
    heads = heads if isinstance(heads, (list, nn.ModuleList)) else [heads] if heads is not None else []
    return [int(h.num_classes) for h in heads if hasattr(h, "num_classes")]


def subset_indices(size: int, limit: int | None, seed: int) -> list[int] | None:
    """A seeded subset of ``limit`` images (sorted), or None for the whole split (said in a warning when ``limit``
    exceeds it)."""
    if limit and limit > size:
        log.warning("data.max_eval_images=%d is more than the %d images of val2017 here: all of them are evaluated", limit, size)
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
    #: raised when a fix changes what a calibrated detector computes, so that its runs get new keys (0: none yet;
    #: 1: Swin's padded windows as mmdet and the official forks run them, zeros through qkv and its quantizer,
    #: ptq_bench/architectures/mmdet_swin.py)
    revision = 1

    def __init__(self, cfg: DictConfig, progress: bool) -> None:
        super().__init__(cfg, progress)
        require_mmdet()
        init_launcher(str(self.cfg.task.get("launcher", "none")))
        self.mmcfg = mmdet_config(cfg.model)
        self.val: Any = None
        self.calib_set: Any = None
        self.calibrates: bool | None = None
        self.eval_indices: list[int] | None = None
        self.converted = False
        self.num_classes: list[int] = []

    def identity(self) -> dict[str, Any]:
        """The data settings; where calibration images come from (``data.calib_split``/``calib_draw``) only for a run
        that calibrates and draws otherwise than seeded from train2017 (as runs recorded before the choice existed
        did, so they keep their keys); :attr:`revision` for a run that calibrates. Needs :meth:`check_data`."""
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        data.pop("workers", None)
        split, draw = data.pop("calib_split"), data.pop("calib_draw")
        if self.calibrates is None:
            raise RuntimeError("Coco.identity() before check_data(): whether the run calibrates is not known yet")
        if self.calibrates and (split, draw) != ("train", "seeded"):
            data["calibration_images"] = f"{split}/{draw}"
        revision = {"revision": self.revision} if self.calibrates else {}
        model_text = json.dumps(self.mmcfg.model.to_dict(), sort_keys=True, default=str)
        return {
            "metrics": list(self.cfg.task.metrics),
            "batch_size": int(self.cfg.task.batch_size),  # images padded together change the result
            "data": data,
            "mmdet_model_sha256": hashlib.sha256(model_text.encode()).hexdigest(),
            **revision,
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
        self.num_classes = box_head_classes(model)
        num_params = sum(p.numel() for p in model.parameters())
        return model, ModelInfo(str(self.cfg.model.name), str(checkpoint) if checkpoint else None, sha, num_params, checkpoint is None)

    def describe_model(self, model: nn.Module, info: ModelInfo) -> dict[str, Any]:
        return {**super().describe_model(model, info), "mmdet_config": str(self.cfg.model.mmdet_config),
                "checkpoint_converted_from_mmdet2": self.converted}

    def validate(self) -> None:
        integer(self.cfg.task.batch_size, "task.batch_size", 1)
        optional_integer(self.cfg.data.get("max_eval_images"), "data.max_eval_images", 1)
        for key, allowed in (("calib_split", CALIB_SPLITS), ("calib_draw", CALIB_DRAWS)):
            if self.cfg.data[key] not in allowed:
                raise ConfigError(f"data.{key}={self.cfg.data[key]}: expected one of {', '.join(allowed)}")
        metrics = list(self.cfg.task.metrics)
        if not metrics or "bbox" not in metrics or not set(metrics) <= {"bbox", "segm"}:
            raise ConfigError(f"task.metrics={metrics}: expected [bbox] or [bbox, segm]")

    def check_data(self, calib_size: int) -> None:
        self.calibrates = bool(calib_size)
        self.val = coco_dataset(self.mmcfg, self.cfg.data, "val")
        check_categories(self.val, coco_files(self.cfg.data, "val")[0], self.num_classes)
        self.eval_indices = subset_indices(len(self.val), self.cfg.data.get("max_eval_images"), int(self.cfg.seed))
        if self.eval_indices is not None:
            self.val.get_subset_(self.eval_indices)
        if calib_size:  # the calibration split's annotations are loaded once, here, before any work
            self.calib_set = self.calibration_split()
            if calib_size > len(self.calib_set):
                kept = " kept by mmdet's training filter (data.calib_draw=first)" if self.cfg.data.calib_draw == "first" else ""
                raise ConfigError(f"method.calib_size={calib_size}: the COCO {self.cfg.data.calib_split} split has only "
                                  f"{len(self.calib_set)} images{kept}")

    def calibration_split(self) -> Any:
        """The dataset calibration images come from (``data.calib_split``, filtered for ``data.calib_draw=first``)."""
        split, draw = str(self.cfg.data.calib_split), str(self.cfg.data.calib_draw)
        if split == "val":
            log.warning("calibration images come from val2017, the split evaluated (data.calib_split=val)")
        return coco_dataset(self.mmcfg, self.cfg.data, split, filtered=draw == "first")

    def calibration(self, size: int, seed: int, device: torch.device) -> CalibrationData:
        from mmengine.dataset import pseudo_collate

        if self.calib_set is None:
            self.calib_set = self.calibration_split()
        first = self.cfg.data.calib_draw == "first"
        if size > len(self.calib_set):
            raise DataError(f"calibration needs {size} images but the {self.cfg.data.calib_split} split has {len(self.calib_set)}")
        indices = list(range(size)) if first else draw_indices(len(self.calib_set), size, seed)
        loading = tqdm(indices, desc="calibration images", unit="img", leave=False, disable=not self.progress)
        samples = [self.calib_set[i] for i in loading]
        identity = {
            "num_images": len(samples),
            "split": str(self.cfg.data.calib_split),
            "draw": str(self.cfg.data.calib_draw),
            "indices": indices,
            "image_ids": [int(s["data_samples"].img_id) for s in samples],
            "sha256": samples_sha256(samples),
        }
        return CalibrationData(samples, self.forward, collate=pseudo_collate, logits=False, identity=identity, uniform_shapes=False)

    def uncovered_hint(self) -> str | None:
        rcnn = (self.mmcfg.model.get("test_cfg") or {}).get("rcnn") or {}
        threshold = rcnn.get("score_thr")
        return ("the mask head runs only on detections scoring above model.test_cfg.rcnn.score_thr"
                f"{'=' + str(threshold) if threshold is not None else ''}: with none on the calibration images (random "
                "weights, few images) lower it, e.g. +model.cfg_options.model.test_cfg.rcnn.score_thr=0.0")

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
        detections = 0
        with torch.no_grad():
            for batch in tqdm(loader, desc=f"eval {label}", unit="batch", disable=not self.progress):
                outputs = self.forward(model, batch)
                detections += sum(len(sample.pred_instances) for sample in outputs)
                evaluator.process(data_samples=outputs, data_batch=batch)
        return self.record_metrics(evaluator.evaluate(len(self.val)), detections)

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

    def record_metrics(self, raw: dict[str, Any], detections: int | None = None) -> dict[str, Any]:
        """``coco/bbox_mAP`` (fraction) → ``bbox_mAP`` (percent), for every metric and COCO stat; -1 (no ground truth
        in that range) → None. ``detections``: the predicted instances kept (above the score threshold); none at all is
        an AP of 0 (mmdet's metric returns nothing then), said in a warning."""
        metrics: dict[str, Any] = {}
        for kind in self.cfg.task.metrics:
            for stat in COCO_STATS:
                value = raw.get(f"coco/{kind}_{stat}")
                if value is not None:
                    metrics[f"{kind}_{stat}"] = round(100.0 * float(value), 2) if float(value) >= 0 else None
        if metrics.get(self.primary_metric) is None and detections == 0:
            log.warning("no detections above the score threshold on any evaluated image: AP is 0 (lower the threshold, "
                        "e.g. +model.cfg_options.model.test_cfg.rcnn.score_thr=0.01, to see low-scoring boxes)")
            metrics = {f"{kind}_{stat}": 0.0 for kind in self.cfg.task.metrics for stat in COCO_STATS}
        if metrics.get(self.primary_metric) is None:
            raise DataError("COCO evaluation gave no box AP: the evaluated images hold no annotations")
        metrics["num_images"] = len(self.val)
        if detections is not None:
            metrics["detections"] = detections
        return metrics
