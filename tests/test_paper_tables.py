"""Paper tables: specs laid out from records and published rows, experiments' grids, budgets, per-method options,
seeds as mean ± std, labels carrying every protocol change, and the sweep's table and wandb logging."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, run_cli
from ptq_bench.errors import ConfigError
from ptq_bench.experiments import experiment_names, grid
from ptq_bench.methods.options import method_defaults
from ptq_bench.protocol import apply_protocol, chosen_options
from ptq_bench.results import paper
from ptq_bench.results.published import load_published, published_value
from ptq_bench.results.report import aggregate, method_label, paper_table, records_frame
from ptq_bench.results.store import run_key
from ptq_bench.tracking import log_table_artifact, log_to_wandb

QUIET = ["logger=none", "task.progress=false", "data.workers=0"]
MNIST_CHECKPOINT = REPO / "checkpoints" / "mnist_vit.safetensors"


def record(method: str, model: str, bits: tuple[int, int] | None, top1: float, seed: int = 0, options: dict | None = None,
           budget_changes: dict | None = None, display: str | None = None, **extra: Any) -> dict[str, Any]:
    """A record as the harness writes it: the method's full effective config, the protocol, seed and created."""
    method_cfg = {**method_defaults(method), **(options or {})}
    for key, (_before, after) in (budget_changes or {}).items():
        method_cfg[key] = after
    key = run_key({"method": method_cfg, "model": model, "bits": bits, "seed": seed, **extra})
    protocol = {"budget": "smoke" if budget_changes else "paper", "budget_changes": budget_changes or {}, "caps": {},
                "method_options": options or {}}
    return {
        "run_key": key, "task": "classification", "primary_metric": "top1", "created": extra.get("created", "2026-01-01T00:00:00"),
        "model": {"name": model, "display": display or model, "checkpoint": f"/ckpt/{model}.pth", "weights_sha256": extra.get("sha", "ab" * 32)},
        "method": method_cfg, "method_overrides": [], "option_changes": chosen_options(method_cfg, protocol),
        "protocol": protocol,
        "bits": {"w": bits[0], "a": bits[1], "label": f"W{bits[0]}A{bits[1]}"} if bits else None,
        "seed": seed, "metrics": {"top1": top1}, "timings": {"calibration_s": 1.0, "eval_s": 1.0, "total_s": 2.0},
        "config": {"data": {"kind": "imagefolder", "root": "/data", "max_eval_images": extra.get("max_eval_images")}},
    }


def cells_of(spec_name: str, records: list[dict]) -> tuple[paper.TableSpec, pd.DataFrame]:
    spec = paper.load_spec(spec_name)
    return spec, paper.layout(spec, aggregate(records_frame(records)))


def text(cells: pd.DataFrame, row: str, column: str, block: str) -> str:
    (value,) = cells[(cells["row"] == row) & (cells["column"] == column) & (cells["block"] == block)]["text"]
    return value


