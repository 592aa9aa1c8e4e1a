"""The aggregator: run records → a paper-style table (rows: method × bits, columns: models), with the
published number beside each reproduced one, written as Markdown, LaTeX and CSV, plus a plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from ptq_bench.methods.base import RUNTIME_OPTIONS
from ptq_bench.results.published import load_published, published_value

log = logging.getLogger(__name__)

METRIC_LABELS = {
    "top1": "Top-1 (%)",
    "top5": "Top-5 (%)",
    "fp_top1_agreement": "Top-1 agreement with the FP model (%)",
    "logit_cosine": "Mean cosine similarity of logits to the FP model",
}


def method_label(record: Mapping[str, Any]) -> str:
    """The method name, with its command-line option overrides for ablation variants."""
    name = str(record["method"]["name"])
    overrides = [o.split("=", 1) for o in record.get("method_overrides", [])]
    skip = {"name", "calib_size", *RUNTIME_OPTIONS}
    extras = [f"{k.removeprefix('method.')}={v}" for k, v in overrides if k.removeprefix("method.") not in skip]
    return f"{name} [{', '.join(extras)}]" if extras else name


def has_trained_weights(record: Mapping[str, Any]) -> bool:
    """False for a random-init model (no checkpoint, not pretrained): a published number would mean nothing."""
    if "random_init" in record["model"]:
        return not record["model"]["random_init"]
    pretrained = record.get("config", {}).get("model", {}).get("pretrained", False)
    return bool(record["model"].get("checkpoint") or pretrained)


def records_frame(
    records: Iterable[Mapping[str, Any]], published: pd.DataFrame | None = None, metric: str = "top1"
) -> pd.DataFrame:
    """Long format: one row per record with the reproduced ``metric``, and for top-1 the published value and delta.

    Column ``top1`` holds the chosen metric (e.g. ``fp_top1_agreement`` for random-init models); records
    without it are left out."""
    published = load_published() if published is None else published
    rows = []
    for record in records:
        if record.get("task") != "classification":
            continue
        if metric not in record["metrics"]:
            continue
        bits = record.get("bits")
        wbits, abits = (bits["w"], bits["a"]) if bits else (None, None)
        model = str(record["model"].get("display") or record["model"]["name"])
        value, source = (None, None)
        if metric == "top1" and has_trained_weights(record):
            value, source = published_value(published, str(record["method"]["name"]), model, wbits, abits)
        top1 = float(record["metrics"][metric])
        rows.append({
            "method": method_label(record),
            "bits": f"W{wbits}A{abits}" if bits else "32/32",
            "wbits": wbits or 32,
            "model": model,
            "top1": top1,
            "published": value,
            "delta": None if value is None else top1 - value,
            "source": source,
            "calibration_s": record["timings"].get("calibration_s"),
            "eval_s": record["timings"].get("eval_s"),
            "run_key": record["run_key"],
            "created": record.get("created", ""),
        })
    frame = pd.DataFrame(rows)
    frame.attrs["metric"] = metric
    if frame.empty:
        return frame
    # the newest record wins when the same cell was run twice with different run keys (e.g. new code)
    cell = ["method", "bits", "model"]
    competing = int(frame.duplicated(cell).sum())
    if competing:
        log.warning("%d record(s) compete for a table cell already filled (other data, seed or code version): "
                    "the newest is shown; filter with --model/--method or use a separate --runs directory", competing)
    frame = frame.sort_values("created").drop_duplicates(cell, keep="last")
    return frame.sort_values(["wbits", "bits", "method", "model"], ascending=[False, True, True, True]).reset_index(drop=True)


def _cell(row: pd.Series, digits: int = 2) -> str:
    if pd.isna(row["published"]):
        return f"{row['top1']:.{digits}f}"
    return f"{row['top1']:.{digits}f} ({row['published']:.2f}, {row['delta']:+.2f})"


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide table: index (Method, W/A), one column per model; cells 'reproduced (published, Δ)'."""
    if frame.empty:
        return pd.DataFrame()
    digits = 4 if frame.attrs.get("metric") == "logit_cosine" else 2
    cells = frame.assign(cell=frame.apply(_cell, axis=1, digits=digits))
    table = cells.pivot_table(index=["method", "bits"], columns="model", values="cell", aggfunc="first", sort=False)
    table.columns.name = None
    table.index.names = ["Method", "W/A"]
    return table.fillna("–")


def markdown(table: pd.DataFrame) -> str:
    """The wide table as a Markdown pipe table with Method and W/A as ordinary columns."""
    return table.reset_index().to_markdown(index=False, disable_numparse=True) if not table.empty else "(no runs)"


def write_report(frame: pd.DataFrame, out_dir: Path, name: str = "table") -> dict[str, Path]:
    """Write ``name``.md/.tex/.csv (and .png when matplotlib can plot) under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = paper_table(frame)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "tex", "csv")}
    metric = frame.attrs.get("metric", "top1")
    note = (f"{METRIC_LABELS.get(metric, metric)}, reproduced"
            + ("; in parentheses the published value and the difference, where published" if metric == "top1" else "") + ".\n\n")
    paths["md"].write_text(note + markdown(table) + "\n")
    paths["tex"].write_text(table.to_latex(escape=True, caption="Top-1 accuracy (\\%): reproduced (published, $\\Delta$).") )
    frame.to_csv(paths["csv"], index=False)
    plot = plot_accuracy(frame, out_dir / f"{name}.png")
    if plot:
        paths["png"] = plot
    return paths


def plot_accuracy(frame: pd.DataFrame, path: Path) -> Path | None:
    """Top-1 per bit-width, one line per (method, model)."""
    quantized = frame[frame["bits"] != "32/32"]
    if quantized.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, model), group in quantized.groupby(["method", "model"]):
        group = group.sort_values("wbits")
        ax.plot(group["bits"], group["top1"], marker="o", label=f"{method} · {model}")
    for model, group in frame[frame["bits"] == "32/32"].groupby("model"):
        ax.axhline(group["top1"].iloc[0], linestyle="--", linewidth=0.8, color="gray")
    ax.set_xlabel("bit-width")
    metric = frame.attrs.get("metric", "top1")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
