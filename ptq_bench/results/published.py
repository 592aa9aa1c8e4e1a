"""Published numbers: load ``results/published/published.csv`` and look up the number a run reproduces.

Rows are keyed by the CSV's (task, metric), which :data:`METRIC_KEYS` maps from a record's (task, metric): every
task's published rows are loaded, and a task adapter's metric finds its published counterpart here.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "results" / "published" / "published.csv"

#: harness method name -> (method name in the CSV, papers in order of preference: the method's own paper first).
METHOD_ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fp": ("Full-Precision", ("RepQ-ViT", "APHQ-ViT", "PTQ4ViT")),
    "repq_vit": ("RepQ-ViT", ("RepQ-ViT", "APHQ-ViT")),
    "ptq4vit": ("PTQ4ViT", ("PTQ4ViT", "RepQ-ViT", "APHQ-ViT")),
    "base_ptq": ("BasePTQ", ("PTQ4ViT",)),
    "dopq_vit": ("DopQ-ViT", ("APHQ-ViT", "GLF-Q (2026 preprint)", "Korean benchmark README")),
    "aiqvit": ("AIQViT", ("AIQViT",)),
}


#: (record task, record metric) -> (CSV task, CSV metric). COCO AP is recorded in percent, as papers print it.
METRIC_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("classification", "top1"): ("cls", "top1"),
    ("coco", "bbox_mAP"): ("det", "box_ap"),
    ("coco", "segm_mAP"): ("seg", "mask_ap"),
}
COLUMNS = ["paper", "method", "model", "task", "dataset", "wbits", "abits", "metric", "value", "source"]


def load_published(path: Path = DEFAULT_CSV) -> pd.DataFrame:
    """Every row of the published CSV, all tasks (empty frame if the file is absent)."""
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(path)


def published_value(
    table: pd.DataFrame, task: str, metric: str, method: str, model: str, wbits: int | None, abits: int | None
) -> tuple[float | None, str | None]:
    """The published ``metric`` of harness ``method`` on ``model`` (its display name, e.g. "DeiT-T") for ``task``,
    or (None, None) when none is filed."""
    if method not in METHOD_ALIASES or (task, metric) not in METRIC_KEYS:
        return None, None
    csv_task, csv_metric = METRIC_KEYS[(task, metric)]
    name, papers = METHOD_ALIASES[method]
    rows = table[(table["task"] == csv_task) & (table["metric"] == csv_metric) & (table["method"] == name) & (table["model"] == model)]
    if wbits is None:
        rows = rows[(rows["wbits"] == 32) & (rows["abits"] == 32)]
    else:
        rows = rows[(rows["wbits"] == wbits) & (rows["abits"] == abits)]
    for paper in papers:
        match = rows[rows["paper"] == paper]
        if len(match):
            return float(match.iloc[0]["value"]), f"{paper}: {match.iloc[0]['source']}"
    return None, None
