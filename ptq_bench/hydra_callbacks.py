"""Hydra callback: at the end of a multirun, print and save the table of the runs it produced or resumed.

A sweep started by ``+experiment=<table>`` (``paper_table`` set) lays out that paper table (conf/paper/<table>.yaml);
any other sweep gets the generic method × bits × model table. Both go to the sweep folder (.md/.tex/.csv/.png) and,
with wandb on, into one artifact (offline by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ptq_bench.results.store import RecordStore

        sweep_dir = Path(config.hydra.sweep.dir)
        keys_file = sweep_dir / "run_keys.txt"
        if config.get("dry_run") or not keys_file.is_file():
            return
        store = RecordStore(config.results_dir)
        records = [r for r in (store.load_valid(k) for k in dict.fromkeys(keys_file.read_text().split())) if r is not None]
        if config.get("paper_table"):
            self._paper(config, records, sweep_dir)
        else:
            self._generic(config, records, sweep_dir)

    @staticmethod
    def _paper(config: DictConfig, records: list[dict[str, Any]], sweep_dir: Path) -> None:
        from ptq_bench.results import paper
        from ptq_bench.tracking import log_table_artifact

        spec = paper.load_spec(str(config.paper_table))
        cells, paths = paper.regenerate(spec, records, sweep_dir)
        print("\n" + paper.to_markdown(spec, paper.wide(spec, cells)))
        print(f"tables: {', '.join(str(p) for p in paths.values())}")
        log_table_artifact(config.logger, paths, spec.name, sweep_dir)

    @staticmethod
    def _generic(config: DictConfig, records: list[dict[str, Any]], sweep_dir: Path) -> None:
        from ptq_bench.results.report import markdown, paper_table, records_frame, write_report
        from ptq_bench.tracking import log_table_artifact

        frame = records_frame(records)
        if frame.empty:
            return
        paths = write_report(frame, sweep_dir, "report")
        print("\n" + markdown(paper_table(frame)))
        print(f"\ntables: {', '.join(str(p) for p in paths.values())}")
        log_table_artifact(config.logger, paths, "sweep-report", sweep_dir)
