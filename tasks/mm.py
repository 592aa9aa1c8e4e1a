"""OpenMMLab plumbing shared by mm-based tasks (mmdet 3 / mmengine): the import check and default scope, configs with
``model.cfg_options``, quiet weight init and mmengine's distributed launcher. Nothing here imports mmdet at module
level (the base install does not have it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ptq_bench.errors import ConfigError
from ptq_bench.paths import conf_path, expand_path

MMDET_CONFIGS = conf_path("mmdet")
INSTALL_HINT = "task=coco needs the detection extra: run scripts/install_det.sh (README.md, Detection)"
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


def init_launcher(launcher: str) -> None:
    """mmengine's distributed launcher (``task.launcher``: none, pytorch, slurm, mpi); a no-op when already set up."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"task.launcher={launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    from mmengine.dist import init_dist, is_distributed

    if launcher == "none" or is_distributed():
        return
    if launcher == "pytorch" and not torch.cuda.is_available():  # CPU ranks: mmengine's launcher assumes CUDA
        torch.distributed.init_process_group("gloo")
    else:
        init_dist(launcher)
