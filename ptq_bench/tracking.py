"""Experiment tracking: a real wandb run per record (offline by default, ``logger=none`` to switch off)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping


def log_to_wandb(logger_cfg: Mapping[str, Any], record: Mapping[str, Any], label: str, directory: Path) -> None:
    """Log config, metrics and timings of ``record``; never goes online unless ``logger.mode=online``."""
    if logger_cfg.get("kind", "none") != "wandb":
        return
    mode = os.environ.get("WANDB_MODE", str(logger_cfg.get("mode", "offline")))
    if mode == "disabled":
        return
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=str(logger_cfg.get("project", "ptq-bench")),
        entity=logger_cfg.get("entity"),
        mode=mode,
        dir=str(directory),
        name=label,
        group=str(record["model"]["name"]),
        config=dict(record.get("config", {})),
        tags=[str(record["method"]["name"])],
        settings=wandb.Settings(silent=True),
    )
    metrics = {f"metrics/{k}": v for k, v in record["metrics"].items()}
    timings = {f"timings/{k}": v for k, v in record["timings"].items()}
    run.log({**metrics, **timings})
    run.summary.update({"run_key": record["run_key"], **metrics})
    run.finish()
