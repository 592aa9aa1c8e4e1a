"""Experiment tracking: a real wandb run per record (offline by default, ``logger=none`` to switch off), with the
run's row of the table (model, method label, bits, metric, reproduced, published, Δ); a sweep's final table and
plot as one artifact.

The harness calls :func:`check_logger` before any work: an unknown ``logger.kind`` or wandb mode is one line, and
with ``logger.mode=online`` a missing network fails in seconds with one line (:func:`check_online`); a failure while
logging a finished run is a warning (the record is already written).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ptq_bench.errors import ConfigError

DEFAULT_HOST = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 3.0
ONLINE_MODES = {"online", "run", "shared"}  # wandb's modes that talk to the server
#: Every mode wandb.init takes (wandb.Settings.mode); any other is refused before any work.
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
LOGGER_KINDS = ("none", "wandb")

log = logging.getLogger(__name__)


def wandb_mode(logger_cfg: Mapping[str, Any]) -> str:
    """``disabled`` unless ``logger.kind=wandb``; else ``$WANDB_MODE`` or ``logger.mode`` (default offline)."""
    if logger_cfg.get("kind", "none") != "wandb":
        return "disabled"
    return os.environ.get("WANDB_MODE", str(logger_cfg.get("mode", "offline")))


def wandb_host(logger_cfg: Mapping[str, Any]) -> str:
    """The server URL (https when no scheme is given): ``logger.host``, else ``$WANDB_BASE_URL``, else the public API."""
    url = str(logger_cfg.get("host") or os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST)
    return url if "://" in url else f"https://{url}"


def server_address(logger_cfg: Mapping[str, Any]) -> tuple[str, int]:
    """Host name and port of the wandb server (https unless the URL says http); ConfigError for a bad URL."""
    url = wandb_host(logger_cfg)
    parts = urlsplit(url)
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError as error:
        raise ConfigError(f"wandb server URL '{url}' (logger.host or WANDB_BASE_URL) has a bad port: {error}") from error
    if not parts.hostname:
        raise ConfigError(f"wandb server URL '{url}' (logger.host or WANDB_BASE_URL) has no host name")
    return parts.hostname, port


def connect(host: str, port: int, timeout: float) -> None:
    """Open and close a TCP connection to ``host:port``; the whole attempt (name lookup included) is bounded by
    ``timeout`` seconds. Raises OSError when it fails or times out."""
    failure: list[OSError | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            failure.append(None)
        except OSError as error:
            failure.append(error)

    thread = threading.Thread(target=attempt, daemon=True)  # a stuck DNS lookup ignores the socket timeout
    thread.start()
    thread.join(timeout)
    if not failure:
        raise TimeoutError(f"no answer in {timeout:g} s")
    if failure[0] is not None:
        raise failure[0]


def check_logger(logger_cfg: Mapping[str, Any], timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Before any work: ``logger.kind`` is one of :data:`LOGGER_KINDS`; for wandb, ``logger.mode`` and a set
    ``$WANDB_MODE`` are modes wandb takes, and an online mode reaches its server (:func:`check_online`)."""
    kind = logger_cfg.get("kind", "none")
    if kind not in LOGGER_KINDS:
        raise ConfigError(f"logger.kind={kind!r}: must be one of {', '.join(LOGGER_KINDS)} (logger=none switches logging off)")
    if kind != "wandb":
        return
    mode = logger_cfg.get("mode", "offline")
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={mode!r}: wandb takes one of {', '.join(WANDB_MODES)}")
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode is not None and env_mode not in WANDB_MODES:
        raise ConfigError(f"environment variable WANDB_MODE={env_mode!r}: wandb takes one of {', '.join(WANDB_MODES)}")
    check_online(logger_cfg, timeout)


def check_online(logger_cfg: Mapping[str, Any], timeout: float = CONNECT_TIMEOUT_S) -> None:
    """When wandb will log online, raise :class:`ConfigError` (one line) unless its server answers within
    ``timeout`` seconds. Call it before any work; a no-op in offline/disabled mode or with ``logger=none``."""
    if wandb_mode(logger_cfg) not in ONLINE_MODES:
        return
    host, port = server_address(logger_cfg)
    try:
        connect(host, port, timeout)
    except OSError as error:
        raise ConfigError(
            f"logger.mode=online but the wandb server {host}:{port} is unreachable ({error}); "
            "use logger.mode=offline (then `wandb sync`) or logger=none"
        ) from error


