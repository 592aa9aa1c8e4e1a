"""Per-layer sensitivity: which layers a method's quantized model loses its accuracy on.

The run is calibrated once, as ``run.py`` would (same config, overrides and checks); then the evaluation is
repeated with one group of quantizers on and all others off (``only``: the damage that group does alone) and with
that group off and all others on (``all_but``: what the model gets back when that group stays float). Groups are
transformer blocks (and each layer outside them: patch embedding, head) or, with ``--group layer``, every quantized
layer. With the FP model beside it, each evaluation also gives the top-1 agreement and the logit cosine with FP.

    python -m ptq_bench.sensitivity method=repq_vit bits=w4a4              # the MNIST default model
    python -m ptq_bench.sensitivity --group layer model=deit_tiny data=imagenet data.root=/data/imagenet \\
        data.max_eval_images=2000 method=minmax bits=w4a4

It writes ``<out>/<model>_<method>_<bits>_<group>.csv`` and a bar plot (``.png``) and prints the table. A
quantizer switched off computes its layer in float on the weights the method left: for methods that only fit
grids (and FP-preserving folds) that is the FP layer; for reconstruction methods it is the reconstructed weight.
Per-layer bits for the layers that need them: ``bits.layers`` (README, Bits).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from ptq_bench.errors import ConfigError, PTQBenchError
from ptq_bench.harness import calibrate, check_checkpoint_path, prepare, run_label, seed_everything
from ptq_bench.models import find_blocks, named_quantizers, only_quantizers
from ptq_bench.paths import REPO, conf_path
from ptq_bench.protocol import apply_protocol
from ptq_bench.quant.base import Quantizer

GROUPINGS = ("block", "layer")
#: The metrics of an evaluation kept in the table, when the task reports them (classification with an FP model).
FIDELITY = ("fp_top1_agreement", "logit_cosine")


def quantizer_groups(model: nn.Module, grouping: str) -> dict[str, list[Quantizer]]:
    """The enabled quantizers of ``model`` by group, in model order: a block's dotted name (``blocks.3``; a layer
    outside every block is its own group) or, for ``layer``, each quantized layer's name."""
    blocks = [name for name, _ in find_blocks(model)]
    groups: dict[str, list[Quantizer]] = {}
    for name, quantizer in named_quantizers(model):
        if not quantizer.enabled:
            continue
        layer = name.rsplit(".", 1)[0]
        block = next((b for b in blocks if layer == b or layer.startswith(b + ".")), None)
        groups.setdefault(layer if grouping == "layer" or block is None else block, []).append(quantizer)
    return groups


