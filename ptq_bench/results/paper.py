"""Paper tables: a spec per table a paper prints (``conf/paper/<name>.yaml``), laid out from run records.

A spec gives the paper's model columns (its names and order, and the harness model that reproduces each), its
W/A blocks in order, and in each block its rows as printed: methods this project runs (``run``) and baselines it
does not (published values only). :func:`layout` fills every cell: "reproduced (published, Δ)" where records
exist (seeds as "mean ± std (n=k)"), "– (published)" where the cell could be run but has no record yet, the
published value alone in published-only rows, "–" where the paper prints nothing. Records whose protocol differs
from the paper's (a budget, other options, an evaluation subset) get their own row under the paper's row, never
the paper's cell.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
from omegaconf import OmegaConf

from ptq_bench.errors import ConfigError
from ptq_bench.methods.base import METHODS
from ptq_bench.methods.options import method_defaults
from ptq_bench.paths import conf_path
from ptq_bench.results.formatting import format_value, text
from ptq_bench.results.report import aggregate, records_frame, with_deploy
from ptq_bench.results.published import METHOD_ALIASES, Published, candidates, choose, load_published

SPEC_DIR = conf_path("paper")
FP_BITS = "32/32"
METRIC_NAMES = {"top1": "top-1 (%)", "bbox_mAP": "box AP (%)", "segm_mAP": "mask AP (%)"}
ORIENTATIONS = ("models_as_columns", "models_as_rows", "bits_as_columns")


@dataclass(frozen=True)
class Column:
    """A model as the paper prints it; ``model`` is the harness model config (None: not available here)."""

    name: str
    published: str
    model: str | None


@dataclass(frozen=True)
class Row:
    """A method row of a block: ``run`` is the harness method reproducing it (None: published values only)."""

    label: str
    published: str | None
    run: str | None
    options: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] | None = None  # the columns where the paper prints a value (None: all)


@dataclass(frozen=True)
class Block:
    bits: str  # "W4A4", or "32/32" for full precision
    label: str  # as the paper prints it, e.g. "4/4"
    rows: tuple[Row, ...]

    @property
    def wa(self) -> tuple[int, int] | None:
        if self.bits == FP_BITS:
            return None
        w, a = self.bits[1:].split("A")
        return int(w), int(a)


@dataclass(frozen=True)
class Metric:
    key: str  # the record's metric (top1, bbox_mAP, segm_mAP)
    label: str  # the paper's column name


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    paper: str  # the CSV's paper whose rows are this table's own
    source: str  # what the CSV's source of this table contains, e.g. "Table 1"
    task: str
    metrics: tuple[Metric, ...]
    columns: tuple[Column, ...]
    blocks: tuple[Block, ...]
    orientation: str = "models_as_columns"  # models_as_rows (PTQ4ViT's Table 1), bits_as_columns (ablations)
    column_order: str = "bits"  # models_as_rows: columns grouped by block ("bits") or by method row ("method")
    notes: str = ""

    def has_cell(self, model: str, method: str, bits: str) -> bool:
        """Whether harness ``model`` × ``method`` × ``bits`` ("W4A4") is a cell of a run row (a method without bits,
        such as fp: any bits, in an FP block)."""
        fp = method in METHODS.names() and not METHODS.get(method).uses_bits
        return any(c == (model, method, FP_BITS if fp else bits) for c in self.runnable_cells())

    def runnable_cells(self) -> list[tuple[str, str, str]]:
        """(harness model, harness method, bits) of every cell a run can fill, in table order, without repeats."""
        cells = []
        for block in self.blocks:
            for row in block.rows:
                for column in self.row_columns(row):
                    if row.run and column.model:
                        cells.append((column.model, row.run, block.bits))
        return list(dict.fromkeys(cells))

    def row_columns(self, row: Row) -> list[Column]:
        return [c for c in self.columns if row.models is None or c.name in row.models]


def spec_names() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(name: str, directory: Path = SPEC_DIR) -> TableSpec:
    """The table spec ``directory/<name>.yaml``; one-line ConfigError for an unknown name or a malformed spec."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise ConfigError(f"unknown paper table '{name}' (known: {known})")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    try:
        return _parse(name, raw)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"paper table {path}: {type(error).__name__}: {error}") from None


