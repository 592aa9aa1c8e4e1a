"""Outputs that cannot be written and published numbers that cannot be read (issue 21): the report's bad inputs are one
``error:`` line and exit code 2; a damaged published CSV row is skipped with one warning naming the file and line, as
damaged records are; a record the disk has no room for leaves nothing half-written and says so in one line.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from ptq_bench import checks
from ptq_bench.errors import DataError, OutputError, PTQBenchError
from ptq_bench.report import main as report_main
from ptq_bench.results import store as store_module
from ptq_bench.results.published import COLUMNS, load_published
from ptq_bench.results.store import RecordStore


def refuse_writes_in(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``folder`` behaves as read-only for checks.writable_directory's probe (tests may run as root)."""
    real = tempfile.TemporaryFile

    def probe(*args, **kwargs):
        if Path(kwargs.get("dir", "")).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(checks.tempfile, "TemporaryFile", probe)


def test_a_full_disk_leaves_no_half_written_record(tmp_path, monkeypatch):
    def dump_until_full(record, handle, **kwargs):
        handle.write('{"run_key": "half')
        handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module.json, "dump", dump_until_full)
    store = RecordStore(tmp_path / "runs")
    with pytest.raises(OutputError) as caught:
        store.write({"run_key": "abc123"})
    message = str(caught.value)
    assert isinstance(caught.value, PTQBenchError) and "\n" not in message
    assert str(tmp_path / "runs" / "abc123.json") in message and "was not written" in message
    assert "No space left on device" in message
    assert list((tmp_path / "runs").iterdir()) == []  # no temporary file, no partial record



# ------------------------------------------------------------------------------------------------ the report


GOOD_ROW = "RepQ-ViT,RepQ-ViT,DeiT-T,cls,ImageNet-1k val,4,4,top1,57.43,test table"
DAMAGED_ROWS = {
    "value='abc' is not a number": "RepQ-ViT,RepQ-ViT,DeiT-S,cls,ImageNet-1k val,4,4,top1,abc,test table",
    "11 fields where the header has 10": "RepQ-ViT,RepQ-ViT,DeiT-S,cls,ImageNet-1k val,4,4,top1,60.1,test table,extra",
    "wbits='4.5' is not an integer bit-width": "RepQ-ViT,RepQ-ViT,DeiT-S,cls,ImageNet-1k val,4.5,4,top1,60.1,test table",
    "abits='x' is not an integer bit-width": "RepQ-ViT,RepQ-ViT,DeiT-S,cls,ImageNet-1k val,4,x,top1,60.1,test table",
}


def published_csv(path: Path) -> Path:
    path.write_text("\n".join([",".join(COLUMNS), GOOD_ROW, *DAMAGED_ROWS.values()]) + "\n")
    return path


def repq_record() -> dict:
    return {"run_key": "0123456789abcdef", "task": "classification", "primary_metric": "top1",
            "model": {"name": "deit_tiny", "display": "DeiT-T", "random_init": False},
            "method": {"name": "repq_vit"}, "bits": {"w": 4, "a": 4, "label": "W4A4"}, "seed": 0,
            "metrics": {"top1": 57.0}, "timings": {"calibration_s": 1.0, "eval_s": 1.0}, "created": "2026-01-01T00:00:00"}


def test_damaged_published_rows_are_skipped_with_one_warning_each(tmp_path, caplog):
    csv = published_csv(tmp_path / "published.csv")
    table = load_published(csv)
    assert len(table) == 1 and table["wbits"].dtype == "int64" and table["value"].tolist() == [57.43]
    warnings = [r.getMessage() for r in caplog.records if "published CSV" in r.getMessage()]
    assert len(warnings) == len(DAMAGED_ROWS)
    for line, (problem, _) in enumerate(DAMAGED_ROWS.items(), start=3):
        assert f"skipped line {line} of the published CSV {csv}: {problem}" in warnings[line - 3]


@pytest.mark.parametrize("with_records", [True, False], ids=["records", "no records"])
def test_the_report_reads_a_damaged_published_csv(tmp_path, caplog, capsys, with_records):
    csv = published_csv(tmp_path / "published.csv")
    runs = tmp_path / "runs"
    if with_records:
        RecordStore(runs).write(repq_record())
        argv = ["--runs", str(runs), "--out", str(tmp_path / "tables"), "--published", str(csv)]
    else:
        argv = ["--runs", str(runs), "--out", str(tmp_path / "tables"), "--published", str(csv), "--paper", "repqvit_table1"]
    assert report_main(argv) == 0
    assert len([r for r in caplog.records if "published CSV" in r.getMessage()]) == len(DAMAGED_ROWS)
    if with_records:
        assert "57.00 (57.43, -0.43)" in capsys.readouterr().out


def test_report_bad_inputs_are_one_error_line(tmp_path, capsys, monkeypatch):
    def refused(argv: list[str], *phrases: str) -> None:
        assert report_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Traceback" not in err, err
        for phrase in phrases:
            assert phrase in err, err

    refused(["--out", "/dev/null/x"], "--out='/dev/null/x': not a writable directory")
    no_column = tmp_path / "no_value.csv"
    no_column.write_text("paper,method,model,task,dataset,wbits,abits,metric,source\n")
    refused(["--published", str(no_column), "--out", str(tmp_path / "t")], str(no_column), "no column(s) value")
    refused(["--published", str(tmp_path / "none.csv")], "--published=", "no such file")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    refuse_writes_in(monkeypatch, read_only)
    refused(["--out", str(read_only)], "--out=", "not a writable directory (Permission denied)")
    assert list(read_only.iterdir()) == []


def test_a_published_csv_that_is_not_text_is_one_data_error(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="unreadable"):
        load_published(path)
