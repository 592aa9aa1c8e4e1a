"""One JSON record per run, written atomically under ``results/runs/<run_key>.json``.

The run key is the hash of everything that determines the result (resolved task/model/data/method/bits config,
seed and the FP weights' sha256), so an interrupted or repeated sweep skips runs that already have a record,
and parallel jobs never write the same file half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

SCHEMA_VERSION = 2  # 2: task adapters (primary_metric, method_label; code_version in run keys)


def run_key(identity: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of ``identity``."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class RecordStore:
    """A directory of run records."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, Any]:
        return json.loads(self.path(key).read_text())

    def write(self, record: Mapping[str, Any]) -> Path:
        """Write to a temporary file in the same directory, then rename: readers never see a partial record."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(record["run_key"])
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle, indent=2, sort_keys=True, default=str)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*.json")):
            try:
                yield json.loads(path.read_text())
            except json.JSONDecodeError:
                continue  # a foreign or damaged file: skip, never crash the report
