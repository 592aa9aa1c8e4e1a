"""eval_compile: the run key changes only when it is on, compiled evaluation gives eager's top-1 on the MNIST
subset, and a quantizer the compiled graph leaves out stops the run (tracking eager calls would not see it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from conftest import REPO
from ptq_bench import harness
from ptq_bench.calibration import image_calibration
from ptq_bench.compiled_eval import evaluating
from ptq_bench.errors import ConfigError, CoverageError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.models.coverage import check_ran
from ptq_bench.results.report import protocol_label
from ptq_bench.results.store import run_key
from tasks import TASKS
from test_task_seam import tiny_vit


def mnist_cfg(results: Path, *overrides: str) -> DictConfig:
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO), replace=True)
    base = [f"results_dir={results}", "task.progress=false", "logger=none", "data.max_eval_images=200"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


def test_eval_compile_enters_the_run_key_only_when_on(tmp_path) -> None:
    cfg = mnist_cfg(tmp_path)
    assert cfg.eval_compile is False  # off by default (conf/config.yaml)
    settings = harness.read_settings(cfg, True)
    method = build_method(cfg.method, settings.bits, seed=0)
    task = TASKS.get("classification")(cfg, False)
    eager = harness.identity(task, cfg, method, settings, "sha")
    compiled = harness.identity(task, cfg, method, dataclasses.replace(settings, eval_compile=True), "sha")
    assert "eval_compile" not in eager  # the keys of runs recorded before the setting existed stay valid
    assert compiled == {**eager, "eval_compile": True} and run_key(compiled) != run_key(eager)
    assert protocol_label({"config": {"eval_compile": True}}) == "compiled eval"
    with pytest.raises(ConfigError, match="^eval_compile=1: must be true or false$"):
        harness.read_settings(mnist_cfg(tmp_path, "eval_compile=1"), True)
    with pytest.raises(ConfigError, match="^eval_compile=true: task coco does not call its model"):
        harness.run(mnist_cfg(tmp_path, "model=mask_rcnn_swin_t", "eval_compile=true"), [], tmp_path / "out")


@pytest.mark.slow
def test_compiled_evaluation_gives_the_eager_top1(tmp_path) -> None:
    """MinMax W4A4 on the shipped MNIST-ViT, 200 test images: the same top-1 (measured: identical logits)."""
    eager = harness.run(mnist_cfg(tmp_path / "runs", "bits=w4a4"), [], tmp_path / "out")
    compiled = harness.run(mnist_cfg(tmp_path / "runs", "bits=w4a4", "eval_compile=true"), [], tmp_path / "out")
    assert compiled["run_key"] != eager["run_key"] and compiled["eval_compile"] and not eager["eval_compile"]
    assert compiled["metrics"]["top1"] == eager["metrics"]["top1"]


class HeadSkippedWhenCompiled(nn.Module):
    """Calls its quantized head eagerly, but reads the head's weight directly inside a compiled graph."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        if torch.compiler.is_compiling():
            return F.linear(features, self.vit.head.weight, self.vit.head.bias)
        return self.vit.head(features)


def test_quantizer_left_out_of_the_compiled_graph_stops_the_run() -> None:
    x = torch.randn(4, 3, 16, 16)
    model = HeadSkippedWhenCompiled(build_method("repq_vit", BitWidth(4, 4)).quantize(tiny_vit(), image_calibration(x)))
    with evaluating(model, compile=False) as (evaluated, calls), torch.no_grad():
        eager = evaluated(x)
    check_ran(calls)  # eager evaluation (e.g. a first batch run eagerly) calls the head: it cannot see the bypass
    with evaluating(model, compile=True) as (evaluated, calls), torch.no_grad():
        compiled = evaluated(x)
    assert calls["vit.blocks.0.attn.matmul2.quantizer_a"] == 1  # the log2 post-Softmax quantizer ran in the graph
    with pytest.raises(CoverageError, match=r"2 quantized module\(s\) never ran during evaluation: vit.head.weight_quantizer, vit.head.input_quantizer "):
        check_ran(calls)
    assert not torch.equal(compiled, eager)  # the head really ran in FP
