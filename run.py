"""ptq-bench entry point (a Hydra app).

    python run.py                                   # the embedded demo: MNIST ViT, FP vs MinMax at W8A8 and W4A4
    python run.py model=deit_small method=repq_vit bits=w4a4 data=imagenet data.root=/data/imagenet
    python run.py -m model=deit_tiny,vit_small bits=w4a4,w6a6 method=fp,minmax data=imagenet data.root=...

Each run writes one record to ``results/runs/<run_key>.json`` (skipped if it exists: sweeps resume); a multirun
ends with its table (see ``python -m ptq_bench.report`` for tables over all records).
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

REPO = Path(__file__).resolve().parent
#: ``python run.py`` with no arguments runs this sweep (the embedded default of the README).
DEMO_ARGS = ["-m", "method=fp,minmax", "bits=w8a8,w4a4"]

OmegaConf.register_new_resolver("repo_root", lambda: str(REPO), replace=True)
log = logging.getLogger("ptq_bench")


def run_label(cfg: DictConfig) -> str:
    bits = f"W{cfg.bits.w}A{cfg.bits.a}"
    return f"{cfg.model.name}/{cfg.method.name}/{bits}"


def method_overrides() -> list[str]:
    """The command-line overrides of method options (they name an ablation variant in tables)."""
    return sorted(o for o in HydraConfig.get().overrides.task if o.startswith("method."))


def execute(cfg: DictConfig) -> dict:
    from ptq_bench.results.environment import environment
    from ptq_bench.results.store import RecordStore
    from ptq_bench.tracking import log_to_wandb
    from tasks import TASKS

    store = RecordStore(cfg.results_dir)
    label = run_label(cfg)
    record = TASKS.get(str(cfg.task.name))(cfg, store, label)
    if "created" not in record:  # a fresh run, not a resumed one
        record.update(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            method_overrides=method_overrides(),
            config=OmegaConf.to_container(cfg, resolve=True),
            env=environment(REPO, record["device"]),
            output_dir=HydraConfig.get().runtime.output_dir,
        )
        path = store.write(record)
        log.info("%s: top-1 %.2f%% (record %s)", label, record["metrics"]["top1"], path)
        log_to_wandb(cfg.logger, record, label, Path(HydraConfig.get().runtime.output_dir))
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep_keys = Path(HydraConfig.get().sweep.dir) / "run_keys.txt"
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
    main()