def log_to_wandb(logger_cfg: Mapping[str, Any], record: Mapping[str, Any], label: str, directory: Path) -> bool:
    """Log config, metrics and timings of ``record``; never goes online unless ``logger.mode=online``.

    Returns False, after one warning, when wandb fails (the record is already written); True otherwise.
    """
    mode = wandb_mode(logger_cfg)
    if mode == "disabled":
        return True
    try:
        _log_run(logger_cfg, mode, record, label, directory)
    except Exception as error:  # noqa: BLE001 - any wandb failure: the computation and its record stand
        reason = " ".join(str(error).split())[:300]
        log.warning("record %s was written, but logging it to wandb failed: %s: %s", record["run_key"],
                    type(error).__name__, reason)
        return False
    return True


def _log_run(logger_cfg: Mapping[str, Any], mode: str, record: Mapping[str, Any], label: str, directory: Path) -> None:
    """One wandb run with the record's config, metrics and timings."""
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    settings = {"silent": True, **({"base_url": wandb_host(logger_cfg)} if logger_cfg.get("host") else {})}
    run = wandb.init(
        project=str(logger_cfg.get("project", "ptq-bench")),
        entity=logger_cfg.get("entity"),
        mode=mode,
        dir=str(directory),
        name=label,
        group=str(record["model"]["name"]),
        config=dict(record.get("config", {})),
        tags=[str(record["method"]["name"])],
        settings=wandb.Settings(**settings),
    )
    metrics = {f"metrics/{k}": v for k, v in record["metrics"].items()}
    timings = {f"timings/{k}": v for k, v in record["timings"].items()}
    row = table_row(record)
    logged: dict[str, Any] = {**metrics, **timings}
    if row and hasattr(wandb, "Table"):  # the row also goes to the summary (table_row/<column>)
        logged["table_row"] = wandb.Table(columns=list(row), data=[list(row.values())])
    run.log(logged)
    run.summary.update({"run_key": record["run_key"], **metrics, **{f"table_row/{k}": v for k, v in row.items()}})
    run.finish()


def table_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's row of the report: model, method (label with options and budget), bits, metric, reproduced
    value, published value, Δ and the published value's source ({} when the record has no primary metric)."""
    from ptq_bench.results.report import records_frame

    frame = records_frame([record])
    if frame.empty:
        return {}
    row = frame.iloc[0]
    published = None if row["published"] is None or row["published"] != row["published"] else float(row["published"])
    return {"model": row["model"], "method": row["method"], "bits": row["bits"], "metric": row["metric"],
            "value": float(row["value"]), "published": published,
            "delta": None if published is None else float(row["value"]) - published, "source": row["source"] or ""}


def log_table_artifact(logger_cfg: Mapping[str, Any], paths: Mapping[str, Path], name: str, directory: Path) -> bool:
    """Log a sweep's table files (``paths``: md/tex/csv/png...) as one wandb artifact of type ``paper-table``, the
    CSV as a wandb Table and the plot as an image, in a run of its own. Offline unless ``logger.mode=online``;
    a failure is one warning (the files are written already)."""
    mode = wandb_mode(logger_cfg)
    if mode == "disabled":
        return True
    try:
        _log_artifact(logger_cfg, mode, paths, name, directory)
    except Exception as error:  # noqa: BLE001 - any wandb failure: the tables stand
        log.warning("table %s was written, but logging it to wandb failed: %s: %s", name, type(error).__name__,
                    " ".join(str(error).split())[:300])
        return False
    return True


def _log_artifact(logger_cfg: Mapping[str, Any], mode: str, paths: Mapping[str, Path], name: str, directory: Path) -> None:
    import pandas as pd
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    settings = {"silent": True, **({"base_url": wandb_host(logger_cfg)} if logger_cfg.get("host") else {})}
    run = wandb.init(project=str(logger_cfg.get("project", "ptq-bench")), entity=logger_cfg.get("entity"), mode=mode,
                     dir=str(directory), name=f"table {name}", job_type="paper-table", settings=wandb.Settings(**settings))
    artifact = wandb.Artifact("".join(c if c.isalnum() or c in "-_." else "-" for c in name), type="paper-table")
    for path in paths.values():
        artifact.add_file(str(path))
    logged: dict[str, Any] = {}
    if "csv" in paths:
        logged["table"] = wandb.Table(dataframe=pd.read_csv(paths["csv"]).astype(str))
    if "png" in paths:
        logged["plot"] = wandb.Image(str(paths["png"]))
    run.log(logged)
    run.log_artifact(artifact)
    run.finish()
