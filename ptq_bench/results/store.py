"""One JSON record per run, written atomically under ``results/runs/<run_key>.json``.

The run key is the hash of everything that determines the result (resolved task/model/data/method/bits config,
seed and the FP weights' sha256), so an interrupted or repeated sweep skips runs that already have a record,
and parallel jobs never write the same file half-way.

Reading never trusts the directory: the writer's temporary files (``.tmp-*.json``) are never records (those older
than :data:`STALE_TMP_SECONDS`, left by a killed writer, are deleted), and every malformed file is skipped with one
warning naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ptq_bench.errors import OutputError

SCHEMA_VERSION = 2  # 2: task adapters (primary_metric, method_label; code_version in run keys)
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600.0
#: Fields every record has (the harness writes more), with their JSON types.
REQUIRED_FIELDS: dict[str, type] = {"run_key": str, "task": str, "model": dict, "method": dict, "metrics": dict,
                                    "timings": dict}
#: Fields the report reads when present (``bits``, null for FP runs, is checked apart): absent or of this type.
OPTIONAL_FIELDS: dict[str, type] = {"primary_metric": str, "method_label": str, "method_overrides": list,
                                    "option_changes": dict, "config": dict, "created": str}

log = logging.getLogger(__name__)


class DamagedRecord(ValueError):
    """A file in the store that is not a valid run record."""


def run_key(identity: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of ``identity``."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def is_number(value: Any) -> bool:
    """An int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: Any) -> str | None:
    """Why ``record`` (parsed JSON) is not a valid run record, or None when it is one."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for field, kind in REQUIRED_FIELDS.items():
        if not isinstance(record.get(field), kind):
            return f"field '{field}' is missing or not a {kind.__name__}"
    for field, kind in OPTIONAL_FIELDS.items():
        if field in record and not isinstance(record[field], kind):
            return f"field '{field}' is not a {kind.__name__}"
    return nested_problem(record)


def nested_problem(record: dict[str, Any]) -> str | None:
    """Why the nested fields of a record with valid top-level fields are invalid, or None."""
    for part in ("model", "method"):
        if not isinstance(record[part].get("name"), str):
            return f"field '{part}.name' is missing or not a str"
    bits = record.get("bits")
    if bits is not None and not (isinstance(bits, dict) and all(is_number(bits.get(k)) for k in ("w", "a"))):
        return "field 'bits' is neither null nor an object with numeric 'w' and 'a'"
    for name, value in record["metrics"].items():
        if value is not None and not is_number(value):
            return f"metric '{name}' is not a number: {value!r:.60}"
    return None


def read_record(path: Path) -> dict[str, Any]:
    """The validated record in ``path``; raises :class:`DamagedRecord` with the reason otherwise."""
    if not path.is_file():  # a directory, a FIFO (reading would block), a dangling link
        raise DamagedRecord("not a regular file")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: undecodable bytes, invalid JSON
        raise DamagedRecord(f"unreadable ({type(error).__name__}: {error})") from error
    problem = record_problem(record)
    if problem:
        raise DamagedRecord(problem)
    return record


class RecordStore:
    """A directory of run records.

    After each iteration, :attr:`skipped` lists the damaged files it skipped (see also :meth:`scan`).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.skipped: list[Path] = []

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, Any]:
        """The parsed file of ``key``, unvalidated (raises if it is missing or not JSON); see :meth:`load_valid`."""
        return json.loads(self.path(key).read_text())

    def load_valid(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or None when the run has to be (re)done.

        None when there is no record, or when the record is damaged (see :func:`record_problem`, or a ``run_key``
        that is not ``key``): a damaged one is set aside as ``<key>.json.damaged-<UTC time>`` with one warning.
        """
        path = self.path(key)
        if not path.exists():
            return None
        try:
            record = read_record(path)
            if record["run_key"] != key:
                raise DamagedRecord(f"its run_key is {record['run_key']!r}")
        except DamagedRecord as error:
            self._set_aside(path, str(error))
            return None
        return record

    def _set_aside(self, path: Path, reason: str) -> None:
        """Rename the damaged record ``path`` out of the store's way, with one warning."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = path.with_name(f"{path.name}.damaged-{stamp}")
        try:
            path.rename(target)
            outcome = f"moved to {target}"
        except OSError as error:
            outcome = f"could not move it aside ({error})"
        log.warning("damaged record %s (%s): %s; the run will be redone", path, reason, outcome)

    def write(self, record: Mapping[str, Any]) -> Path:
        """Write to a temporary file in the same directory, then rename: readers never see a partial record.

        The file is created with mode 0666 less the umask (0644 under the usual umask 022). When the write fails
        (a full disk, a folder turned read-only), the temporary file is removed and :class:`OutputError` says, in
        one line, which record was not written.
        """
        target = self.path(record["run_key"])
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}.json"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.clean_stale_tmp()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=2, sort_keys=True, default=str)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException as error:
            try:
                tmp.unlink(missing_ok=True)
            except OSError as cleanup:
                log.warning("could not delete the temporary file %s: %s", tmp, cleanup)
            if isinstance(error, OSError):
                reason = error.strerror or str(error) or type(error).__name__
                raise OutputError(f"the record {target} was not written: {reason}") from error
            raise
        return target

    def clean_stale_tmp(self) -> None:
        """Delete temporary files older than :data:`STALE_TMP_SECONDS` (left by a writer killed mid-write)."""
        deadline = time.time() - STALE_TMP_SECONDS
        for path in self.root.glob(f"{TMP_PREFIX}*.json"):
            try:
                if path.is_file() and path.stat().st_mtime < deadline:
                    path.unlink()
            except FileNotFoundError:
                continue  # another process cleaned it first
            except OSError as error:
                log.warning("could not delete stale temporary file %s: %s", path, error)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Valid records in file-name order; each damaged file gets one warning and goes to :attr:`skipped`."""
        self.skipped = []
        if not self.root.is_dir():
            return
        self.clean_stale_tmp()
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith(TMP_PREFIX):
                continue
            try:
                yield read_record(path)
            except DamagedRecord as error:
                log.warning("skipped damaged record file %s: %s", path, error)
                self.skipped.append(path)

    def scan(self) -> tuple[list[dict[str, Any]], list[Path]]:
        """All valid records and the damaged files skipped (e.g. for "skipped N damaged files")."""
        records = list(self)
        return records, list(self.skipped)
