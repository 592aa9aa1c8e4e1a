"""Published numbers: load ``results/published/published.csv`` and choose the one number a table cell shows.

Rows are keyed by the CSV's (task, metric), which :data:`METRIC_KEYS` maps from a record's (task, metric): every
task's published rows are loaded, and a task adapter's metric finds its published counterpart here.

Several papers (and a paper's PDF and its repository's README) often print a value for the same method, model
and bit-width. :func:`choose` keeps one per cell: the table's own source first (a paper's table spec names its
paper and table), then the method's own paper, then any other; primary sources before ``SECONDARY`` ones. The
values of the other sources that disagree are kept as notes, so the report can say where each number comes from.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ptq_bench.errors import DataError

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "results" / "published" / "published.csv"

#: harness method name -> (method name in the CSV, papers in order of preference: the method's own paper first).
METHOD_ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fp": ("Full-Precision", ("RepQ-ViT", "APHQ-ViT", "PTQ4ViT")),
    "repq_vit": ("RepQ-ViT", ("RepQ-ViT", "APHQ-ViT")),
    "ptq4vit": ("PTQ4ViT", ("PTQ4ViT", "RepQ-ViT", "APHQ-ViT")),
    "base_ptq": ("BasePTQ", ("PTQ4ViT",)),
    "dopq_vit": ("DopQ-ViT", ("APHQ-ViT", "GLF-Q (2026 preprint)", "Korean benchmark README")),
    "aiqvit": ("AIQViT", ("AIQViT",)),
    "adalog": ("AdaLog (calibration only)", ("AdaLog",)),  # its README's "Calibrate" column (optimize=true: below)
    "erq": ("ERQ (TPAMI)", ("ERQ (TPAMI 2025)",)),  # the official README's table (the code is the TPAMI extension)
    "aphq_vit": ("APHQ-ViT", ("APHQ-ViT", "GLF-Q (2026 preprint)")),
    "aphq_vit_mlp": ("APHQ-ViT MLP-Reconstruction only (GELU->ReLU, FP, no quant)", ("APHQ-ViT",)),  # README column
    "qdrop": ("QDrop (reproduced by APHQ authors)", ("APHQ-ViT",)),  # the APHQ-ViT code base's QDrop, as implemented
    "ias_vit": ("I&S-ViT", ("I&S-ViT", "APHQ-ViT", "GLF-Q (2026 preprint)")),
    "fima_q": ("FIMA-Q", ("FIMA-Q",)),  # its official README's results table (the configs' rank k = 5, see its doc)
}

#: (harness method, boolean option) -> the published method of a run with that option on, as in METHOD_ALIASES.
OPTION_ALIASES: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("adalog", "optimize"): ("AdaLog + BRECQ-style block recon ('Retrain')", ("AdaLog",)),  # the README's "Retrain"
}


def method_alias(method: str | Mapping[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """(CSV method, papers) of harness ``method``: a name, or a record's ``method`` section (its name and the options
    in its run key), where an option of :data:`OPTION_ALIASES` that is on selects its variant; None if not filed."""
    name = method if isinstance(method, str) else str(method["name"])
    if not isinstance(method, str):
        for (alias_method, option), alias in OPTION_ALIASES.items():
            if alias_method == name and method.get(option) is True:
                return alias
    return METHOD_ALIASES.get(name)


#: (record task, record metric) -> (CSV task, CSV metric). COCO AP is recorded in percent, as papers print it.
METRIC_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("classification", "top1"): ("cls", "top1"),
    ("coco", "bbox_mAP"): ("det", "box_ap"),
    ("coco", "segm_mAP"): ("seg", "mask_ap"),
}
COLUMNS = ["paper", "method", "model", "task", "dataset", "wbits", "abits", "metric", "value", "source"]
SECONDARY = "SECONDARY"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    """The one published value of a cell, where it comes from, and what other sources print for it."""

    value: float
    paper: str
    source: str
    others: tuple[str, ...] = field(default=())  # "78.29 (APHQ-ViT: ... Table 1)" for sources that disagree

    @property
    def where(self) -> str:
        return f"{self.paper}: {self.source}"


def load_published(path: Path = DEFAULT_CSV) -> pd.DataFrame:
    """Every row of the published CSV, all tasks (empty frame if the file is absent).

    The file is never trusted, as the record store never trusts its folder: a row that is not a published number
    (a field too many or too few, a ``value`` that is not a finite number, a ``wbits``/``abits`` that is not an
    integer) is skipped with one warning naming the file and line; a file that cannot be read, or whose header lacks
    a column, is one :class:`DataError`."""
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    rows: list[list[str]] = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in COLUMNS if name not in header]
            if missing:
                raise DataError(f"published CSV {path}: its header line has no column(s) {', '.join(missing)} "
                                f"(expected: {','.join(COLUMNS)})")
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue  # a blank line
                problem = row_problem(header, fields)
                if problem:
                    log.warning("skipped line %d of the published CSV %s: %s", reader.line_num, path, problem)
                    continue
                rows.append(fields)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"published CSV {path}: unreadable ({type(error).__name__}: {error})") from None
    table = pd.DataFrame(rows, columns=header)
    return table.astype({"wbits": "int64", "abits": "int64", "value": "float64"})


def row_problem(header: Sequence[str], fields: Sequence[str]) -> str | None:
    """Why ``fields`` (one CSV row) is not a published number under ``header``, or None when it is one."""
    if len(fields) != len(header):
        return f"{len(fields)} fields where the header has {len(header)}"
    row = dict(zip(header, fields))
    for name in ("wbits", "abits"):
        if not re.fullmatch(r"\s*\d+\s*", row[name]):
            return f"{name}={row[name]!r} is not an integer bit-width"
    try:
        value = float(row["value"])
    except ValueError:
        return f"value={row['value']!r} is not a number"
    if not math.isfinite(value):
        return f"value={row['value']!r} is not a finite number"
    return None


def candidates(table: pd.DataFrame, task: str, metric: str, method: str, model: str,
               wbits: int | None, abits: int | None) -> pd.DataFrame:
    """The CSV rows for CSV ``method`` on CSV ``model`` at ``wbits``/``abits`` (None: full precision) of the record
    (task, metric); empty when the metric has no published counterpart."""
    if (task, metric) not in METRIC_KEYS or table.empty:
        return table.iloc[0:0]
    csv_task, csv_metric = METRIC_KEYS[(task, metric)]
    w, a = (32, 32) if wbits is None else (wbits, abits)
    keep = ((table["task"] == csv_task) & (table["metric"] == csv_metric) & (table["method"] == method)
            & (table["model"] == model) & (table["wbits"] == w) & (table["abits"] == a))
    return table[keep]


def choose(rows: pd.DataFrame, own_paper: str | None = None, own_source: str | None = None,
           papers: Sequence[str] = ()) -> Published | None:
    """One value of ``rows`` (candidates of one cell): the table's own (``own_paper`` and ``own_source`` in the
    source), then ``own_paper``, then ``papers`` in order, then any other; within each, primary before secondary
    sources and a paper's table before a repository README."""
    if rows.empty:
        return None

    def rank(row: pd.Series) -> tuple[int, int, int]:
        paper, source = str(row["paper"]), str(row["source"])
        if own_paper and paper == own_paper and own_source and own_source in source:
            group = 0
        elif own_paper and paper == own_paper:
            group = 1
        elif paper in papers:
            group = 2 + list(papers).index(paper)
        else:
            group = 2 + len(papers)
        return group, int(SECONDARY in source), int(group > 0 and "README" in source)  # a paper's table before a README

    ranked = sorted(rows.to_dict("records"), key=lambda r: rank(pd.Series(r)))
    best = ranked[0]
    value = float(best["value"])
    others = tuple(dict.fromkeys(f"{float(r['value']):g} ({r['paper']}: {r['source']})"
                                 for r in ranked[1:] if abs(float(r["value"]) - value) > 1e-9))
    return Published(value, str(best["paper"]), str(best["source"]), others)


def published_value(
    table: pd.DataFrame, task: str, metric: str, method: str | Mapping[str, Any], model: str, wbits: int | None,
    abits: int | None
) -> tuple[float | None, str | None]:
    """The published ``metric`` of harness ``method`` (:func:`method_alias`) on ``model`` (its display name, e.g.
    "DeiT-T") for ``task``, or (None, None) when none is filed; the method's own paper first, primary before
    secondary sources."""
    alias = method_alias(method)
    if alias is None:
        return None, None
    name, papers = alias
    chosen = choose(candidates(table, task, metric, name, model, wbits, abits), papers=papers)
    return (chosen.value, chosen.where) if chosen else (None, None)
