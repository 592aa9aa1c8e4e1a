"""Experiments: ``python run.py +experiment=<table>`` runs one paper table's grid; this module lists the grid.

    python -m ptq_bench.experiments                                  # the experiments and their sizes
    python -m ptq_bench.experiments repqvit_table1 [budget=smoke] [model=deit_tiny,deit_small] [...]

An experiment (``conf/experiment/<name>.yaml``) sets ``paper_table`` and a sweep (``hydra.sweeper.params``: models ×
methods × bits); command-line sweeps replace its axes, other overrides (budget, method_options) apply to every job.
Each job of the product is one of: ``run`` (a cell of the table), ``resume`` (FP at a second bit-width: bits do
not enter FP's run key, so it finds the first one's record), ``skip`` (not a cell of the table: no work) or ``no
model config`` (conf/model/<model>.yaml absent, e.g. COCO models before the detection task is installed). The
same happens, job by job, in ``python run.py +experiment=<name> dry_run=true`` (weights checked too).
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from ptq_bench.errors import ConfigError
from ptq_bench.methods import METHODS
from ptq_bench.paths import conf_path

CONF = conf_path()
AXES = ("model", "method", "bits")
#: An experiment on run.py's command line: ``+experiment=<name>``, and the typos ``experiment=`` / ``++experiment=``.
EXPERIMENT_ARG = re.compile(r"(\+{0,2})experiment=(.*)")


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def check_name(name: str) -> None:
    """One-line ConfigError listing the experiments when ``name`` is not one of conf/experiment/."""
    if name not in experiment_names():
        raise ConfigError(f"unknown experiment '{name}' (known: {', '.join(experiment_names())})")


def check_experiment_args(args: Sequence[str]) -> None:
    """run.py's ``experiment=`` arguments name experiments (a sweep: names joined by commas) added with ``+``; checked
    before Hydra composes, whose own errors for an unknown name or a missing ``+`` span several lines."""
    for arg in args:
        match = EXPERIMENT_ARG.fullmatch(arg)
        if match is None:
            continue
        plus, value = match.groups()
        names = value.split(",")
        if all(re.fullmatch(r"[\w.-]*", name) for name in names):  # Hydra's sweep functions (glob, choice) stay Hydra's
            for name in names:
                check_name(name)
        if plus != "+":
            raise ConfigError(f"{arg}: an experiment is added to the config, write +experiment={value}")


def compose(name: str, overrides: list[str]) -> DictConfig:
    """The experiment's config (hydra node included) with ``overrides``; one-line ConfigError for an unknown name."""
    check_name(name)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=[f"+experiment={name}", *overrides], return_hydra_config=True)


def grid(name: str, overrides: list[str] = ()) -> pd.DataFrame:  # type: ignore[assignment]
    """Every job of experiment ``name``'s sweep with what it does (run / resume / skip) and its protocol."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    sweeps = {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and o.input_line]
    cfg = compose(name, fixed)
    params = {str(k): str(v).split(",") for k, v in (cfg.hydra.sweeper.params or {}).items()}
    axes = {axis: sweeps.get(axis, params.get(axis, [str(OmegaConf.select(cfg, f"hydra.runtime.choices.{axis}"))]))
            for axis in AXES}
    other = set(sweeps) - set(AXES)
    if other:
        raise ConfigError(f"the grid lists sweeps over {', '.join(AXES)} only, not {', '.join(sorted(other))}")
    spec = _spec(cfg)
    rows, bitless_seen = [], set()
    uses_bits = {method: METHODS.get(method).uses_bits for method in axes["method"]}  # runs without bits: once per model
    for model, method, bits in itertools.product(axes["model"], axes["method"], axes["bits"]):
        label = bits.upper()
        if spec is not None and not spec.has_cell(model, method, label):
            action = "skip"
        elif not model_available(model):
            action = "no model config"
        elif not uses_bits[method] and (model, method) in bitless_seen:
            action = "resume"
        else:
            action = "run"
        bitless_seen.add((model, method)) if not uses_bits[method] else None
        rows.append({"model": model, "method": method, "bits": label if uses_bits[method] else "-", "job": action,
                     **_protocol(cfg, method)})
    return pd.DataFrame(rows)


def model_available(model: str) -> bool:
    return (CONF / "model" / f"{model}.yaml").is_file()


def _spec(cfg: DictConfig) -> Any:
    from ptq_bench.results.paper import load_spec

    return load_spec(str(cfg.paper_table)) if cfg.get("paper_table") else None


def _protocol(cfg: DictConfig, method: str) -> dict[str, Any]:
    """The method's calibration size and budget-scaled options under the experiment's budget, and the options
    ``method_options`` gives it: what the harness will apply (:func:`ptq_bench.protocol.apply_protocol`)."""
    from ptq_bench.methods import METHODS
    from ptq_bench.methods.options import method_defaults
    from ptq_bench.protocol import budget, method_options

    given = method_options(OmegaConf.merge(cfg, {"method": {"name": method}}), METHODS)
    values = {**method_defaults(method), **given}
    _, caps = budget(cfg)
    shown = {}
    for key in ("calib_size", *sorted(_budget_keys() - {"calib_size"})):
        if key in values:
            value = values[key]
            shown[key] = min(value, caps[key]) if key in caps and isinstance(value, int) else value
    extra = ", ".join(f"{k}={v}" for k, v in sorted(given.items()) if k not in shown)
    return {"protocol": ", ".join(f"{k}={v}" for k, v in shown.items()) + (f"; {extra}" if extra else "")}


def _budget_keys() -> set[str]:
    """Option names any budget caps (calibration images and iterations): the protocol columns of the grid."""
    keys: set[str] = set()
    for path in (CONF / "budget").glob("*.yaml"):
        keys |= set((OmegaConf.load(path).get("caps") or {}).keys())
    return keys


def summary(name: str, frame: pd.DataFrame, overrides: list[str]) -> str:
    counts = frame["job"].value_counts()
    command = " ".join(["python run.py", f"+experiment={name}", *overrides])
    missing = f", {counts['no model config']} without a model config here" if "no model config" in counts else ""
    return (f"{len(frame)} jobs: {counts.get('run', 0)} run, {counts.get('resume', 0)} resume FP's record, "
            f"{counts.get('skip', 0)} skipped (not a cell of the table){missing}.\n"
            f"run it: {command} data.root=... model.checkpoint_dir=...")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help"):
            rows = [{"experiment": n, **grid(n)["job"].value_counts().reindex(["run", "resume", "skip"], fill_value=0).to_dict()}
                    for n in experiment_names()]
            print(__doc__.strip().split("\n\n")[0] + "\n\n" + pd.DataFrame(rows).to_markdown(index=False))
            return 0
        name, overrides = args[0], args[1:]
        frame = grid(name, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(frame[frame["job"] != "skip"].to_markdown(index=False))
    print("\n" + summary(name, frame, overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
