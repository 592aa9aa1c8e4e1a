"""Runs and sweeps started at the same moment each get their own Hydra output directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

QUIET = ["logger=none", "task.progress=false", "method=fp"]


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """Start ``python run.py <args>`` without waiting (the environment of conftest's ``run_cli``)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_runs_started_together_get_separate_output_dirs(tmp_path, multirun):
    flags = ["-m"] if multirun else []
    runs = [tmp_path / "runs-a", tmp_path / "runs-b"]  # separate stores: both compute and record their output dir
    processes = [start_cli(*flags, *QUIET, f"results_dir={r}", cwd=tmp_path) for r in runs]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr

    output_dirs = [Path(json.loads(next(r.glob("*.json")).read_text())["output_dir"]) for r in runs]
    assert output_dirs[0] != output_dirs[1]
    run_dirs = [d.parent if multirun else d for d in output_dirs]  # a sweep's job dir is <sweep dir>/<job number>
    assert run_dirs[0] != run_dirs[1]
    assert {d.parent.parent.name for d in run_dirs} == {"multirun" if multirun else "outputs"}
    for run_dir, results in zip(run_dirs, runs):
        overrides = (run_dir / "0" / ".hydra" if multirun else run_dir / ".hydra") / "overrides.yaml"
        assert f"results_dir={results}" in overrides.read_text()
        if multirun:
            assert (run_dir / "report.md").is_file() and (run_dir / "run_keys.txt").is_file()