def test_repqvit_table1_lays_out_records_and_published_rows(tmp_path):
    records = [
        record("fp", "deit_tiny", None, 72.0, display="DeiT-T"),
        *[record("repq_vit", "deit_tiny", (4, 4), v, seed=s, display="DeiT-T") for s, v in enumerate((57.0, 57.5, 58.0))],
        record("repq_vit", "swin_base", (4, 4), 78.0, display="Swin-B"),
        record("repq_vit", "swin_base", (4, 4), 70.0, display="Swin-B", budget_changes={"calib_size": [32, 8]}),
        record("minmax", "deit_tiny", (4, 4), 1.0),  # no row of this table: left out
    ]
    spec, cells = cells_of("repqvit_table1", records)
    table = paper.wide(spec, cells)
    assert list(table.columns) == ["ViT-S", "ViT-B", "DeiT-T", "DeiT-S", "DeiT-B", "Swin-S", "Swin-B"]  # the paper's order
    rows = list(table.index)
    assert rows[:5] == [("32/32", "Full-Precision"), ("W4/A4", "FQ-ViT †"), ("W4/A4", "PTQ4ViT"), ("W4/A4", "APQ-ViT †"),
                        ("W4/A4", "RepQ-ViT")]
    assert rows[-3:] == [("W6/A6", "PTQ4ViT"), ("W6/A6", "APQ-ViT †"), ("W6/A6", "RepQ-ViT")]
    assert table.loc[("32/32", "Full-Precision"), "DeiT-T"] == "72.00 (72.21, -0.21)"
    assert table.loc[("W4/A4", "RepQ-ViT"), "DeiT-T"] == "57.50 ± 0.50 (n=3) (57.43, +0.07)"  # seeds: mean ± std (n)
    assert table.loc[("W4/A4", "RepQ-ViT"), "Swin-B"] == "78.00 (78.32, -0.32)"  # RepQ-ViT's own Swin-B value
    assert table.loc[("W4/A4", "RepQ-ViT"), "ViT-S"] == "– (65.05)"  # not run: missing, with the published value
    assert table.loc[("W4/A4", "APQ-ViT †"), "DeiT-T"] == "47.94"  # published-only row
    assert table.loc[("W6/A6", "RepQ-ViT"), "Swin-B"] == "– (84.57)"
    # the smoke-budget record has its own row under the paper's, never the paper's cell
    smoke = ("W4/A4", "RepQ-ViT [budget=smoke: calib_size=8]")
    assert rows.index(smoke) == rows.index(("W4/A4", "RepQ-ViT")) + 1
    assert table.loc[smoke, "Swin-B"] == "70.00" and table.loc[smoke, "DeiT-T"] == ""
    assert not (cells["text"] == "0.00").any() and len(cells[cells["kind"] == "paper"]) == 56  # every printed cell

    source = cells[(cells["row"] == "Full-Precision") & (cells["column"] == "Swin-B")].iloc[0]["source"]
    assert source.startswith("RepQ-ViT: RepQ-ViT (ICCV 2023") and "Table 1" in source
    paths = paper.write(spec, cells, tmp_path)
    assert "57.50 ± 0.50 (n=3) (57.43, +0.07)" in paths["md"].read_text()
    assert "\\begin{tabular}" in paths["tex"].read_text() and paths["png"].stat().st_size > 0
    assert len(pd.read_csv(paths["sources"])) == int(cells["published"].notna().sum())


def test_models_as_rows_and_ablation_rows_take_their_options():
    records = [record("fp", "vit_small", None, 81.0), record("ptq4vit", "vit_small", (8, 8), 80.9),
               record("aiqvit", "deit_tiny", (4, 4), 60.0, options={"rank": 20}),
               record("aiqvit", "deit_tiny", (4, 4), 62.0), record("aiqvit", "deit_tiny", (4, 4), 61.0, options={"rank": 50})]
    spec, cells = cells_of("ptq4vit_table1", records)
    table = paper.wide(spec, cells)
    assert list(table.columns) == ["FP32", "Base PTQ W8A8", "Base PTQ W6A6", "PTQ4ViT W8A8", "PTQ4ViT W6A6"]
    assert table.loc["ViT-S/224", "PTQ4ViT W8A8"] == "80.90 (81.00, -0.10)"  # the paper's Table 1, not the README's
    assert table.loc["ViT-S/224/32", "FP32"] == "n/a (75.99)"  # no config for this model
    spec, cells = cells_of("aiqvit_table6", records)
    table = paper.wide(spec, cells)
    assert table.loc[("DeiT-T", "r=20"), "4/4"] == "60.00 (59.61, +0.39)"
    assert table.loc[("DeiT-T", "Auto r"), "4/4"] == "62.00 (62.33, -0.33)"
    assert table.loc[("DeiT-T", "Auto r [rank=50]"), "4/4"] == "61.00"  # options no row names: own row, labelled


