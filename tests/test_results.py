"""Run records: atomic writes, run keys, resume semantics, and the aggregator's published-vs-reproduced join."""

from __future__ import annotations

import json
import multiprocessing

import pandas as pd
import pytest

from ptq_bench.results.report import paper_table, records_frame, write_report
from ptq_bench.results.store import RecordStore, run_key


def fake_record(method: str, model: str, display: str, bits: tuple[int, int] | None, top1: float, **extra) -> dict:
    key = run_key({"m": method, "model": model, "bits": bits, **extra})
    return {
        "run_key": key,
        "task": "classification",
        "created": extra.get("created", "2026-01-01T00:00:00"),
        "model": {"name": model, "display": display, "checkpoint": extra.get("checkpoint", f"/ckpt/{model}.pth")},
        "method": {"name": method},
        "method_overrides": extra.get("overrides", []),
        "bits": {"w": bits[0], "a": bits[1], "label": f"W{bits[0]}A{bits[1]}"} if bits else None,
        "metrics": {"top1": top1, "top5": 99.0, "num_images": 50000},
        "timings": {"calibration_s": 1.0, "eval_s": 2.0, "total_s": 3.0},
    }


def test_run_key_is_order_independent_and_sensitive_to_content():
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})


def test_store_writes_atomically_and_skips_foreign_files(tmp_path):
    store = RecordStore(tmp_path)
    record = fake_record("minmax", "deit_tiny", "DeiT-T", (4, 4), 10.0)
    store.write(record)
    assert store.has(record["run_key"]) and store.load(record["run_key"]) == record
    (tmp_path / "broken.json").write_text("{not json")
    assert [r["run_key"] for r in store] == [record["run_key"]]
    assert not list(tmp_path.glob(".tmp-*"))


def _write_many(args: tuple[str, int]) -> None:
    root, worker = args
    store = RecordStore(root)
    for _ in range(20):
        store.write({**fake_record("minmax", "deit_tiny", "DeiT-T", (4, 4), float(worker)), "payload": "x" * 20000})


def test_parallel_writers_never_leave_a_partial_record(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_write_many, [(str(tmp_path), 1), (str(tmp_path), 2)])
    (only,) = list(tmp_path.glob("*.json"))
    assert json.loads(only.read_text())["metrics"]["top1"] in (1.0, 2.0)


def test_report_joins_published_numbers_and_computes_the_delta(tmp_path):
    recs = [
        fake_record("fp", "deit_tiny", "DeiT-T", None, 72.0),
        fake_record("repq_vit", "deit_tiny", "DeiT-T", (4, 4), 57.0),
        fake_record("repq_vit", "deit_tiny", "DeiT-T", (6, 6), 70.5),
        fake_record("minmax", "mnist_vit", "MNIST-ViT", (4, 4), 80.0),
        fake_record("dopq_vit", "deit_tiny", "DeiT-T", (4, 4), 60.0, overrides=["method.softmax_quantizer=log2"]),
        fake_record("adalog", "deit_tiny", "DeiT-T", (3, 3), 30.0),
    ]
    frame = records_frame(recs)
    assert frame[frame["method"] == "adalog"].iloc[0]["published"] == pytest.approx(31.56)  # AdaLog README, Calibrate
    row = frame[(frame["method"] == "repq_vit") & (frame["bits"] == "W4A4")].iloc[0]
    assert row["published"] == pytest.approx(57.43)  # RepQ-ViT README, DeiT-T W4A4
    assert row["delta"] == pytest.approx(57.0 - 57.43)
    assert frame[frame["method"] == "fp"].iloc[0]["published"] == pytest.approx(72.21)
    assert pd.isna(frame[frame["model"] == "MNIST-ViT"].iloc[0]["published"])
    table = paper_table(frame)
    assert table.loc[("repq_vit", "W4A4"), "DeiT-T"] == "57.00 (57.43, -0.43)"
    assert table.loc[("minmax", "W4A4"), "MNIST-ViT"] == "80.00"
    assert ("dopq_vit [softmax_quantizer=log2]", "W4A4") in table.index
    paths = write_report(frame, tmp_path, "t")
    assert "57.00 (57.43, -0.43)" in paths["md"].read_text()
    assert "\\begin{tabular}" in paths["tex"].read_text()
    assert len(pd.read_csv(paths["csv"])) == len(recs)


def test_random_init_models_get_no_published_comparison():
    frame = records_frame([fake_record("repq_vit", "deit_tiny", "DeiT-T", (4, 4), 1.0, checkpoint=None)])
    assert pd.isna(frame.iloc[0]["published"])


def test_newest_record_wins_for_the_same_cell():
    old = fake_record("minmax", "deit_tiny", "DeiT-T", (4, 4), 1.0, created="2026-01-01T00:00:00", v=1)
    new = fake_record("minmax", "deit_tiny", "DeiT-T", (4, 4), 2.0, created="2026-02-01T00:00:00", v=2)
    frame = records_frame([new, old])
    assert frame["value"].tolist() == [2.0]
