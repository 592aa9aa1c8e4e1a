"""Aggregate run records into paper-style tables.

    python -m ptq_bench.report [--runs results/runs] [--out results/tables] [--name table] [--model deit_tiny ...]
    python -m ptq_bench.report --quantized <run_key>     # what one run quantized: module, role, bits, quantizer
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ptq_bench.results.report import markdown, paper_table, quantized_table, records_frame, write_report
from ptq_bench.results.store import RecordStore

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Turn run records into Markdown/LaTeX/CSV tables and a plot.")
    parser.add_argument("--runs", type=Path, default=REPO / "results" / "runs", help="directory of run records")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "tables", help="where to write the tables")
    parser.add_argument("--name", default="table", help="file name stem of the outputs")
    parser.add_argument("--model", nargs="*", help="keep only these models (harness names, e.g. deit_tiny)")
    parser.add_argument("--method", nargs="*", help="keep only these methods (e.g. fp minmax repq_vit)")
    parser.add_argument("--metric", default=None, help="default: each task's primary metric (top1, bbox_mAP); or top5, "
                        "fp_top1_agreement, logit_cosine, segm_mAP, ...")
    parser.add_argument("--quantized", metavar="RUN_KEY", help="print what the run RUN_KEY quantized, and stop")
    args = parser.parse_args(argv)
    if args.quantized:
        record = RecordStore(args.runs).load_valid(args.quantized)
        if record is None:
            parser.exit(1, f"error: no valid record {args.quantized} in {args.runs}\n")
        print(quantized_table(record))
        return 0
    valid, skipped = RecordStore(args.runs).scan()
    if skipped:
        print(f"skipped {len(skipped)} damaged record file(s) in {args.runs} (named in the warnings above)")
    records = [
        r for r in valid
        if (not args.model or r["model"]["name"] in args.model) and (not args.method or r["method"]["name"] in args.method)
    ]
    if not records:
        parser.exit(1, f"error: no run records in {args.runs}\n")
    frame = records_frame(records, metric=args.metric)
    if frame.empty:
        parser.exit(1, f"error: no record in {args.runs} has metric '{args.metric or 'primary'}'\n")
    paths = write_report(frame, args.out, args.name)
    print(markdown(paper_table(frame)))
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