def test_published_values_prefer_the_tables_own_source_and_note_the_others():
    published = load_published()
    assert published_value(published, "classification", "top1", "repq_vit", "Swin-B", 4, 4)[0] == pytest.approx(78.32)
    value, source = published_value(published, "classification", "top1", "aiqvit", "DeiT-T", 4, 4)
    assert value == pytest.approx(62.33) and "PRIMARY" in source and "Table 1" in source
    assert not published[(published["paper"] == "AIQViT") & (published["method"] == "AIQViT")]["source"].str.startswith("SECONDARY").any()
    spec, cells = cells_of("aiqvit_table1", [])
    repq = cells[(cells["row"] == "RepQ-ViT") & (cells["column"] == "DeiT-T") & (cells["block"] == "3/3")].iloc[0]
    assert repq["published"] == pytest.approx(1.15) and "AIQViT" in repq["source"]  # AIQViT prints 1.15 ...
    assert "0.1 (APHQ-ViT" in repq["other_sources"]  # ... APHQ-ViT 0.10: noted, not a second value
    assert paper.coverage(spec)["cells"] == 7 * (1 + 4 + 6 + 6)


def test_seeds_aggregate_to_mean_std_and_single_runs_stay_plain():
    frame = records_frame([record("repq_vit", "deit_tiny", (4, 4), v, seed=s) for s, v in enumerate((50.0, 52.0, 57.0))]
                          + [record("minmax", "deit_tiny", (4, 4), 10.0)])
    cells = aggregate(frame)
    repq = cells[cells["method_name"] == "repq_vit"].iloc[0]
    assert (repq["value"], repq["n"]) == (pytest.approx(53.0), 3) and repq["std"] == pytest.approx(pd.Series([50.0, 52.0, 57.0]).std())
    assert paper.format_value(53.0, repq["std"], 3) == "53.00 ± 3.61 (n=3)"
    assert paper_table(frame).loc[("minmax", "W4A4"), "deit_tiny"] == "10.00"
    # the same seed twice (e.g. new code) is one run: the newest counts; other weights are never averaged in
    again = record("minmax", "deit_tiny", (4, 4), 11.0, created="2026-02-01T00:00:00", v=2)
    other = record("minmax", "deit_tiny", (4, 4), 30.0, sha="cd" * 32, seed=1)
    cells = aggregate(records_frame([record("minmax", "deit_tiny", (4, 4), 10.0), again, other]))
    assert sorted(cells["value"]) == [11.0, 30.0] and cells["method"].str.contains("weights=").all()


def test_labels_carry_the_budget_every_option_and_the_eval_subset():
    plain = record("aiqvit", "deit_tiny", (4, 4), 1.0)
    assert method_label(plain) == "aiqvit"
    old = record("aiqvit", "deit_tiny", (4, 4), 1.0, options={"device": "auto", "progress": True, "state_dir": "/x"})
    assert method_label(old) == "aiqvit"  # keys the YAML no longer has (old records) and runtime options: no label
    smoke = record("aiqvit", "deit_tiny", (4, 4), 1.0, options={"rank": 20, "search_iters": 5},  # ++ or method_options
                   budget_changes={"calib_size": [1024, 32], "iters": [6000, 20]}, max_eval_images=500)
    assert method_label(smoke) == "aiqvit [rank=20, search_iters=5; budget=smoke: calib_size=32, iters=20; eval 500 imgs]"
    frame = records_frame([plain, smoke])
    assert set(frame["method"]) == {"aiqvit", method_label(smoke)}  # never one cell