def sensitivity(cfg: DictConfig, grouping: str = "block") -> pd.DataFrame:
    """Calibrate the run ``cfg`` describes once and evaluate it per group (``only`` and ``all_but``): one row per
    group plus ``all`` (every quantizer on, the run's own number) and ``none`` (every quantizer off)."""
    if grouping not in GROUPINGS:
        raise ConfigError(f"--group {grouping!r}: one of {', '.join(GROUPINGS)}")
    check_checkpoint_path(cfg.model)
    cfg, protocol = apply_protocol(cfg)
    task, method, settings = prepare(cfg)
    if not method.uses_calibration:
        raise ConfigError(f"method={method.name} quantizes nothing: a sensitivity needs a quantizing method")
    seed_everything(settings.seed)
    model, _ = task.build_model()
    method.check(model)
    task.check_data(settings.calib_size)
    model.to(settings.device)
    fp_model = copy.deepcopy(model).eval()
    model, _ = calibrate(task, method, settings, model)
    groups = quantizer_groups(model, grouping)
    every = {q for quantizers in groups.values() for q in quantizers}
    label = run_label(cfg, method)
    metric = task.primary_metric

    def measure(name: str, enabled: set[Quantizer]) -> dict[str, Any]:
        with only_quantizers(model, enabled):
            metrics = task.evaluate(model, settings.device, f"{label} {name}", fp_model)
        return {metric: metrics[metric], **{k: metrics[k] for k in FIDELITY if k in metrics}}

    reference = {"all": measure("all", every), "none": measure("none", set())}
    rows = [{"group": name, "quantizers": len(every) if name == "all" else 0, **{f"only_{k}": v for k, v in values.items()}}
            for name, values in reference.items()]
    for name, quantizers in groups.items():
        own = set(quantizers)
        only, all_but = measure(f"only {name}", own), measure(f"all but {name}", every - own)
        rows.append({"group": name, "quantizers": len(quantizers), **{f"only_{k}": v for k, v in only.items()},
                     **{f"all_but_{k}": v for k, v in all_but.items()}})
    frame = pd.DataFrame(rows)
    frame[f"only_drop_{metric}"] = reference["none"][metric] - frame[f"only_{metric}"]  # vs FP
    if f"all_but_{metric}" in frame:
        frame[f"all_but_gain_{metric}"] = frame[f"all_but_{metric}"] - reference["all"][metric]  # vs all quantized
    frame.attrs.update(label=label, metric=metric, grouping=grouping, model=str(cfg.model.name), method=method.name,
                       bits=method.bits.label)
    return frame


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Bars per group: the metric lost with only that group quantized and regained with only it in float; below,
    when measured, the same for the top-1 agreement with the FP model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = frame.attrs["metric"]
    groups = frame[~frame["group"].isin(["all", "none"])]
    panels = [(metric, groups[f"only_drop_{metric}"], groups[f"all_but_gain_{metric}"])]
    if "only_fp_top1_agreement" in groups:
        every = float(frame.loc[frame["group"] == "all", "only_fp_top1_agreement"].iloc[0])
        panels.append(("top-1 agreement with FP", 100.0 - groups["only_fp_top1_agreement"],
                       groups["all_but_fp_top1_agreement"] - every))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.35 * len(groups) + 2), 3.2 * len(panels)), squeeze=False)
    x = list(range(len(groups)))
    for ax, (name, drop, gain) in zip(axes[:, 0], panels):
        ax.bar([i - 0.2 for i in x], drop, width=0.4, label="drop, only this group quantized")
        ax.bar([i + 0.2 for i in x], gain, width=0.4, label="gain, only this group in float")
        ax.set_xticks(x, groups["group"], rotation=70, ha="right", fontsize=7)
        ax.set_ylabel(f"{name} (points)")
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(frame.attrs["label"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(frame: pd.DataFrame, out: Path) -> list[Path]:
    """The table as CSV and its plot, named after model, method, bits and grouping."""
    out.mkdir(parents=True, exist_ok=True)
    a = frame.attrs
    stem = out / f"{a['model']}_{a['method']}_{a['bits']}_{a['grouping']}"
    frame.to_csv(stem.with_suffix(".csv"), index=False)
    plot(frame, stem.with_suffix(".png"))
    return [stem.with_suffix(".csv"), stem.with_suffix(".png")]


def compose_run(overrides: Sequence[str]) -> DictConfig:
    """The config ``python run.py <overrides>`` would run (single run; no sweeps)."""
    if any("," in o.partition("=")[2] and not o.partition("=")[2].lstrip().startswith(("{", "[")) for o in overrides):
        raise ConfigError("one run at a time: no comma-separated sweeps in the overrides")
    try:
        with initialize_config_dir(config_dir=str(conf_path()), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(str(error).strip().splitlines()[0]) from None


def main(argv: list[str] | None = None) -> int:
    """The command line; a :class:`PTQBenchError` is one ``error:`` line and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="other arguments: run.py overrides")
    parser.add_argument("--group", default="block", choices=GROUPINGS, help="quantizers grouped by block or by layer")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "sensitivity", help="where the CSV and plot go")
    args, overrides = parser.parse_known_args(argv)
    try:
        frame = sensitivity(compose_run(overrides), args.group)
        paths = write(frame, args.out)
    except PTQBenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(frame.to_markdown(index=False, floatfmt=".2f"))
    print("written: " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
