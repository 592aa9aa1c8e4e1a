"""The record store against a hostile directory: damaged files, temp files, a damaged resumed record, file modes;
and the wandb tracker's reachability check and logging failures (mocked, never contacts a real host)."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ptq_bench import tracking
from ptq_bench.errors import ConfigError
from ptq_bench.results.store import STALE_TMP_SECONDS, RecordStore, run_key

STORE_LOGGER = "ptq_bench.results.store"


def good_record(top1: float = 80.0, **extra: Any) -> dict[str, Any]:
    return {
        "run_key": run_key({"top1": top1, **extra}),
        "task": "classification",
        "model": {"name": "mnist_vit", "display": "MNIST-ViT"},
        "method": {"name": "minmax"},
        "bits": {"w": 4, "a": 4, "label": "W4A4"},
        "metrics": {"top1": top1, "top5": 99.0, "num_images": 2000},
        "timings": {"calibration_s": 1.0, "eval_s": 2.0, "total_s": 3.0},
        **extra,
    }


def without(*path: str) -> dict[str, Any]:
    """A good record with the field at ``path`` removed."""
    record = good_record()
    parent = record
    for name in path[:-1]:
        parent = parent[name]
    del parent[path[-1]]
    return record


def replaced(value: Any, *path: str) -> dict[str, Any]:
    """A good record with the field at ``path`` set to ``value``."""
    record = good_record()
    parent = record
    for name in path[:-1]:
        parent = parent[name]
    parent[path[-1]] = value
    return record


def as_json(record: Any) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(record))


def as_text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


DAMAGED: dict[str, Callable[[Path], None]] = {
    "not-json": as_text("{not json"),
    "binary": lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 10),
    "invalid-utf8-in-json": lambda path: path.write_bytes(b'{"run_key": "\xff\xfe"}'),
    "empty": as_text(""),
    "whitespace": as_text(" \n"),
    "truncated": lambda path: path.write_text(json.dumps(good_record(1.0), indent=2)[:60]),
    "list": as_json([good_record(2.0)]),
    "null": as_json(None),
    "number": as_json(42),
    "string": as_json("record"),
    "deeply-nested": as_text("[" * 100_000 + "]" * 100_000),
    "directory": lambda path: path.mkdir(),
    "fifo": lambda path: os.mkfifo(path),
    "dangling-link": lambda path: path.symlink_to(path.with_name("absent")),
    "no-run_key": as_json(without("run_key")),
    "no-task": as_json(without("task")),
    "no-metrics": as_json(without("metrics")),
    "no-timings": as_json(without("timings")),
    "no-model": as_json(without("model")),
    "no-model-name": as_json(without("model", "name")),
    "no-method": as_json(without("method")),
    "no-method-name": as_json(without("method", "name")),
    "run_key-not-str": as_json(replaced(123, "run_key")),
    "metrics-a-list": as_json(replaced([80.0], "metrics")),
    "model-a-str": as_json(replaced("mnist_vit", "model")),
    "metric-a-str": as_json(replaced("high", "metrics", "top1")),
    "metric-a-list": as_json(replaced([80.0], "metrics", "top1")),
    "metric-a-bool": as_json(replaced(True, "metrics", "top5")),
    "metric-an-object": as_json(replaced({"value": 1}, "metrics", "num_images")),
    "bits-without-w": as_json(replaced({"a": 4}, "bits")),
    "config-null": as_json(replaced(None, "config")),
    "method_overrides-a-str": as_json(replaced("method.x=1", "method_overrides")),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_file_is_skipped_with_one_warning(tmp_path, caplog, kind):
    store = RecordStore(tmp_path)
    good = good_record()
    store.write(good)
    damaged = tmp_path / f"0-{kind}.json"
    DAMAGED[kind](damaged)
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        records = list(store)
    assert records == [good]
    assert store.skipped == [damaged]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "\n" not in warnings[0]
    assert store.scan() == ([good], [damaged])


def test_valid_records_pass_including_null_metrics_and_fp_bits(tmp_path, caplog):
    store = RecordStore(tmp_path)
    fp = {**good_record(90.0), "bits": None, "config": {"seed": 0}, "method_overrides": []}
    partial = replaced(None, "metrics", "top5")
    for record in (fp, partial):
        store.write(record)
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        records, skipped = store.scan()
    assert sorted(r["run_key"] for r in records) == sorted([fp["run_key"], partial["run_key"]])
    assert skipped == [] and not caplog.records


def test_missing_store_directory_iterates_empty(tmp_path):
    assert RecordStore(tmp_path / "absent").scan() == ([], [])


def test_temp_files_are_never_records_and_stale_ones_are_cleaned(tmp_path, caplog):
    store = RecordStore(tmp_path)
    good = good_record()
    store.write(good)
    fresh, stale = tmp_path / ".tmp-fresh.json", tmp_path / ".tmp-stale.json"
    for path, top1 in ((fresh, 1.0), (stale, 2.0)):
        path.write_text(json.dumps(good_record(top1)))  # a complete record left by a killed writer
    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        assert store.scan() == ([good], [])
    assert fresh.exists() and not stale.exists() and not caplog.records

    os.utime(fresh, (old, old))
    store.write(good_record(3.0))
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{good_record(t)['run_key']}.json" for t in (80.0, 3.0))


@pytest.mark.parametrize("kind", ["truncated", "empty", "null", "no-metrics", "metric-a-str", "directory", "fifo"])
def test_damaged_resumed_record_is_set_aside_and_reported_absent(tmp_path, caplog, kind):
    store = RecordStore(tmp_path)
    key = good_record()["run_key"]
    DAMAGED[kind](store.path(key))
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        assert store.load_valid(key) is None
    (aside,) = tmp_path.glob(f"{key}.json.damaged-*")
    assert not store.path(key).exists() and not store.has(key)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(store.path(key)) in warning and str(aside) in warning
    store.write(good_record())
    assert store.load_valid(key) == good_record() and store.scan() == ([good_record()], [])


def test_load_valid_sets_aside_a_record_of_another_run(tmp_path):
    store = RecordStore(tmp_path)
    other = good_record(5.0)
    store.path("0123456789abcdef").write_text(json.dumps(other))
    assert store.load_valid("0123456789abcdef") is None
    assert len(list(tmp_path.glob("0123456789abcdef.json.damaged-*"))) == 1


def test_load_valid_of_a_missing_or_good_record(tmp_path, caplog):
    store = RecordStore(tmp_path)
    assert store.load_valid("0123456789abcdef") is None
    good = good_record()
    store.write(good)
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        assert store.load_valid(good["run_key"]) == good == store.load(good["run_key"])
    assert not caplog.records


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_records_are_created_with_mode_0666_less_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = RecordStore(tmp_path).write(good_record())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


# --- wandb ---------------------------------------------------------------------------------------------------------

ONLINE = {"kind": "wandb", "mode": "online", "project": "ptq-bench", "entity": None}


@pytest.fixture
def wandb_env(monkeypatch):
    """No WANDB_MODE / WANDB_BASE_URL from the environment (conftest disables wandb globally)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)