def test_a_random_weight_run_gets_its_own_row_never_the_papers_cell():
    """A run without a checkpoint or pretrained weights (the record's ``random_init``) at the paper's protocol is
    labelled "random weights" and laid out under the paper's row, with no published value beside it."""
    trained = record("repq_vit", "deit_tiny", (4, 4), 57.0, display="DeiT-T")
    untrained = record("repq_vit", "deit_tiny", (4, 4), 0.1, display="DeiT-T", sha="cd" * 32)
    untrained["model"].update({"checkpoint": None, "random_init": True})
    assert method_label(untrained) == "repq_vit [random weights]" and method_label(trained) == "repq_vit"
    spec, cells = cells_of("repqvit_table1", [trained, untrained])
    table = paper.wide(spec, cells)
    assert table.loc[("W4/A4", "RepQ-ViT"), "DeiT-T"] == "57.00 (57.43, -0.43)"
    assert table.loc[("W4/A4", "RepQ-ViT [random weights]"), "DeiT-T"] == "0.10"
    from ptq_bench.report import coverage_line
    # the paper's count stays the paper's: the other protocol's row is counted apart
    assert coverage_line(cells) == "1 of 35 reproducible cells have records (and 1 more in rows of other protocols)"


def test_a_switched_off_stage_is_not_in_the_label(tmp_path):
    """AdaLog without ``optimize``: the smoke budget's caps of its reconstruction options (iters, optim_size) change
    nothing the run does (they are outside its run key), so the label names only the search cap."""
    common = ["method=adalog", "budget=smoke", "method.calib_size=4", "data.max_eval_images=100", f"results_dir={tmp_path}", *QUIET]
    assert run_cli(*common).returncode == 0
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert record["method_label"] == "adalog [calib_size=4; budget=smoke: steps=3; eval 100 imgs]"
    assert set(record["protocol"]["budget_changes"]) == {"steps"}


def _compose(*overrides: str):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO), replace=True)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_method_options_and_budget_apply_per_method(tmp_path):
    sweep = ["budget=smoke", "+method_options.aiqvit.rank=20", "+method_options.repq_vit.softmax_quantizer=log2"]
    cfg, protocol = apply_protocol(_compose("method=aiqvit", *sweep))
    assert (cfg.method.rank, cfg.method.calib_size, cfg.method.iters, cfg.method.search_iters) == (20, 32, 20, 10)
    assert protocol.budget_changes["iters"] == [6000, 20] and protocol.method_options == {"rank": 20}
    cfg, protocol = apply_protocol(_compose("method=repq_vit", *sweep))
    assert cfg.method.softmax_quantizer == "log2" and "rank" not in cfg.method and protocol.budget_changes == {}
    cfg, _ = apply_protocol(_compose("method=aiqvit"))
    assert (cfg.method.calib_size, cfg.method.iters) == (1024, 6000)  # budget=paper: the YAML, i.e. the paper
    with pytest.raises(ConfigError, match="method_options.aiqvt: no method 'aiqvt'"):
        apply_protocol(_compose("method=repq_vit", "+method_options.aiqvt.rank=20"))
    (tmp_path / "deit_tiny.pth").write_bytes(b"")
    cfg, _ = apply_protocol(_compose("model=deit_tiny", f"+model.checkpoint_dir={tmp_path}"))
    assert cfg.model.checkpoint == str(tmp_path / "deit_tiny.pth") and "checkpoint_dir" not in cfg.model
    with pytest.raises(ConfigError, match="no checkpoint for deit_small"):
        apply_protocol(_compose("model=deit_small", f"+model.checkpoint_dir={tmp_path}"))


def test_experiment_resolves_to_the_tables_grid():
    frame = grid("repqvit_table1")
    assert len(frame) == 7 * 3 * 2 and frame["job"].value_counts().to_dict() == {"run": 35, "resume": 7}
    runs = {(r.model, r.method, "32/32" if r.bits == "-" else r.bits) for r in frame[frame["job"] == "run"].itertuples()}
    assert runs == set(paper.load_spec("repqvit_table1").runnable_cells())
    aiq = grid("aiqvit_table1", ["budget=smoke", "model=deit_tiny"])
    assert set(aiq[aiq["job"] == "skip"][["method", "bits"]].itertuples(index=False)) == {("ptq4vit", "W3A3")}
    assert aiq[aiq["method"] == "aiqvit"]["protocol"].str.contains("calib_size=32, .*iters=20").all()
    for name in experiment_names():  # every experiment runs exactly its table's cells
        frame = grid(name)
        jobs = frame[frame["job"].isin(["run", "no model config"])]
        runs = {(r.model, r.method, "32/32" if r.bits == "-" else r.bits) for r in jobs.itertuples()}
        assert runs == set(paper.load_spec(name).runnable_cells()), name