def _parse(name: str, raw: dict[str, Any]) -> TableSpec:
    columns = tuple(Column(str(c["name"]), str(c.get("published", c["name"])), c.get("model")) for c in raw["models"])
    names = {c.name for c in columns}
    blocks = []
    for block in raw["blocks"]:
        bits = str(block["bits"]).upper()
        bits = FP_BITS if bits in ("FP", "32/32", "W32A32") else bits
        if bits != FP_BITS and not (bits.startswith("W") and "A" in bits):
            raise ValueError(f"block bits '{block['bits']}': W<w>A<a> or FP")
        rows = []
        for row in block["rows"]:
            run = row.get("run")
            if run is not None and not conf_path("method", f"{run}.yaml").is_file():
                raise ValueError(f"row '{row['label']}': no method '{run}'")
            default = METHOD_ALIASES[run][0] if run in METHOD_ALIASES else str(row["label"])
            models = tuple(row["models"]) if row.get("models") is not None else None
            if models and set(models) - names:
                raise ValueError(f"row '{row['label']}': unknown models {sorted(set(models) - names)}")
            rows.append(Row(str(row["label"]), row.get("published", default), run, dict(row.get("options") or {}), models))
        label = str(block.get("label", "32/32" if bits == FP_BITS else bits))
        blocks.append(Block(bits, label, tuple(rows)))
    metrics = tuple(Metric(str(m), str(m)) if isinstance(m, str) else Metric(str(m["key"]), str(m.get("label", m["key"])))
                    for m in raw.get("metrics", ["top1"]))
    orientation = str(raw.get("orientation", "models_as_columns"))
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation '{orientation}': one of {', '.join(ORIENTATIONS)}")
    column_order = str(raw.get("column_order", "bits"))
    if column_order not in ("bits", "method"):
        raise ValueError(f"column_order '{column_order}': bits or method")
    return TableSpec(name, str(raw["title"]), str(raw["paper"]), str(raw["source"]), str(raw.get("task", "classification")),
                     metrics, columns, tuple(blocks), orientation, column_order, str(raw.get("notes", "")).strip())


def coverage(spec: TableSpec, published: pd.DataFrame | None = None) -> dict[str, int]:
    """Counts of the spec's cells: all printed, reproducible here (run row, model available), published-only."""
    published = load_published() if published is None else published
    total = runnable = with_value = 0
    for block in spec.blocks:
        for row in block.rows:
            for column in spec.row_columns(row):
                for metric in spec.metrics:
                    total += 1
                    runnable += bool(row.run and column.model and model_available(column.model))
                    with_value += _published(spec, published, block, row, column, metric) is not None
    return {"cells": total, "reproducible": runnable, "published_only": total - runnable, "with_published_value": with_value}


def model_available(model: str) -> bool:
    """Whether ``conf/model/<model>.yaml`` exists (a run can reproduce cells of that model)."""
    return (SPEC_DIR.parent / "model" / f"{model}.yaml").is_file()


def _published(spec: TableSpec, table: pd.DataFrame, block: Block, row: Row, column: Column, metric: Metric) -> Published | None:
    if row.published is None:
        return None
    wa = block.wa
    rows = candidates(table, spec.task, metric.key, row.published, column.published, *(wa or (None, None)))
    papers = METHOD_ALIASES[row.run][1] if row.run in METHOD_ALIASES else ()
    return choose(rows, spec.paper, spec.source, papers)


