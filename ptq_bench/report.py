"""Aggregate run records into paper-style tables.

    python -m ptq_bench.report [--runs results/runs] [--out results/tables] [--name table] [--model deit_tiny ...]
    python -m ptq_bench.report --paper repqvit_table1 [--sources]   # one paper's table, its exact layout
    python -m ptq_bench.report --papers                            # the paper tables and how many cells run here
    python -m ptq_bench.report --quantized <run_key>     # what one run quantized: module, role, bits, quantizer

Bad input (an --out that cannot be a writable folder, an unreadable published CSV) is one ``error:`` line and exit
code 2, before any table is computed; a damaged record file or published CSV row is skipped with one warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ptq_bench.checks import writable_directory
from ptq_bench.errors import ConfigError, PTQBenchError
from ptq_bench.results.published import DEFAULT_CSV, load_published
from ptq_bench.results.report import markdown, paper_table, quantized_table, records_frame, write_report
from ptq_bench.results.store import RecordStore

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """The command line; a :class:`PTQBenchError` is one ``error:`` line and exit code 2."""
    try:
        return report(argv)
    except PTQBenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def report(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description="Turn run records into Markdown/LaTeX/CSV tables and a plot.")
    parser.add_argument("--runs", type=Path, default=REPO / "results" / "runs", help="directory of run records")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "tables", help="where to write the tables")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: table, or the paper table's name)")
    parser.add_argument("--model", nargs="*", help="keep only these models (harness names, e.g. deit_tiny)")
    parser.add_argument("--method", nargs="*", help="keep only these methods (e.g. fp minmax repq_vit)")
    parser.add_argument("--metric", default=None, help="default: each task's primary metric (top1, bbox_mAP); or top5, "
                        "fp_top1_agreement, logit_cosine, segm_mAP, ...")
    parser.add_argument("--paper", metavar="TABLE", help="lay out one paper table (conf/paper/TABLE.yaml) in its layout, "
                        "published-only rows and not-yet-run cells included")
    parser.add_argument("--sources", action="store_true", help="with --paper: also print where each published value comes from")
    parser.add_argument("--deploy", action="store_true", help="cells also show their record's integer execution "
                        "(deploy=x86_int8: int8/FP latency ratio, int8/FP MB, top-1 agreement; docs/deploy.md)")
    parser.add_argument("--papers", action="store_true", help="list the paper tables with their cell counts, and stop")
    parser.add_argument("--quantized", metavar="RUN_KEY", help="print what the run RUN_KEY quantized, and stop")
    parser.add_argument("--published", type=Path, default=DEFAULT_CSV, metavar="CSV",
                        help="the published numbers (default: results/published/published.csv)")
    args = parser.parse_args(argv)
    if args.quantized:
        record = RecordStore(args.runs).load_valid(args.quantized)
        if record is None:
            parser.exit(1, f"error: no valid record {args.quantized} in {args.runs}\n")
        print(quantized_table(record))
        return 0
    if args.published != DEFAULT_CSV and not args.published.is_file():
        raise ConfigError(f"--published={str(args.published)!r}: no such file")
    published = load_published(args.published)
    if args.papers:
        print(papers_table(published))
        return 0
    spec = paper_spec(args.paper) if args.paper else None
    writable_directory(args.out, "--out")
    valid, skipped = RecordStore(args.runs).scan() if args.runs.is_dir() else ([], [])
    if skipped:
        print(f"skipped {len(skipped)} damaged record file(s) in {args.runs} (named in the warnings above)")
    records = [
        r for r in valid
        if (not args.model or r["model"]["name"] in args.model) and (not args.method or r["method"]["name"] in args.method)
    ]
    if spec is not None:
        return paper_report(spec, records, args.out, args.name, args.sources, published, args.deploy)
    if not records:
        parser.exit(1, f"error: no run records in {args.runs}\n")
    frame = records_frame(records, published, metric=args.metric)
    if frame.empty:
        parser.exit(1, f"error: no record in {args.runs} has metric '{args.metric or 'primary'}'\n")
    paths = write_report(frame, args.out, args.name or "table", args.deploy)
    print(markdown(paper_table(frame, args.deploy)))
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    return 0


def paper_spec(name: str) -> Any:
    """The paper table ``name`` (conf/paper/<name>.yaml); ConfigError naming the tables otherwise."""
    from ptq_bench.results import paper

    return paper.load_spec(name)


def paper_report(spec: Any, records: list[dict], out: Path, stem: str | None, show_sources: bool,
                 published: pd.DataFrame | None = None, deploy: bool = False) -> int:
    """Print and write the paper table ``spec`` from ``records`` (none needed: published values and gaps show)."""
    from ptq_bench.results import paper

    cells, paths = paper.regenerate(spec, records, out, stem, published, deploy)
    print(paper.to_markdown(spec, paper.wide(spec, cells)))
    if show_sources:
        table = paper.sources(cells)
        print("Sources of the published values:\n\n" + (table.to_markdown(index=False, disable_numparse=True) if len(table) else "(none)"))
    print(f"\n{coverage_line(cells)}. written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def coverage_line(cells: pd.DataFrame) -> str:
    """How many of the paper's reproducible cells have records; cells of rows run at other protocols (budget,
    options, evaluation subset, random weights) are counted apart, never in the paper's total."""
    if not len(cells):
        return "0 of 0 reproducible cells have records"
    own = cells["kind"] == "paper"
    done = int((own & (cells["status"] == "reproduced")).sum())
    runnable = int((own & cells["status"].isin(["reproduced", "missing"])).sum())
    others = int((~own & (cells["status"] == "reproduced")).sum())
    line = f"{done} of {runnable} reproducible cells have records"
    return line + (f" (and {others} more in rows of other protocols)" if others else "")


def papers_table(published: pd.DataFrame | None = None) -> str:
    """The paper tables: title, cells printed, reproducible here (run rows on available models), published only."""
    from ptq_bench.results import paper

    rows = []
    for name in paper.spec_names():
        spec = paper.load_spec(name)
        counts = paper.coverage(spec, published)
        rows.append({"table": name, "task": spec.task, "title": spec.title, **counts})
    return pd.DataFrame(rows).to_markdown(index=False)


if __name__ == "__main__":
    raise SystemExit(main())
