"""Run records, their store and the aggregator that turns them into paper-style tables."""

from ptq_bench.results.store import RecordStore, run_key

__all__ = ["RecordStore", "run_key"]
