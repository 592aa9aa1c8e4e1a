"""The aggregator: run records of any task → a paper-style table (rows: method × bits, columns: models), with the
published number beside each reproduced one, written as Markdown, LaTeX and CSV, plus a plot.

A table shows one metric; by default each record's task's primary metric (``top1`` for classification,
``bbox_mAP`` for COCO). The frame's ``value`` column holds it, keyed by (task, metric)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from ptq_bench.bits import bits_label
from ptq_bench.results.formatting import deploy_text, format_value, text
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


def options_label(record: Mapping[str, Any]) -> str:
    """``key=value, ...`` of the options the record's run chose over the paper's (sorted), "" when none: the
    ``option_changes`` the harness stored. Records written before it stored them: the method options given on the
    command line or per method (``method_overrides``, ``protocol.method_options``), as the record lists them."""
    changes = record.get("option_changes")
    if isinstance(changes, Mapping):
        return ", ".join(f"{k}={text(v)}" for k, v in sorted(changes.items()))
    given = [o.lstrip("+~").removeprefix("method.") for o in record.get("method_overrides", [])
             if o.lstrip("+~").startswith("method.") and not o.lstrip("+~").startswith("method.calib_size")]
    given += [f"{k}={text(v)}" for k, v in ((record.get("protocol") or {}).get("method_options") or {}).items()]
    return ", ".join(sorted(given))


def protocol_label(record: Mapping[str, Any]) -> str:
    """What else differs from the paper's protocol: random weights (no checkpoint, not pretrained), the budget's
    changes, an evaluation subset (of images, or of the head's classes), per-layer bits; "" when nothing."""
    parts = ["random weights"] if (record.get("model") or {}).get("random_init") else []
    protocol = record.get("protocol") or {}
    if protocol.get("budget_changes"):
        changed = ", ".join(f"{k}={v[1]}" for k, v in sorted(protocol["budget_changes"].items()))
        parts.append(f"budget={protocol.get('budget')}: {changed}")
    data = (record.get("config") or {}).get("data") or {}
    if data.get("max_eval_images"):
        parts.append(f"eval {data['max_eval_images']} imgs")
    else:  # a val folder with some of the head's classes (an ImageNet subset): not the paper's full split
        classes, outputs = (record.get("metrics") or {}).get("num_classes"), (record.get("model") or {}).get("head_outputs")
        if classes and outputs and classes < outputs:
            parts.append(f"eval {classes} of {outputs} classes")
    if (record.get("config") or {}).get("eval_compile"):
        parts.append("compiled eval")  # may differ from eager evaluation by rounding
    layers = (record.get("bits") or {}).get("layers")
    if layers:  # mixed precision: never the uniform bit-width's cell
        parts.append("layers: " + ", ".join(f"{pattern}={bits}" for pattern, bits in layers))
    return "; ".join(parts)


def method_label(record: Mapping[str, Any]) -> str:
    """The method name with the options its run chose over the paper's and any other protocol change, e.g.
    ``aiqvit [rank=20; budget=smoke: calib_size=32, iters=20]``."""
    extras = "; ".join(p for p in (options_label(record), protocol_label(record)) if p)
    name = str(record["method"]["name"])
    return f"{name} [{extras}]" if extras else name


def _variant(record: Mapping[str, Any]) -> dict[str, str]:
    """What else a run depends on besides method, model, bits and seed: the weights and the data settings."""
    data = dict((record.get("config") or {}).get("data") or {})
    for key in ("root", "workers", "max_eval_images", "labels", "class_map"):  # the labels' effect: data.label_map
        data.pop(key, None)
    if data.get("label_map") == "folder order":  # as every record before label maps existed labelled
        del data["label_map"]
    calibration = (data.pop("calib_split", None), data.pop("calib_draw", None))  # COCO: where calibration images came from
    if (record.get("calibration") or {}).get("num_images") and calibration not in ((None, None), ("train", "seeded")):
        data["calibration_images"] = "/".join(map(str, calibration))  # as the run key has it (tasks/coco.py identity)
    variant = {f"data.{k}": text(v) for k, v in data.items()}
    if record["model"].get("weights_sha256"):
        variant["weights"] = str(record["model"]["weights_sha256"])[:8]
    return variant


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
    different tasks or metrics never share a cell (the cell key includes both). A run repeated with the same seed
    and settings (e.g. new code) keeps its newest record; different seeds stay (see :func:`aggregate`)."""
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
            value, source = published_value(published, task, chosen, record["method"], model, wbits, abits)
        reproduced = float(record["metrics"][chosen])
        variant = _variant(record)
        rows.append({
            "task": task,
            "metric": chosen,
            "method": method_label(record),
            "method_name": str(record["method"]["name"]),
            "options": options_label(record),
            "protocol": protocol_label(record),
            "bits": bits_label(wbits, abits) if bits else "32/32",
            "wbits": wbits or 32,
            "model": model,
            "model_name": str(record["model"]["name"]),
            "seed": record.get("seed"),
            "variant": json.dumps(variant, sort_keys=True),
            "value": reproduced,
            "published": value,
            "delta": None if value is None else reproduced - value,
            "source": source,
            "calibration_s": record["timings"].get("calibration_s"),
            "eval_s": record["timings"].get("eval_s"),
            "deploy": deploy_text(record.get("deploy")),
            "run_key": record["run_key"],
            "created": record.get("created", ""),
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame.attrs["metric"] = metric or "top1"
        return frame
    metrics = sorted(set(frame["metric"]))
    frame.attrs["metric"] = metrics[0] if len(metrics) == 1 else "/".join(metrics)
    frame["seed"] = frame["seed"].astype(object).where(frame["seed"].notna(), -1)
    same_run = ["task", "metric", "method", "bits", "model", "variant", "seed"]
    competing = int(frame.duplicated(same_run).sum())
    if competing:
        log.warning("%d record(s) repeat a run already in the table (same settings and seed, e.g. other code "
                    "version): the newest is shown; filter with --model/--method or use a separate --runs directory", competing)
    frame = frame.sort_values("created").drop_duplicates(same_run, keep="last")
    return sort_frame(frame).reset_index(drop=True)


def sort_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Full precision first, then bit-widths ascending; models in the papers' usual order (others after)."""
    rank = {name: i for i, name in enumerate(MODEL_ORDER)}
    keyed = frame.assign(_bits=frame["wbits"].where(frame["bits"] != "32/32", 0),
                         _model=frame["model"].map(lambda m: rank.get(m, len(rank))))
    keyed = keyed.sort_values(["task", "metric", "_bits", "bits", "method", "_model", "model"], kind="stable")
    return keyed.drop(columns=["_bits", "_model"])


#: The model order of the papers' tables (ViT, DeiT, Swin; small to large); other models follow.
MODEL_ORDER = ("ViT-S", "ViT-B", "DeiT-T", "DeiT-S", "DeiT-B", "Swin-T", "Swin-S", "Swin-B",
               "MaskRCNN-Swin-T", "MaskRCNN-Swin-S", "CascadeMaskRCNN-Swin-T", "CascadeMaskRCNN-Swin-S")
CELL = ["task", "metric", "method", "method_name", "options", "protocol", "bits", "wbits", "model", "model_name"]


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per table cell and protocol: seeds → ``value`` (mean), ``std``, ``n``. Records of one cell that
    differ in weights or data settings are never averaged: each keeps its own row, its ``protocol`` naming what
    differs (``weights=1a2b3c4d``)."""
    if frame.empty:
        return pd.DataFrame(columns=[*CELL, "value", "std", "n", "published", "source", "run_keys", "created", "delta", "deploy"])
    frame = frame.copy()
    for _, group in frame.groupby(CELL, dropna=False, sort=False):
        variants = list(dict.fromkeys(group["variant"]))
        if len(variants) < 2:
            continue
        parsed = [json.loads(v) for v in variants]
        differ = sorted({k for p in parsed for k in p if len({q.get(k) for q in parsed}) > 1})
        for variant, values in zip(variants, parsed):
            note = ", ".join(f"{k}={values.get(k)}" for k in differ)
            index = group.index[group["variant"] == variant]
            frame.loc[index, "protocol"] = [f"{p}; {note}" if p else note for p in frame.loc[index, "protocol"]]
            frame.loc[index, "method"] = [f"{m} {{{note}}}" for m in frame.loc[index, "method"]]
    grouped = frame.groupby(CELL, dropna=False, sort=False)
    out = grouped.agg(value=("value", "mean"), std=("value", "std"), n=("value", "size"),
                      published=("published", "first"), source=("source", "first"),
                      run_keys=("run_key", lambda keys: " ".join(keys)), created=("created", "max"),
                      deploy=("deploy", "last")).reset_index()
    out["delta"] = out["value"] - out["published"]
    out.attrs.update(frame.attrs)
    return sort_frame(out).reset_index(drop=True)


def _cell(row: pd.Series, digits: int = 2, deploy: bool = False) -> str:
    text = format_value(row["value"], row.get("std"), int(row.get("n", 1)), digits)
    if not pd.isna(row["published"]):
        text += f" ({row['published']:.2f}, {row['delta']:+.2f})"
    return with_deploy(text, row.get("deploy")) if deploy else text


def with_deploy(text: str, deploy: Any) -> str:
    """A cell's text with its integer-execution figures (``--deploy``), when its record has them."""
    return f"{text} [{deploy}]" if isinstance(deploy, str) and deploy else text


def paper_table(frame: pd.DataFrame, deploy: bool = False) -> pd.DataFrame:
    """Wide table: index (Method, W/A), one column per model; cells 'reproduced (published, Δ)', seeds aggregated
    to 'mean ± std (n=k)', with ``deploy`` also '[x86_int8 0.70x FP, 6.3/22.9 MB, 100.0% agr.]' where a record has a
    deploy section. ``frame`` is :func:`records_frame`'s (or already aggregated)."""
    if frame.empty:
        return pd.DataFrame()
    cells = frame if "n" in frame.columns else aggregate(frame)
    digits = 4 if frame.attrs.get("metric") == "logit_cosine" else 2
    cells = cells.assign(cell=cells.apply(_cell, axis=1, digits=digits, deploy=deploy))
    several = cells["metric"].nunique() > 1
    index = ["metric", "method", "bits"] if several else ["method", "bits"]
    table = cells.pivot_table(index=index, columns="model", values="cell", aggfunc="first", sort=False)
    table.columns.name = None
    table.index.names = (["Metric"] if several else []) + ["Method", "W/A"]
    return table.fillna("–")


def markdown(table: pd.DataFrame) -> str:
    """The wide table as a Markdown pipe table with Method and W/A as ordinary columns."""
    return table.reset_index().to_markdown(index=False, disable_numparse=True) if not table.empty else "(no runs)"


def write_report(frame: pd.DataFrame, out_dir: Path, name: str = "table", deploy: bool = False) -> dict[str, Path]:
    """Write ``name``.md/.tex/.csv (and .png when matplotlib can plot) under ``out_dir``; returns the paths;
    ``deploy``: cells carry their integer-execution figures (:func:`paper_table`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = aggregate(frame)
    table = paper_table(cells, deploy)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "tex", "csv")}
    metric = frame.attrs.get("metric", "top1")
    note = (f"{METRIC_LABELS.get(metric, metric)}, reproduced"
            + ("; in parentheses the published value and the difference, where published" if frame["published"].notna().any() else "")
            + ("; several seeds as mean ± std (n=seeds)" if (cells["n"] > 1).any() else "") + ".\n\n")
    paths["md"].write_text(note + markdown(table) + "\n")
    caption = f"{METRIC_LABELS.get(metric, metric)}: reproduced (published, $\\Delta$).".replace("%", "\\%")
    paths["tex"].write_text(table.to_latex(escape=True, caption=caption))
    frame.to_csv(paths["csv"], index=False)
    plot = plot_accuracy(cells, out_dir / f"{name}.png")
    if plot:
        paths["png"] = plot
    return paths


def plot_accuracy(frame: pd.DataFrame, path: Path) -> Path | None:
    """The metric per bit-width, one line per (method, model); published values as hollow markers."""
    quantized = frame[frame["bits"] != "32/32"]
    if quantized.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, model), group in quantized.groupby(["method", "model"]):
        group = group.sort_values("wbits")
        line = ax.plot(group["bits"], group["value"], marker="o", label=f"{method} · {model}")[0]
        known = group[group["published"].notna()]
        if len(known):
            ax.plot(known["bits"], known["published"], marker="o", markerfacecolor="none", linestyle="none",
                    color=line.get_color())
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
