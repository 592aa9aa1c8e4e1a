"""Per-layer sensitivity: one calibration, then one evaluation per group with only it quantized and with all but it;
the "all" row is the run's own number, the "none" row the FP function, the groups partition the quantizers, and bad
input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from ptq_bench.sensitivity import compose_run, sensitivity, write
from tests.conftest import REPO, run_cli

RUN = ["method=minmax", "bits=w4a4", "logger=none", "task.progress=false", "data.max_eval_images=200"]


@pytest.fixture(scope="module")
def blocks() -> pd.DataFrame:
    return sensitivity(compose_run(RUN), "block")


def test_all_row_is_the_runs_number_and_none_row_the_fp_function(blocks, tmp_path):
    result = run_cli(*RUN, f"results_dir={tmp_path}", "task.compare_fp=true")
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    every = blocks.set_index("group").loc["all"]
    assert every["only_top1"] == record["metrics"]["top1"]
    assert every["only_fp_top1_agreement"] == record["metrics"]["fp_top1_agreement"]
    none = blocks.set_index("group").loc["none"]
    assert none["only_fp_top1_agreement"] == 100.0 and none["only_logit_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_groups_partition_the_quantizers_in_model_order(blocks, tmp_path):
    groups = blocks[~blocks["group"].isin(["all", "none"])]
    assert list(groups["group"]) == ["patch_embed.proj", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert groups["quantizers"].sum() == int(blocks.set_index("group").loc["all", "quantizers"])
    assert groups[["only_top1", "all_but_top1", "only_drop_top1", "all_but_gain_top1"]].notna().all().all()
    drop = blocks.set_index("group").loc["none", "only_top1"] - groups["only_top1"]
    assert (drop == groups["only_drop_top1"]).all()
    paths = write(blocks, tmp_path)
    assert [p.name for p in paths] == ["mnist_vit_minmax_W4A4_block.csv", "mnist_vit_minmax_W4A4_block.png"]
    assert pd.read_csv(paths[0]).shape == blocks.shape and paths[1].stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["method=fp"], "method=fp quantizes nothing"),
    (["--group", "head"], "invalid choice"),
    (["bits=w4a4,w8a8"], "one run at a time"),
    (["metod=minmax"], "metod"),
])
def test_bad_input_is_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "ptq_bench.sensitivity", *args, "logger=none"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) <= 3  # argparse prints its usage above its one error line