def _options_label(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={text(v)}" for k, v in sorted(options.items()))


def layout(spec: TableSpec, cells: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every cell of ``spec`` as a long frame (table order): block, row, column, metric, reproduced value (mean, std,
    n), published value and source, delta, status and the cell's text. ``cells`` are aggregated records
    (:func:`ptq_bench.results.report.aggregate`); its rows that match no cell are left out."""
    published = load_published() if published is None else published
    out: list[dict[str, Any]] = []
    for block in spec.blocks:
        for row in block.rows:
            out += _row_cells(spec, cells, published, block, row, "", _options_label(row.options), "")
            if not row.run:
                continue
            for note, (options, protocol) in _other_protocols(spec, cells, block, row):
                out += _row_cells(spec, cells, published, block, row, note, options, protocol)
    return pd.DataFrame(out)


def _matches(spec: TableSpec, cells: pd.DataFrame, block: Block, row: Row) -> pd.DataFrame:
    """Aggregated records of ``row``'s method at ``block``'s bits on the spec's models and metrics."""
    if cells.empty or not row.run:
        return cells.iloc[0:0]
    models = [c.model for c in spec.row_columns(row) if c.model]
    keep = ((cells["task"] == spec.task) & (cells["method_name"] == row.run) & (cells["bits"] == block.bits)
            & cells["model_name"].isin(models) & cells["metric"].isin([m.key for m in spec.metrics]))
    return cells[keep]


def _other_protocols(spec: TableSpec, cells: pd.DataFrame, block: Block, row: Row) -> list[tuple[str, tuple[str, str]]]:
    """(label suffix, (options, protocol)) of the records of ``row``'s method in ``block`` that ran another protocol
    than the paper's: ``row``'s options under a budget or on an evaluation subset, and (on the method's home row, the
    one without options) options that no row of the block names."""
    own = _options_label(row.options)
    claimed = {_options_label(r.options) for r in block.rows if r.run == row.run}
    home = next((r for r in block.rows if r.run == row.run and not r.options), None) or next(r for r in block.rows if r.run == row.run)
    found = _matches(spec, cells, block, row)[["options", "protocol"]].drop_duplicates()
    extras = []
    for options, protocol in found.itertuples(index=False):
        if (options == own and protocol) or (options not in claimed and row is home):
            extras.append(("; ".join(p for p in (_variant_options(options, own, row), protocol) if p), (options, protocol)))
    return extras


def _variant_options(options: str, own: str, row: Row) -> str:
    """The options part of a variant row's label: the record's options, or, for a record at the method's YAML under a
    row that names options, the YAML's values of those options (so it never reads as the row itself)."""
    if options == own:
        return ""
    if options:
        return options
    defaults = method_defaults(str(row.run))
    return _options_label({key: defaults.get(key) for key in row.options})


def _row_cells(spec: TableSpec, cells: pd.DataFrame, published: pd.DataFrame, block: Block, row: Row, note: str,
               options: str, protocol: str) -> list[dict[str, Any]]:
    """The cells of ``row`` (``note`` "": the paper's protocol; else the label suffix of another protocol's row)
    from the aggregated records with exactly ``options`` and ``protocol``."""
    kind, label = ("variant", f"{row.label} [{note}]") if note else ("paper", row.label)
    matches = _matches(spec, cells, block, row)
    matches = matches[(matches["options"] == options) & (matches["protocol"] == protocol)]
    out = []
    for column in spec.columns:
        for metric in spec.metrics:
            printed = row.models is None or column.name in row.models
            pub = _published(spec, published, block, row, column, metric) if printed and kind == "paper" else None
            hit = matches[(matches["model_name"] == column.model) & (matches["metric"] == metric.key)] if column.model else matches.iloc[0:0]
            entry = {"block": block.label, "bits": block.bits, "row": label, "base_row": row.label, "note": note,
                     "method": row.run or "", "kind": kind,
                     "column": column.name, "model": column.model or "", "metric": metric.key, "metric_label": metric.label,
                     "reproduced": None, "std": None, "n": 0, "published": pub.value if pub else None, "delta": None,
                     "source": pub.where if pub else "", "other_sources": "; ".join(pub.others) if pub else "",
                     "run_keys": ""}
            digits = 4 if metric.key == "logit_cosine" else 2
            if len(hit):
                got = hit.iloc[0]
                entry.update(reproduced=float(got["value"]), std=got["std"], n=int(got["n"]), run_keys=got["run_keys"],
                             deploy=got.get("deploy") or "")
                text = format_value(entry["reproduced"], got["std"], entry["n"], digits)
                if pub:
                    entry["delta"] = entry["reproduced"] - pub.value
                    text += f" ({pub.value:.2f}, {entry['delta']:+.2f})"
                status = "reproduced"
            elif row.run and column.model and printed:
                status, text = "missing", f"– ({pub.value:.2f})" if pub else "–"
            elif pub and not row.run:
                status, text = "published only", f"{pub.value:.2f}"
            elif pub:
                status, text = "not reproducible here", f"n/a ({pub.value:.2f})"
            else:
                status, text = "empty", "–"
            if kind == "variant" and not len(hit):
                status, text = "not run in this protocol", ""
            entry.update(status=status, text=text)
            out.append(entry)
    return out


def wide(spec: TableSpec, cells: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout of the cell texts: (W/A, Method) × models (models_as_columns), models × (Method, W/A)
    (models_as_rows) or (Model, Method) × W/A (bits_as_columns)."""
    if cells.empty:
        return pd.DataFrame()
    frame = cells.copy()
    frame["Method"] = frame["row"] + frame["method"].map(lambda m: "" if m else " †")
    several = len(spec.metrics) > 1
    frame["col"] = frame["column"] + (" " + frame["metric_label"] if several else "")
    col_order = [c.name + (f" {m.label}" if several else "") for c in spec.columns for m in spec.metrics]
    if spec.orientation == "models_as_rows":
        frame["head"] = (frame["base_row"] + frame["method"].map(lambda m: "" if m else " †")
                         + (" " + frame["block"]).where(frame["bits"] != FP_BITS, "")
                         + frame["note"].map(lambda n: f" [{n}]" if n else ""))
        heads = list(dict.fromkeys(frame["head"]))
        if spec.column_order == "method":
            first = {m: i for i, m in enumerate(dict.fromkeys(frame["base_row"]))}
            owner = dict(zip(frame["head"], frame["base_row"]))
            heads.sort(key=lambda h: first[owner[h]])  # stable: blocks keep their order within a method
        return _pivot(frame, "col", "head", col_order, heads, "Model")
    if spec.orientation == "bits_as_columns":
        frame["key"] = list(zip(frame["col"], frame["Method"]))
        keys = sorted(dict.fromkeys(frame["key"]), key=lambda k: col_order.index(k[0]))
        table = _pivot(frame, "key", "block", keys, list(dict.fromkeys(frame["block"])), None)
        table.index = pd.MultiIndex.from_tuples(keys, names=["Model", "Method"])
        return table
    frame["key"] = list(zip(frame["block"], frame["Method"]))
    keys = list(dict.fromkeys(frame["key"]))
    table = _pivot(frame, "key", "col", keys, col_order, None)
    table.index = pd.MultiIndex.from_tuples(keys, names=["W/A", "Method"])
    return table


def _pivot(frame: pd.DataFrame, index: str, columns: str, index_order: list, column_order: list, name: str | None) -> pd.DataFrame:
    table = frame.pivot_table(index=index, columns=columns, values="text", aggfunc="first", sort=False)
    table = table.reindex(index=index_order, columns=column_order)
    table.index.name, table.columns.name = name, None
    return table.fillna("")


def sources(cells: pd.DataFrame) -> pd.DataFrame:
    """Where each published value of the table comes from (and what other sources print for the same cell)."""
    if cells.empty:
        return pd.DataFrame()
    keep = cells[cells["published"].notna()].assign(published=lambda c: c["published"].map(lambda v: f"{v:.2f}"))
    return keep[["block", "row", "column", "metric_label", "published", "source", "other_sources"]].rename(
        columns={"block": "W/A", "row": "Method", "column": "Model", "metric_label": "Metric", "published": "Published",
                 "source": "Source", "other_sources": "Other sources (disagreeing)"}).reset_index(drop=True)


LEGEND = ("a (p, Δ): reproduced a, published p, Δ = a − p; a ± s (n=k): mean and standard deviation over k seeds; "
          "– (p): not run yet, published p; n/a (p): no model config here; † published values only (method not "
          "implemented here); "
          "[...] a protocol other than the paper's (budget, options, evaluation subset): never merged with the paper's row.")


def to_markdown(spec: TableSpec, table: pd.DataFrame) -> str:
    body = table.reset_index().to_markdown(index=False, disable_numparse=True) if not table.empty else "(empty)"
    notes = f"\n\n{spec.notes}" if spec.notes else ""
    return f"**{spec.title}**\n\n{body}\n\n{LEGEND}{notes}\n"


def write(spec: TableSpec, cells: pd.DataFrame, out_dir: Path, name: str | None = None) -> dict[str, Path]:
    """``<name>.md/.tex/.csv``, ``<name>_sources.csv`` and ``<name>.png`` under ``out_dir``; returns the paths."""
    name = name or spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    table = wide(spec, cells)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "tex", "csv")}
    paths["md"].write_text(to_markdown(spec, table))
    caption = f"{spec.title}. Reproduced (published, $\\Delta$); \\dag{{}}: published only.".replace("%", "\\%")
    paths["tex"].write_text(table.to_latex(escape=True, caption=caption, label=f"tab:{name}"))
    cells.to_csv(paths["csv"], index=False)
    paths["sources"] = out_dir / f"{name}_sources.csv"
    sources(cells).to_csv(paths["sources"], index=False)
    plot = plot_spec(spec, cells, out_dir / f"{name}.png")
    if plot:
        paths["png"] = plot
    return paths


def plot_spec(spec: TableSpec, cells: pd.DataFrame, path: Path) -> Path | None:
    """One panel per model (and metric): the metric against the bit-width, one colour per method row; reproduced
    values filled and joined, published values hollow; FP as horizontal lines (solid reproduced, dotted published)."""
    if cells.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantized = [b for b in spec.blocks if b.bits != FP_BITS]
    order = [b.label for b in sorted(quantized, key=lambda b: b.wa)]  # bit-width ascending, left to right
    panels = [(c, m) for c in spec.columns for m in spec.metrics]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width, height = max(5.0, 3.4 * ncols), 2.9 * nrows + 1.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(cells["row"]))}
    x = {label: i for i, label in enumerate(order)}
    for ax, (column, metric) in zip(axes.flat, panels):
        here = cells[(cells["column"] == column.name) & (cells["metric"] == metric.key)]
        for label, group in here.groupby("row", sort=False):
            quant = group[group["bits"] != FP_BITS].assign(x=lambda g: g["block"].map(x)).sort_values("x")
            color = colors[label]
            if (group["bits"] == FP_BITS).all():
                for value, style in ((group["reproduced"], "-"), (group["published"], ":")):
                    value = value.dropna()
                    if len(value):
                        ax.axhline(float(value.iloc[0]), color="gray", linestyle=style, linewidth=0.9)
                continue
            done = quant[quant["reproduced"].notna()]
            if len(done):
                ax.plot(done["x"], done["reproduced"], marker="o", color=color, label=label)
            pub = quant[quant["published"].notna()]
            if len(pub):
                runs = bool(group["method"].iloc[0])
                ax.plot(pub["x"], pub["published"], marker="o", markerfacecolor="none", linestyle="--" if runs else ":",
                        color=color, linewidth=0.8, label=f"{label} (published)" if runs else f"{label} †")
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_title(column.name + (f" {metric.label}" if len(spec.metrics) > 1 else ""), fontsize=9)
        ax.set_ylabel(metric.label if len(spec.metrics) > 1 else METRIC_NAMES.get(metric.key, metric.key), fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = {}, []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center", ncol=min(4, max(1, len(handles))),
               bbox_to_anchor=(0.5, 0.0))
    title = textwrap.wrap(spec.title, int(width * 11))
    fig.suptitle("\n".join(title), fontsize=9)
    legend_rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, (0.1 + 0.22 * legend_rows) / height, 1, 1 - (0.1 + 0.18 * len(title)) / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def regenerate(spec: TableSpec, records: Iterable[Mapping[str, Any]], out_dir: Path, name: str | None = None,
               published: pd.DataFrame | None = None, deploy: bool = False) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Lay ``spec`` out from ``records`` and write it; returns the long cell frame and the written paths.
    ``deploy``: reproduced cells carry their records' integer-execution figures (``--deploy``)."""
    published = load_published() if published is None else published
    frame = records_frame(records, published)
    frame = frame[frame["task"] == spec.task] if not frame.empty else frame
    cells = layout(spec, aggregate(frame), published)
    if deploy and len(cells):
        cells["text"] = [with_deploy(t, d) for t, d in zip(cells["text"], cells.get("deploy", [""] * len(cells)))]
    return cells, write(spec, cells, out_dir, name)
