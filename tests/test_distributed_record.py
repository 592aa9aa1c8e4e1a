"""Under torchrun every rank evaluates, but only rank 0 writes the record and logs to wandb (one run, one record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from conftest import REPO
from ptq_bench import distributed, harness


def mnist_fp_cfg(results: Path) -> DictConfig:
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO), replace=True)
    overrides = ["method=fp", f"results_dir={results}", "task.progress=false", "data.workers=0", "data.max_eval_images=8"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("rank, records", [(1, 0), (0, 1)])
def test_only_rank_zero_writes_and_logs(tmp_path, monkeypatch, rank, records):
    logged: list[Any] = []
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(harness, "log_to_wandb", lambda *args: logged.append(args))
    record = harness.run(mnist_fp_cfg(tmp_path / "runs"), [], tmp_path / "out")
    assert record["metrics"]["num_images"] == 8  # every rank evaluated
    assert len(list((tmp_path / "runs").glob("*.json"))) == records
    assert len(logged) == records


def test_rank_without_a_group_is_the_launchers(monkeypatch):
    """torchrun sets RANK in every process, also for a task that sets up no process group."""
    monkeypatch.setenv("RANK", "1")
    assert distributed.rank() == 1 and not distributed.is_main_process()
    monkeypatch.delenv("RANK")
    assert distributed.rank() == 0


def test_rank_of_a_process_group(tmp_path):
    assert distributed.rank() == 0 and not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.rank() == 0 and distributed.is_main_process()
    finally:
        dist.destroy_process_group()
