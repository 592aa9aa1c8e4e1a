"""ptq-bench entry point (a Hydra app).

    python run.py                                   # the embedded demo: MNIST ViT, FP vs MinMax at W8A8 and W4A4
    python run.py model=deit_small method=repq_vit bits=w4a4 data=imagenet data.root=/data/imagenet
    python run.py -m model=deit_tiny,vit_small bits=w4a4,w6a6 method=fp,minmax data=imagenet data.root=...

Each run goes through the one harness (ptq_bench/harness.py) and writes one record to
``results/runs/<run_key>.json`` (skipped if it exists: sweeps resume); a multirun ends with its table (see
``python -m ptq_bench.report`` for tables over all records).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ptq_bench.paths import conf_path  # importing ptq_bench registers the config resolvers Hydra needs

#: ``python run.py`` with no arguments runs this sweep (the embedded default of the README).
DEMO_ARGS = ["-m", "method=fp,minmax", "bits=w8a8,w4a4"]


def expand_home(arg: str) -> str:
    """``key=~/path`` → ``key=$HOME/path``: Hydra's override grammar rejects an unquoted ``~``."""
    key, sep, value = arg.partition("=")
    return f"{key}={os.path.expanduser(value)}" if sep and value.startswith("~") else arg


def check_experiments(args: list[str]) -> None:
    """``+experiment=<name>``: an unknown name or a missing ``+`` is one error line listing conf/experiment/, before
    Hydra composes (its own error spans a dozen lines); experiments.py (and pandas) load only when one is given."""
    if not any("experiment=" in arg for arg in args):
        return
    from ptq_bench.errors import ConfigError
    from ptq_bench.experiments import check_experiment_args

    try:
        check_experiment_args(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def config_dirs(args: list[str]) -> Optional[list[Path]]:
    """conf/ and the folders ``--config-dir`` / ``-cd`` add to Hydra's search path; None when the search path changes
    otherwise (``--config-path``, ``-cp``, ``hydra.searchpath``): the checks below are then left to Hydra."""
    dirs = [conf_path()]
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        if flag in ("--config-path", "-cp") or arg.lstrip("+~").startswith("hydra.searchpath"):
            return None
        if flag in ("--config-dir", "-cd"):
            folder = value if sep else (args[i + 1] if i + 1 < len(args) else "")
            dirs.append(Path(os.path.expanduser(folder)))
    return dirs


def check_group_choices(args: list[str]) -> None:
    """``model=<name>`` and the other config groups of conf/config.yaml's defaults (a sweep: names joined by commas):
    an unknown name is one error line listing the group's configs, before Hydra composes (its own error spans a
    dozen lines); Hydra's sweep functions (glob, choice, range) stay Hydra's. A key added with ``+`` must start with a
    top-level key or group of the config: Hydra would add a misspelt one (``+experiments=``, ``+methd.iters=``)
    silently."""
    dirs = config_dirs(args)
    if dirs is None:
        return
    primary = OmegaConf.load(conf_path("config.yaml"))
    groups = {key for entry in primary.defaults if isinstance(entry, DictConfig) for key in entry}
    folders = {path.name for folder in dirs if folder.is_dir() for path in folder.iterdir() if path.is_dir()}
    top_level = groups | folders | {key for key in primary if key != "defaults"} | {"experiment", "hydra"}
    for arg in args:
        key, sep, value = arg.lstrip("~").partition("=")
        if not sep or key.startswith("-"):
            continue
        group, names = key.lstrip("+"), value.split(",")
        if key.startswith("+") and group.split(".")[0] not in top_level:
            print(f"error: {arg}: unknown config key '{group.split('.')[0]}' (top-level keys: "
                  f"{', '.join(sorted(top_level))})", file=sys.stderr)
            sys.exit(2)
        if group not in groups or not all(re.fullmatch(r"[\w.-]+", name) for name in names):
            continue
        known = sorted({path.stem for folder in dirs for path in (folder / group).glob("*.yaml")})
        for name in names:
            if name not in known:
                print(f"error: unknown {group} '{name}' (known: {', '.join(known)})", file=sys.stderr)
                sys.exit(2)


def check_method_keys(args: list[str]) -> None:
    """``method.<key>=value`` (no ``+``) for a key the chosen method's YAML lacks: the same one-line refusal as
    ``+method.<key>=`` gets from the method's options, before Hydra composes (its struct error spans six lines).
    Left to Hydra with an experiment (it may choose the method) or a changed search path."""
    given = [arg.partition("=")[0].removeprefix("method.").split(".")[0] for arg in args
             if arg.startswith("method.") and "=" in arg]
    dirs = config_dirs(args)
    if not given or dirs is None or any("experiment=" in arg for arg in args):
        return
    from ptq_bench.methods.options import unknown_options

    chosen = [arg.partition("=")[2] for arg in args if arg.startswith("method=")]
    default = [str(entry["method"]) for entry in OmegaConf.load(conf_path("config.yaml")).defaults
               if isinstance(entry, DictConfig) and "method" in entry]
    names = (chosen[-1] if chosen else default[0]).split(",")
    if not all(re.fullmatch(r"[\w-]+", name) for name in names):  # Hydra's sweep functions stay Hydra's
        return
    for name in names:
        yaml = next((folder / "method" / f"{name}.yaml" for folder in dirs
                     if (folder / "method" / f"{name}.yaml").is_file()), None)
        keys = list(OmegaConf.load(yaml)) if yaml is not None else None
        unknown = [option for option in given if keys is not None and option not in keys]
        if unknown:
            print(f"error: {unknown_options(name, unknown, keys)}", file=sys.stderr)
            sys.exit(2)


def gpu_slot(cfg: DictConfig, hydra_cfg: DictConfig) -> Optional[int]:
    """The job number when this job runs beside others on one machine (Hydra's joblib launcher) and is not itself
    distributed: ``device=auto`` then spreads the jobs over the machine's GPUs (harness.resolve_device)."""
    parallel = str(hydra_cfg.launcher.get("_target_", "")).endswith("JoblibLauncher")
    distributed = str(cfg.task.get("launcher", "none")) != "none"
    return int(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN and parallel and not distributed else None


def execute(cfg: DictConfig) -> dict:
    from ptq_bench.harness import run

    hydra_cfg = HydraConfig.get()
    record = run(cfg, list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir), gpu_slot(cfg, hydra_cfg))
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_keys = Path(hydra_cfg.sweep.dir) / "run_keys.txt"
        with open(sweep_keys, "a") as handle:  # one short line per job: appends do not interleave
            handle.write(record["run_key"] + "\n")
    return record


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ptq_bench.errors import PTQBenchError

    try:
        execute(cfg)
    except MissingMandatoryValue as error:
        print(f"error: missing required value '{error.full_key}' (set it on the command line, e.g. {error.full_key}=...)", file=sys.stderr)
        sys.exit(2)
    except PTQBenchError as error:
        message = str(error).strip().splitlines()[-1]  # DataLoader workers re-raise with their traceback as text
        print(f"error: {message.split(': ', 1)[-1] if message.startswith('ptq_bench.') else message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv.extend(DEMO_ARGS)
    sys.argv[1:] = [expand_home(arg) for arg in sys.argv[1:]]
    check_experiments(sys.argv[1:])
    check_group_choices(sys.argv[1:])
    check_method_keys(sys.argv[1:])
    main()
