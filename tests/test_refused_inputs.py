"""Run inputs that used to end in a traceback or run silently (issues 21 and 22) are one ``error:`` line, exit code 2,
no record, before any work; a read-only results folder still serves the records it holds.

The command-line cases share one Python process (:func:`run_cli_cases`: ``run.py`` as ``__main__`` once per case,
its argument checks, Hydra and error handling included), so each costs a fraction of a second, not a start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from conftest import REPO
from ptq_bench import harness, tracking
from ptq_bench.errors import ConfigError
from test_report_inputs import refuse_writes_in

#: Runs the ``run.py`` of ``sys.argv[1]`` as ``__main__`` for each argument list in ``sys.argv[2]`` (JSON), in this one
#: process; prints one JSON list of {code, stderr}. An exception escaping run.py is recorded as a traceback.
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
run_py, cases, results = sys.argv[1], json.loads(sys.argv[2]), []
for args in cases:
    sys.argv = [run_py, *args]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(run_py, run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stderr": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def run_cli_cases(cases: list[list[str]], cwd: Path) -> list[dict]:
    """``python run.py <case>`` for every case, in one Python process (conftest's run_cli environment)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(REPO / "run.py"), json.dumps(cases)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(lines[-1][len("RESULTS "):])


def assert_one_error_line(outcome: dict, *phrases: str) -> str:
    assert outcome["code"] == 2, outcome["stderr"]
    assert "Traceback" not in outcome["stderr"], outcome["stderr"]
    errors = [line for line in outcome["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outcome["stderr"]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


#: (extra arguments, phrases of the one error line): issue 21 (tracebacks, a misleading error, an unchecked boolean)
#: and issue 22 (inputs that used to run and write a record).
REFUSED = [
    (["seed=4294967296"], ["seed=4294967296: must be an integer <= 4294967295"]),
    (["dry_run=maybe"], ["dry_run='maybe': must be true or false"]),
    (["task=coco", "model=deit_tiny"], ["model=deit_tiny is a classification model", "task=coco",
                                         "cascade_mask_rcnn_swin_s, cascade_mask_rcnn_swin_t, mask_rcnn_swin_s, mask_rcnn_swin_t"]),
    (["model=mask_rcnn_swin_t", "task=classification"], ["model=mask_rcnn_swin_t is a detector", "needs task=coco"]),
    (["logger=foo"], ["unknown logger 'foo' (known: none, wandb)"]),
    (["logger=wandb", "logger.kind=foo"], ["logger.kind='foo': must be one of none, wandb"]),
    (["logger=wandb", "logger.mode=foo"], ["logger.mode='foo': wandb takes one of online, offline"]),
    (["model.checkpoint=''"], ["model.checkpoint='': an empty path"]),
    (["results_dir=''"], ["results_dir='': an empty path"]),
    (["+bits.label=W8A8"], ["bits has no key(s) label (keys: w, a"]),
    (["method=aiqvit", "method.state_dir=/dev/null/x"], ["method.state_dir='/dev/null/x': not a writable directory"]),
]


def test_bad_run_inputs_are_one_line_before_any_work(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    base = ["logger=none", "task.progress=false", "method.calib_size=4", "data.max_eval_images=20"]
    cases = []
    for args, _ in REFUSED:
        given = base + args if not any(a.startswith("logger=") for a in args) else [a for a in base if a != "logger=none"] + args
        cases.append(given if any(a.startswith("results_dir=") for a in args) else [*given, f"results_dir={runs}"])
    for (args, phrases), outcome in zip(REFUSED, run_cli_cases(cases, tmp_path)):
        line = assert_one_error_line(outcome, *phrases)
        assert "detection extra" not in line  # task=coco model=deit_tiny: refused before anything imports mmdet
    assert not list(runs.glob("*.json")), "a record was written"
    assert not list(tmp_path.glob("*.json")), "a record was written into the current directory"


# ------------------------------------------------------------------------------------ results folder and store


def mnist_fp_cfg(results: Path, *overrides: str) -> DictConfig:
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO), replace=True)
    base = ["method=fp", "logger=none", f"results_dir={results}", "task.progress=false", "data.workers=0",
            "data.max_eval_images=8"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


def test_a_read_only_results_folder_serves_its_records_and_refuses_a_new_run(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    written = harness.run(mnist_fp_cfg(runs), [], tmp_path / "out")
    refuse_writes_in(monkeypatch, runs)
    again = harness.run(mnist_fp_cfg(runs), [], tmp_path / "out")  # a finished sweep in a read-only archive
    assert again["run_key"] == written["run_key"]
    with pytest.raises(ConfigError, match=r"results_dir=.*not a writable directory \(Permission denied\), and run \w+ has no record"):
        harness.run(mnist_fp_cfg(runs, "seed=1"), [], tmp_path / "out")
    assert len(list(runs.glob("*.json"))) == 1


def test_logger_kind_and_wandb_modes_are_checked(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tracking.check_logger({"kind": "none"})
    tracking.check_logger({"kind": "wandb", "mode": "offline"})
    tracking.check_logger({"kind": "wandb", "mode": "disabled"})
    with pytest.raises(ConfigError, match="logger.kind='tensorboard'"):
        tracking.check_logger({"kind": "tensorboard"})
    with pytest.raises(ConfigError, match="logger.mode='offlin'"):
        tracking.check_logger({"kind": "wandb", "mode": "offlin"})
    monkeypatch.setenv("WANDB_MODE", "foo")
    with pytest.raises(ConfigError, match="WANDB_MODE='foo'"):
        tracking.check_logger({"kind": "wandb", "mode": "offline"})
    tracking.check_logger({"kind": "none"})  # logging off: the variable is not read
