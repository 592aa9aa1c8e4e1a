"""Hydra callback: at the end of a multirun, print and save the table of the runs it produced or resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ptq_bench.results.report import markdown, paper_table, records_frame, write_report
        from ptq_bench.results.store import RecordStore

        sweep_dir = Path(config.hydra.sweep.dir)
        keys_file = sweep_dir / "run_keys.txt"
        if not keys_file.is_file():
            return
        store = RecordStore(config.results_dir)
        records = (store.load_valid(k) for k in dict.fromkeys(keys_file.read_text().split()))
        frame = records_frame(r for r in records if r is not None)
        if frame.empty:
            return
        paths = write_report(frame, sweep_dir, "report")
        print("\n" + markdown(paper_table(frame)))
        print(f"\ntables: {', '.join(str(p) for p in paths.values())}")