def test_check_online_fails_fast_with_one_line_when_unreachable(wandb_env):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        tracking.check_online({**ONLINE, "host": "http://127.0.0.1:9"}, timeout=1.0)  # discard port: closed
    assert time.perf_counter() - start < 3
    message = str(error.value)
    assert "\n" not in message and "127.0.0.1:9" in message and "logger.mode=offline" in message


def test_check_online_reads_the_host_from_the_environment(wandb_env, monkeypatch):
    calls = []
    monkeypatch.setattr(tracking, "connect", lambda host, port, timeout: calls.append((host, port)))
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example.internal:8080")
    tracking.check_online(ONLINE)
    tracking.check_online({**ONLINE, "host": "wandb.example.internal"})
    assert calls == [("wandb.example.internal", 8080), ("wandb.example.internal", 443)]


@pytest.mark.parametrize("url", ["https://", "http://wandb.example.internal:http", "https://host:99999"])
def test_check_online_refuses_a_bad_server_url(wandb_env, monkeypatch, url):
    monkeypatch.setattr(tracking, "connect", lambda *args: pytest.fail("must not connect"))
    with pytest.raises(ConfigError, match="wandb server URL"):
        tracking.check_online({**ONLINE, "host": url})


def test_check_online_is_a_noop_unless_online(wandb_env, monkeypatch):
    monkeypatch.setattr(tracking, "connect", lambda *args: pytest.fail("must not connect"))
    tracking.check_online({**ONLINE, "mode": "offline"})
    tracking.check_online({"kind": "none"})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracking.check_online(ONLINE)


def test_check_online_bounds_a_hanging_name_lookup(wandb_env, monkeypatch):
    def hang(*args: Any, **kwargs: Any) -> None:
        time.sleep(1.0)
        raise OSError("lookup gave up")

    monkeypatch.setattr(tracking.socket, "create_connection", hang)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="no answer"):
        tracking.check_online({**ONLINE, "host": "https://wandb.example.internal"}, timeout=0.2)
    assert time.perf_counter() - start < 0.9


def fake_wandb(fail_at: str | None) -> types.SimpleNamespace:
    """A stand-in for the wandb module whose run raises at ``fail_at`` (init, log or finish)."""
    def maybe_fail(step: str) -> None:
        if step == fail_at:
            raise RuntimeError(f"wandb {step} failed\nwith details")

    run = types.SimpleNamespace(log=lambda data: maybe_fail("log"), summary={}, finish=lambda: maybe_fail("finish"))

    def init(**kwargs: Any) -> types.SimpleNamespace:
        maybe_fail("init")
        return run

    return types.SimpleNamespace(init=init, Settings=lambda **kwargs: kwargs)


@pytest.mark.parametrize("fail_at", ["init", "log", "finish"])
def test_a_wandb_failure_after_the_record_is_one_warning_and_false(wandb_env, monkeypatch, caplog, tmp_path, fail_at):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(fail_at))
    record = good_record()
    with caplog.at_level(logging.WARNING, logger="ptq_bench.tracking"):
        assert tracking.log_to_wandb({**ONLINE, "mode": "offline"}, record, "label", tmp_path / "out") is False
    (warning,) = [r.getMessage() for r in caplog.records]
    assert record["run_key"] in warning and "written" in warning and f"wandb {fail_at} failed" in warning
    assert "\n" not in warning


def test_log_to_wandb_returns_true_on_success_and_when_disabled(wandb_env, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(None))
    assert tracking.log_to_wandb({**ONLINE, "mode": "offline"}, good_record(), "label", tmp_path / "out") is True
    assert tracking.log_to_wandb({"kind": "none"}, good_record(), "label", tmp_path / "out") is True
