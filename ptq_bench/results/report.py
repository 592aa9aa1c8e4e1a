"""The aggregator: run records of any task → a paper-style table (rows: method × bits, columns: models), with the
published number beside each reproduced one, written as Markdown, LaTeX and CSV, plus a plot.

A table shows one metric; by default each record's task's primary metric (``top1`` for classification,
``bbox_mAP`` for COCO). The frame's ``value`` column holds it, keyed by (task, metric)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from ptq_bench.results.published import load_published, published_value

log = logging.getLogger(__name__)

METRIC_LABELS = {
    "top1": "Top-1 (%)",
    "top5": "Top-5 (%)",
    "fp_top1_agreement": "Top-1 agreement with the FP model (%)",
    "logit_cosine": "Mean cosine similarity of logits to the FP model",
    "bbox_mAP": "COCO box AP (%)",
    "segm_mAP": "COCO mask AP (%)",
}


def method_label(record: Mapping[str, Any]) -> str:
    """The method name with its option overrides (the harness writes it; older records: name + overrides)."""
    if record.get("method_label"):
        return str(record["method_label"])
    name = str(record["method"]["name"])
    extras = [o.removeprefix("method.") for o in record.get("method_overrides", []) if not o.startswith("method.calib_size")]
    return f"{name} [{', '.join(extras)}]" if extras else name


def has_trained_weights(record: Mapping[str, Any]) -> bool:
    """False for a random-init model (no checkpoint, not pretrained): a published number would mean nothing."""
    if "random_init" in record["model"]:
        return not record["model"]["random_init"]
    model_cfg = record.get("config", {}).get("model")
    pretrained = model_cfg.get("pretrained", False) if isinstance(model_cfg, dict) else False
    return bool(record["model"].get("checkpoint") or pretrained)


def records_frame(
    records: Iterable[Mapping[str, Any]], published: pd.DataFrame | None = None, metric: str | None = None
) -> pd.DataFrame:
    """Long format: one row per record with the reproduced metric (``value``), the published value and the delta.

    ``metric`` None takes each record's primary metric; records without the chosen metric are left out. Rows of
    different tasks or metrics never share a cell (the cell key includes both)."""
    published = load_published() if published is None else published
    rows = []
    for record in records:
        task = str(record.get("task", "classification"))
        chosen = metric or str(record.get("primary_metric", "top1"))
        if record["metrics"].get(chosen) is None:
            continue
        bits = record.get("bits")
        wbits, abits = (bits["w"], bits["a"]) if bits else (None, None)
        model = str(record["model"].get("display") or record["model"]["name"])
        value, source = (None, None)
        if has_trained_weights(record):
            value, source = published_value(published, task, chosen, str(record["method"]["name"]), model, wbits, abits)
        reproduced = float(record["metrics"][chosen])
        rows.append({
            "task": task,
            "metric": chosen,
            "method": method_label(record),
            "bits": f"W{wbits}A{abits}" if bits else "32/32",
            "wbits": wbits or 32,
            "model": model,
            "value": reproduced,
            "published": value,
            "delta": None if value is None else reproduced - value,
            "source": source,
            "calibration_s": record["timings"].get("calibration_s"),
            "eval_s": record["timings"].get("eval_s"),
            "run_key": record["run_key"],
            "created": record.get("created", ""),
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame.attrs["metric"] = metric or "top1"
        return frame
    metrics = sorted(set(frame["metric"]))
    frame.attrs["metric"] = metrics[0] if len(metrics) == 1 else "/".join(metrics)
    # the newest record wins when the same cell was run twice with different run keys (e.g. new code)
    cell = ["task", "metric", "method", "bits", "model"]
    competing = int(frame.duplicated(cell).sum())
    if competing:
        log.warning("%d record(s) compete for a table cell already filled (other data, seed or code version): "
                    "the newest is shown; filter with --model/--method or use a separate --runs directory", competing)
    frame = frame.sort_values("created").drop_duplicates(cell, keep="last")
    return frame.sort_values(["task", "metric", "wbits", "bits", "method", "model"], ascending=[True, True, False, True, True, True]).reset_index(drop=True)


def _cell(row: pd.Series, digits: int = 2) -> str:
    if pd.isna(row["published"]):
        return f"{row['value']:.{digits}f}"
    return f"{row['value']:.{digits}f} ({row['published']:.2f}, {row['delta']:+.2f})"


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide table: index (Method, W/A), one column per model; cells 'reproduced (published, Δ)'."""
    if frame.empty:
        return pd.DataFrame()
    digits = 4 if frame.attrs.get("metric") == "logit_cosine" else 2
    cells = frame.assign(cell=frame.apply(_cell, axis=1, digits=digits))
    several = cells["metric"].nunique() > 1
    index = ["metric", "method", "bits"] if several else ["method", "bits"]
    table = cells.pivot_table(index=index, columns="model", values="cell", aggfunc="first", sort=False)
    table.columns.name = None
    table.index.names = (["Metric"] if several else []) + ["Method", "W/A"]
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
            + ("; in parentheses the published value and the difference, where published" if frame["published"].notna().any() else "") + ".\n\n")
    paths["md"].write_text(note + markdown(table) + "\n")
    caption = f"{METRIC_LABELS.get(metric, metric)}: reproduced (published, $\\Delta$).".replace("%", "\\%")
    paths["tex"].write_text(table.to_latex(escape=True, caption=caption))
    frame.to_csv(paths["csv"], index=False)
    plot = plot_accuracy(frame, out_dir / f"{name}.png")
    if plot:
        paths["png"] = plot
    return paths


def plot_accuracy(frame: pd.DataFrame, path: Path) -> Path | None:
    """The metric per bit-width, one line per (method, model)."""
    quantized = frame[frame["bits"] != "32/32"]
    if quantized.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, model), group in quantized.groupby(["method", "model"]):
        group = group.sort_values("wbits")
        ax.plot(group["bits"], group["value"], marker="o", label=f"{method} · {model}")
    for model, group in frame[frame["bits"] == "32/32"].groupby("model"):
        ax.axhline(group["value"].iloc[0], linestyle="--", linewidth=0.8, color="gray")
    ax.set_xlabel("bit-width")
    metric = frame.attrs.get("metric", "top1")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quantized_table(record: Mapping[str, Any]) -> str:
    """A run's quantized modules as a Markdown table: module, slot, role, bits, quantizer (from ``record["quantized"]``)."""
    rows = [
        {"module": row["module"], "slot": slot, **info}
        for row in record.get("quantized") or []
        for slot, info in row["quantizers"].items()
    ]
    if not rows:
        return f"run {record['run_key']} ({record['method']['name']}): nothing quantized"
    header = f"run {record['run_key']} ({record.get('method_label') or record['method']['name']}): {len(rows)} quantizers\n\n"
    return header + pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