def test_unknown_paper_or_experiment_is_one_line():
    for module, args in (("ptq_bench.report", ["--paper", "nope"]), ("ptq_bench.experiments", ["nope"])):
        result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert result.stderr.startswith("error: unknown ") and "repqvit_table1" in result.stderr


def test_report_cli_lays_out_a_paper_with_no_records(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ptq_bench.report", "--paper", "repqvit_table1", "--runs",
                             str(tmp_path / "none"), "--out", str(tmp_path), "--sources"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "| W4/A4 | RepQ-ViT       | – (65.05)" in result.stdout and "0 of 35 reproducible cells" in result.stdout
    assert "Sources of the published values" in result.stdout and (tmp_path / "repqvit_table1.png").is_file()


class FakeWandb(types.ModuleType):
    """Records what tracking.py logs (wandb itself is disabled in tests)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.logged: list[dict] = []
        self.artifacts: list[Any] = []
        fake = self

        class Run:
            summary: dict = {}

            def log(self, data: dict) -> None:
                fake.logged.append(data)

            def log_artifact(self, artifact: Any) -> None:
                fake.artifacts.append(artifact)

            def finish(self) -> None:
                pass

        class Artifact:
            def __init__(self, name: str, type: str) -> None:  # noqa: A002 - wandb's signature
                self.name, self.type, self.files = name, type, []

            def add_file(self, path: str) -> None:
                self.files.append(Path(path).name)

        self.init = lambda **kwargs: Run()
        self.Settings = lambda **kwargs: kwargs
        self.Artifact = Artifact
        self.Table = lambda columns=None, data=None, dataframe=None: {"columns": columns, "data": data, "frame": dataframe}
        self.Image = lambda path: {"image": path}


def test_wandb_gets_the_table_row_and_the_sweeps_table_artifact(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = {"kind": "wandb", "mode": "offline"}
    rec = record("repq_vit", "deit_tiny", (4, 4), 58.0, display="DeiT-T")
    assert log_to_wandb(logger, rec, "deit_tiny/repq_vit/W4A4", tmp_path)
    row = fake.logged[0]["table_row"]
    assert row["columns"][:6] == ["model", "method", "bits", "metric", "value", "published"]
    assert row["data"][0][:6] == ["DeiT-T", "repq_vit", "W4A4", "top1", 58.0, 57.43]
    spec, cells = cells_of("repqvit_table1", [rec])
    paths = paper.write(spec, cells, tmp_path)
    assert log_table_artifact(logger, paths, spec.name, tmp_path)
    (artifact,) = fake.artifacts
    assert artifact.type == "paper-table" and {"repqvit_table1.md", "repqvit_table1.png"} <= set(artifact.files)
    assert "table" in fake.logged[-1] and "plot" in fake.logged[-1]


@pytest.mark.skipif(not MNIST_CHECKPOINT.is_file(), reason="train it with scripts/train_mnist_vit.py")
def test_cross_method_sweep_with_method_specific_options_runs(tmp_path):
    runs, sweep = tmp_path / "runs", tmp_path / "sweep"
    aiq = ["rank=4", "candidate_ranks=[2,4]", "iters=4", "search_iters=2", "batch_size=8"]
    result = run_cli("-m", "method=repq_vit,aiqvit", "bits=w4a4", "budget=smoke", *[f"+method_options.aiqvit.{o}" for o in aiq],
                     "data.max_eval_images=200", f"results_dir={runs}", f"hydra.sweep.dir={sweep}", *QUIET)
    assert result.returncode == 0, result.stderr
    by_method = {r["method"]["name"]: r for r in (json.loads(p.read_text()) for p in runs.glob("*.json"))}
    assert set(by_method) == {"repq_vit", "aiqvit"}
    aiqvit, repq = by_method["aiqvit"], by_method["repq_vit"]
    assert (aiqvit["method"]["rank"], aiqvit["method"]["iters"], aiqvit["method"]["calib_size"]) == (4, 4, 32)
    assert aiqvit["protocol"]["budget"] == "smoke" and aiqvit["protocol"]["budget_changes"]["calib_size"] == [1024, 32]
    assert "rank" not in repq["method"] and repq["protocol"]["budget_changes"] == {}
    assert "aiqvit [batch_size=8, candidate_ranks=[2,4], iters=4, rank=4, search_iters=2; budget=smoke: calib_size=32" in result.stdout


@pytest.mark.skipif(not MNIST_CHECKPOINT.is_file(), reason="train it with scripts/train_mnist_vit.py")
def test_demo_table_experiment_and_dry_run(tmp_path):
    runs, sweep = tmp_path / "runs", tmp_path / "sweep"
    dry = run_cli("+experiment=repqvit_table1", "model=deit_tiny", "dry_run=true", f"model.checkpoint_dir={tmp_path}",
                  f"results_dir={runs}", f"hydra.sweep.dir={tmp_path / 'dry'}", *QUIET)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: would run deit_tiny/repq_vit/W4A4 [calib_size=32]" in dry.stdout + dry.stderr
    assert "no checkpoint for deit_tiny" in dry.stdout + dry.stderr and not runs.exists()
    result = run_cli("+experiment=demo_table", "data.max_eval_images=200", f"results_dir={runs}", f"hydra.sweep.dir={sweep}", *QUIET)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| Model"))
    heads = [h.strip() for h in header.strip("|").split("|")]
    assert heads == ["Model", "FP", "FP [eval 200 imgs]", "MinMax W8A8", "MinMax W8A8 [eval 200 imgs]", "RepQ-ViT W8A8",
                     "RepQ-ViT W8A8 [eval 200 imgs]", "MinMax W4A4", "MinMax W4A4 [eval 200 imgs]", "RepQ-ViT W4A4",
                     "RepQ-ViT W4A4 [eval 200 imgs]"]  # an evaluation subset is another protocol: its own column
    assert len(list(runs.glob("*.json"))) == 5 and (sweep / "demo_table.png").is_file()


def test_aphqvit_table1_takes_its_own_transcription_and_fills_run_rows():
    """APHQ-ViT's Table 1 reprints AdaLog's calibration-only numbers (DeiT-B W3/A3 57.47, README 57.45): the table's
    cell shows its own source's value, and an adalog record fills that row with the delta against it."""
    spec, cells = cells_of("aphqvit_table1", [record("adalog", "deit_base", (3, 3), 57.0)])
    (cell,) = cells[(cells["row"] == "AdaLog") & (cells["column"] == "DeiT-B") & (cells["block"] == "3/3")].to_dict("records")
    assert (cell["published"], cell["reproduced"]) == (57.47, 57.0) and "Table 1" in cell["source"]
    assert cell["text"] == "57.00 (57.47, -0.47)"
    assert paper.coverage(spec)["with_published_value"] == paper.coverage(spec)["cells"] == 133
    coco = paper.load_spec("aphqvit_coco")
    assert paper.coverage(coco)["cells"] == 8 * (1 + 7)


def test_coco_runs_calibrated_on_other_images_are_kept_apart_and_defaults_match_older_records():
    """Two runs of one cell whose calibration images came from elsewhere (data.calib_split/calib_draw) are never
    averaged: each is labelled with what differs; a record at the defaults reads as one written before the choice
    existed, and an uncalibrated run is the same whatever the choice says."""
    def coco(ap: float, calibrated: bool = True, **data: str) -> dict:
        rec = record("aphq_vit", "mask_rcnn_swin_t", (4, 4), 0.0, display="MaskRCNN-Swin-T", sha=str(sorted(data.items())))
        rec["model"]["weights_sha256"] = "cd" * 32
        rec["config"]["data"] = {"kind": "coco", "root": "/coco", **data}
        rec["calibration"] = {"num_images": 256} if calibrated else None
        return {**rec, "task": "coco", "primary_metric": "bbox_mAP", "metrics": {"bbox_mAP": ap}}

    fork = coco(38.0, calib_split="val", calib_draw="first")
    frame = aggregate(records_frame([fork, coco(36.0, calib_split="train", calib_draw="seeded")]))
    assert len(frame) == 2 and sorted(frame["value"]) == [36.0, 38.0]
    assert "data.calibration_images=val/first" in " ".join(frame["protocol"])
    same = aggregate(records_frame([coco(36.0), coco(37.0, calib_split="train", calib_draw="seeded")]))
    assert len(same) == 1 and same["n"].item() == 1  # one run (same settings and seed): the newest record is shown
    uncalibrated = aggregate(records_frame([coco(36.0, calibrated=False), coco(37.0, False, calib_split="val", calib_draw="first")]))
    assert len(uncalibrated) == 1


def test_fimaq_readme_fills_its_cells_and_keeps_a_rank_15_run_apart():
    """FIMA-Q's README table: a run at the configs' rank (k = 5) fills the cell with the delta against the README's
    value; a run at the README checkpoints' rank 15 is another protocol and gets its own labelled row."""
    records = [record("fima_q", "deit_tiny", (4, 4), 66.0), record("fima_q", "deit_tiny", (4, 4), 67.0, options={"k": 15})]
    spec, cells = cells_of("fimaq_readme", records)
    table = paper.wide(spec, cells)
    assert table.loc["DeiT-T", "FIMA-Q W4/A4"] == "66.00 (66.84, -0.84)"
    assert table.loc["Swin-B", "FIMA-Q W3/A3"] == "– (78.82)"
    assert table.loc["DeiT-T", "FIMA-Q W4/A4 [k=15]"] == "67.00"
    assert paper.coverage(spec) == {"cells": 21, "reproducible": 21, "published_only": 0, "with_published_value": 21}


def test_aphqvit_readme_fills_the_mlp_recon_column_from_runs_without_bits():
    """APHQ-ViT's README tables: an aphq_vit_mlp run (no bits, FP) fills its "MLP Recon." cell against the README's
    value, beside FP and the quantized columns; a run at the 3-bit config's clamp percentile is another protocol; on
    COCO the run at the detection fork's protocol fills its row."""
    records = [record("fp", "deit_tiny", None, 72.0), record("aphq_vit_mlp", "deit_tiny", None, 71.0),
               record("aphq_vit_mlp", "deit_tiny", None, 70.5, options={"mlp_pct": 0.99}),
               record("aphq_vit", "deit_tiny", (4, 4), 66.0)]
    spec, cells = cells_of("aphqvit_readme", records)
    table = paper.wide(spec, cells)
    assert table.loc["DeiT-T", "MLP Recon."] == "71.00 (71.07, -0.07)"
    assert table.loc["DeiT-T", "Full-Precision"] == "72.00 (72.21, -0.21)"
    assert table.loc["DeiT-T", "APHQ-ViT W4/A4"] == "66.00 (66.66, -0.66)"
    assert table.loc["DeiT-T", "MLP Recon. [mlp_pct=0.99]"] == "70.50"
    assert paper.coverage(spec) == {"cells": 28, "reproducible": 28, "published_only": 0, "with_published_value": 28}
    jobs = grid("aphqvit_readme")
    assert (jobs[jobs["method"] == "aphq_vit_mlp"]["job"].value_counts().to_dict() == {"run": 7, "resume": 7})

    def coco(method: str, ap: float, bits: tuple[int, int] | None, **options: Any) -> dict:
        rec = record(method, "mask_rcnn_swin_t", bits, 0.0, options=options or None, display="MaskRCNN-Swin-T")
        return {**rec, "task": "coco", "primary_metric": "bbox_mAP", "metrics": {"bbox_mAP": ap, "segm_mAP": ap - 1}}

    spec, cells = cells_of("aphqvit_readme_coco", [coco("aphq_vit_mlp", 45.0, None, calib_size=256, batch_size=1, mlp_pct=0.999)])
    box = cells[(cells["column"] == "Mask R-CNN Swin-T") & (cells["metric_label"] == "APbox")]
    assert dict(zip(box["row"], box["text"]))["MLP Recon."] == "45.00 (45.80, -0.80)"
    assert paper.coverage(spec)["reproducible"] == 24


def test_glfq_table1_runs_fima_q_beside_its_baselines_and_keeps_the_fima_q_framework_qdrop_published_only():
    """GLF-Q's Table 1 (FIMA-Q framework): a fima_q run at its YAML fills FIMA-Q's cell against the value FIMA-Q
    publishes; our qdrop (APHQ-ViT's re-run) never fills the row of QDrop as re-implemented in the FIMA-Q framework."""
    spec, cells = cells_of("glfq_table1", [record("fima_q", "deit_base", (3, 3), 76.0), record("qdrop", "deit_base", (3, 3), 70.0)])
    assert text(cells, "FIMA-Q", "DeiT-B", "3/3") == "76.00 (76.54, -0.54)"
    assert text(cells, "QDrop*", "DeiT-B", "3/3") == "72.97"
    assert paper.coverage(spec) == {"cells": 196, "reproducible": 112, "published_only": 84, "with_published_value": 196}


def test_aphqvit_coco_rows_take_erq_and_the_256_image_ias_vit_runs():
    """APHQ-ViT Table 2: ERQ runs at its YAML; I&S-ViT's row is the 256-image run the experiment asks for (its YAML's
    1,024 images do not fit a detector's block captures), and a run at the YAML's size is another protocol; QDrop and
    APHQ-ViT fill their rows with runs at the detection code's protocol (one image at a time, the search on one)."""
    def coco(method: str, ap: float, **options: Any) -> dict:
        rec = record(method, "mask_rcnn_swin_t", (4, 4), 0.0, options=options or None, display="MaskRCNN-Swin-T")
        return {**rec, "task": "coco", "primary_metric": "bbox_mAP", "metrics": {"bbox_mAP": ap, "segm_mAP": ap - 1}}

    detection = {"calib_size": 256, "search_size": 1, "batch_size": 1}
    _, cells = cells_of("aphqvit_coco", [coco("erq", 36.0), coco("ias_vit", 37.0, calib_size=256), coco("ias_vit", 30.0),
                                         coco("qdrop", 33.0, **detection), coco("aphq_vit", 38.0, **detection, mlp_pct=0.999)])
    box = cells[(cells["column"] == "Mask R-CNN Swin-T") & (cells["metric_label"] == "APbox")]
    texts = dict(zip(box["row"], box["text"]))
    assert texts["ERQ"] == "36.00 (36.80, -0.80)" and texts["I&S-ViT"] == "37.00 (37.50, -0.50)"
    assert texts["I&S-ViT [calib_size=1024]"] == "30.00"
    assert texts["QDrop"].startswith("33.00 (") and texts["APHQ-ViT (Ours)"].startswith("38.00 (")  # with the published value
    jobs = grid("aphqvit_coco")
    assert jobs[jobs["method"] == "ias_vit"]["protocol"].str.startswith("calib_size=256").all()
    for method in ("qdrop", "aphq_vit"):
        assert jobs[jobs["method"] == method]["protocol"].str.contains("search_size=1").all()
