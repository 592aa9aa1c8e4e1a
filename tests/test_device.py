"""device=auto: CUDA when there is one, and in a sweep whose jobs run in parallel on one machine (Hydra's joblib
launcher) job k on GPU k mod the GPU count, unless the job is itself distributed; named devices are taken as given."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

from ptq_bench.errors import ConfigError
from ptq_bench.harness import resolve_device

REPO = Path(__file__).resolve().parent.parent
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def load_run_py():
    spec = importlib.util.spec_from_file_location("run_cli_module", REPO / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpus(monkeypatch):
    def set_count(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return set_count


def test_auto_spreads_parallel_jobs_over_the_gpus(gpus) -> None:
    gpus(4)
    assert [resolve_device("auto", k) for k in (0, 1, 5)] == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 1)]
    assert resolve_device("auto") == torch.device("cuda")  # a single run: the current device
    assert resolve_device("cuda:2", 5) == torch.device("cuda", 2)  # a named device is kept
    gpus(1)
    assert resolve_device("auto", 3) == torch.device("cuda")
    gpus(0)
    assert resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda", 3)


@pytest.mark.parametrize(
    "target, mode, task_launcher, expected",
    [
        (JOBLIB, RunMode.MULTIRUN, "none", 3),
        ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", RunMode.MULTIRUN, "none", None),  # one at a time
        ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", RunMode.MULTIRUN, "none", None),
        (JOBLIB, RunMode.MULTIRUN, "pytorch", None),  # its ranks pick their own GPUs
        (JOBLIB, RunMode.RUN, "none", None),
    ],
)
def test_gpu_slot_only_for_parallel_jobs_on_one_machine(target, mode, task_launcher, expected) -> None:
    run_py = load_run_py()
    hydra_cfg = OmegaConf.create({"launcher": {"_target_": target}, "mode": mode, "job": {"num": 3}})
    cfg = OmegaConf.create({"task": {"launcher": task_launcher}})
    assert run_py.gpu_slot(cfg, hydra_cfg) == expected
