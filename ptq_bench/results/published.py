"""Published numbers: load ``results/published/published.csv`` and look up the number a run reproduces."""

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


def load_published(path: Path = DEFAULT_CSV) -> pd.DataFrame:
    """The classification top-1 rows of the published CSV (empty frame if the file is absent)."""
    if not path.is_file():
        return pd.DataFrame(columns=["paper", "method", "model", "wbits", "abits", "metric", "value", "source"])
    frame = pd.read_csv(path)
    return frame[(frame["task"] == "cls") & (frame["metric"] == "top1")]


def published_value(table: pd.DataFrame, method: str, model: str, wbits: int | None, abits: int | None) -> tuple[float | None, str | None]:
    """The published top-1 of harness ``method`` on ``model`` (its display name, e.g. "DeiT-T"), or (None, None)."""
    if method not in METHOD_ALIASES:
        return None, None
    name, papers = METHOD_ALIASES[method]
    rows = table[(table["method"] == name) & (table["model"] == model)]
    if wbits is None:
        rows = rows[(rows["wbits"] == 32) & (rows["abits"] == 32)]
    else:
        rows = rows[(rows["wbits"] == wbits) & (rows["abits"] == abits)]
    for paper in papers:
        match = rows[rows["paper"] == paper]
        if len(match):
            return float(match.iloc[0]["value"]), f"{paper}: {match.iloc[0]['source']}"
    return None, None
