"""The harness: one run of (task, model, method, bits, seed), the same for every task.

It owns what every task needs: reading the run's settings (bits, seed, device, calibration size), the run
identity and its key, resume (a run whose key has a record is skipped), seeding, the device, timing, memory, the
record and logging. Task specifics (model, data, forward, metric) come from the task adapter (:mod:`tasks`), the
recipe from the method (:mod:`ptq_bench.methods`), which checks the model's architecture before any calibration.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ptq_bench import __version__
from ptq_bench.bits import layer_bits
from ptq_bench.checks import boolean, integer, writable_directory
from ptq_bench.compiled_eval import evaluating
from ptq_bench.deploy import check_deploy
from ptq_bench.deploy.measure import Recorder
from ptq_bench.distributed import is_main_process
from ptq_bench.errors import ConfigError
from ptq_bench.methods import METHODS, BitWidth, Method, build_method
from ptq_bench.models.coverage import check_calibrated, check_ran, quantized_modules
from ptq_bench.paths import REPO, conf_path, expand_path
from ptq_bench.protocol import apply_protocol, chosen_options
from ptq_bench.results.environment import environment, peak_memory, start_memory_tracking
from ptq_bench.results.report import method_label as table_label
from ptq_bench.results.store import SCHEMA_VERSION, RecordStore, run_key
from ptq_bench.tracking import check_logger, log_to_wandb

log = logging.getLogger("ptq_bench")

#: numpy's legacy seeding (``np.random.seed``) takes seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1
#: The keys of the ``bits`` group: any other (``+bits.label=W8A8``) would be taken and ignored.
BITS_KEYS = ("w", "a", "layers")


@dataclass(frozen=True)
class RunSettings:
    """The run-wide settings every task shares, read and checked from the config before any work."""

    bits: BitWidth
    seed: int
    device: torch.device
    calib_size: int
    progress: bool
    force: bool
    eval_compile: bool


def resolve_device(name: str, gpu_slot: Optional[int] = None) -> torch.device:
    """``auto``: cuda when available, else cpu; with ``gpu_slot`` (a job of a parallel sweep on one machine) and
    several GPUs, GPU ``gpu_slot`` mod their number, so that parallel jobs do not share one. A named device must
    exist."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        return torch.device("cuda", gpu_slot % count) if gpu_slot is not None and count > 1 else torch.device("cuda")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: unknown device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available")
    return device


def read_settings(cfg: DictConfig, method_uses_calibration: bool, gpu_slot: Optional[int] = None) -> RunSettings:
    """The run-wide settings, each checked by type and range (one line naming the key otherwise); ``gpu_slot`` as
    :func:`resolve_device` takes it."""
    unknown = sorted(str(key) for key in cfg.bits if key not in BITS_KEYS)
    if unknown:
        raise ConfigError(f"bits has no key(s) {', '.join(unknown)} (keys: {', '.join(BITS_KEYS)}; e.g. bits=w8a8 or bits.w=8 bits.a=8)")
    bits = BitWidth(_bits(cfg.bits.w, "bits.w"), _bits(cfg.bits.a, "bits.a"), layer_bits(cfg.bits.get("layers")))
    calib = cfg.method.get("calib_size", 0)
    return RunSettings(
        bits=bits,
        seed=integer(cfg.seed, "seed", 0, MAX_SEED),
        device=resolve_device(str(cfg.device), gpu_slot),
        calib_size=integer(calib, "method.calib_size", 1) if method_uses_calibration else 0,
        progress=boolean(cfg.task.progress, "task.progress"),
        force=boolean(cfg.force, "force"),
        eval_compile=boolean(cfg.eval_compile, "eval_compile"),
    )


def _bits(value: Any, key: str) -> int:
    """A bit-width: an int, or a string spelling one ("4"); never a float such as 2.5 (int() would truncate it)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return integer(value, key)


def check_checkpoint_path(model_cfg: DictConfig) -> None:
    """``model.checkpoint=''`` is a mistake, not "no checkpoint" (that is null): it would run on random weights."""
    checkpoint = model_cfg.get("checkpoint")
    if isinstance(checkpoint, str) and not checkpoint.strip():
        raise ConfigError(f"model.checkpoint={checkpoint!r}: an empty path; give a checkpoint file "
                          "(model.checkpoint=null runs without one)")


def detection_models() -> list[str]:
    """The model configs of conf/model/ that build a detector (they name an ``mmdet_config``)."""
    names = []
    for path in sorted(conf_path("model").glob("*.yaml")):
        model = OmegaConf.load(path).get("model")
        if model is not None and "mmdet_config" in model:
            names.append(path.stem)
    return names


def check_model_task(cfg: DictConfig, task: str) -> None:
    """A detector (a model config with ``mmdet_config``) runs only under task=coco, and task=coco only runs a
    detector: checked from the config alone, before the task is built (task=coco imports mmdet)."""
    name = cfg.model.get("name")
    detector = "mmdet_config" in cfg.model
    if task == "coco" and not detector:
        raise ConfigError(f"model={name} is a classification model, task=coco needs a detection model "
                          f"({', '.join(detection_models())})")
    if task != "coco" and detector:
        raise ConfigError(f"model={name} is a detector (model.mmdet_config), it needs task=coco (task={task} given)")


def check_method_folders(method_cfg: DictConfig) -> None:
    """Every method option naming a folder (``*_dir``, e.g. AIQViT's ``state_dir``) that is set must be a writable
    folder before any work, not after calibration."""
    for key, value in method_cfg.items():
        if str(key).endswith("_dir") and value is not None:
            writable_directory(value, f"method.{key}")


def results_store(path: Any) -> tuple[RecordStore, Optional[ConfigError]]:
    """The record store of ``results_dir``, created and proven writable; a folder that exists but cannot be written
    (a read-only archive) is returned with the error to raise when a run would have to write there, so a sweep
    whose runs all have records still reads them (and prints its table)."""
    try:
        return RecordStore(writable_directory(path, "results_dir")), None
    except ConfigError as error:
        if isinstance(path, str) and path.strip() and expand_path(path).is_dir():
            return RecordStore(expand_path(path)), error
        raise


def seed_everything(seed: int) -> None:
    """One seed for every RNG a run touches (calibration draws take their own seeded generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_label(cfg: DictConfig, method: Method) -> str:
    """``model/method[/W4A4]``: FP has no bit-width."""
    label = f"{cfg.model.name}/{cfg.method.name}"
    return f"{label}/{method.bits.label}" if method.uses_bits else label


def identity(task: Any, cfg: DictConfig, method: Method, settings: RunSettings, weights_sha256: str) -> dict[str, Any]:
    """What determines the result; its hash is the run key (batch size, workers, devices, logging excluded)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("checkpoint", None)
    model.pop("display", None)
    compiled = {"eval_compile": True} if settings.eval_compile else {}  # off: the keys of earlier runs
    deploy = {"deploy": cfg.deploy} if cfg.get("deploy") is not None else {}  # off: the keys of earlier runs
    return {
        "task": task.name,
        **task.identity(),
        "model": model,
        "weights_sha256": weights_sha256,
        "method": {"name": method.name, "calib_size": settings.calib_size, **method.identity()},
        "bits": [settings.bits.w, settings.bits.a] if method.uses_bits else None,
        **({"bits_layers": settings.bits.layers_record()} if method.uses_bits and settings.bits.layers else {}),
        "seed": settings.seed,
        "code_version": __version__,
        **compiled,
        **deploy,
    }


def build_record(
    cfg: DictConfig,
    overrides: list[str],
    output_dir: Path,
    key: str,
    task: Any,
    method: Method,
    settings: RunSettings,
    protocol: dict[str, Any],
    measured: dict[str, Any],
) -> dict[str, Any]:
    """The run's record: what ran (config, identity, protocol, the options it chose over the paper's and its table
    label, computed here once so the report reads them) and the ``measured`` sections (model, calibration,
    quantized, metrics, timings, memory)."""
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    bits = settings.bits
    keyed = {"calib_size", *method.identity()}  # an option outside the run key (a switched-off stage's) is no change
    changes = {k: v for k, v in chosen_options(method_cfg, protocol).items() if k in keyed}  # type: ignore[arg-type]
    protocol = {**protocol, "budget_changes": {k: v for k, v in protocol["budget_changes"].items() if k in keyed}}
    record = {
        "schema": SCHEMA_VERSION,
        "run_key": key,
        "task": task.name,
        "primary_metric": task.primary_metric,
        "model": measured["model"],
        "method": method_cfg,
        "option_changes": changes,
        "method_overrides": sorted(o for o in overrides if o.lstrip("+~").startswith("method.")),
        "protocol": protocol,  # budget, what it capped, method_options given for this method
        "bits": ({"w": bits.w, "a": bits.a, "label": bits.label} | ({"layers": bits.layers_record()} if bits.layers else {})
                 if method.uses_bits else None),
        "seed": settings.seed,
        **{part: measured[part] for part in ("calibration", "quantized", "metrics", "timings")},
        "transforms": method.transforms,  # FP-preserving transforms: what they folded, the difference measured
        "device": str(settings.device),
        "eval_compile": settings.eval_compile,
        "memory": measured["memory"],
        **({"deploy": measured["deploy"]} if "deploy" in measured else {}),  # deploy=<backend>: the integer model
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "env": environment(REPO, str(settings.device)),
        "output_dir": str(output_dir),
    }
    record["method_label"] = table_label(record)
    return record


def prepare(cfg: DictConfig, gpu_slot: Optional[int] = None) -> tuple[Any, Method, RunSettings]:
    """The task, method and run settings of a protocol-applied config, each checked before any work."""
    from tasks import TASKS

    task_cls = TASKS.get(str(cfg.task.name))
    check_model_task(cfg, task_cls.name)
    settings = read_settings(cfg, METHODS.get(str(cfg.method.name)).uses_calibration, gpu_slot)
    if settings.eval_compile and not task_cls.compilable:
        raise ConfigError(f"eval_compile=true: task {task_cls.name} does not call its model as model(batch); leave eval_compile off")
    method = build_method(cfg.method, settings.bits, seed=settings.seed, progress=settings.progress)
    check_method_folders(cfg.method)
    task = task_cls(cfg, settings.progress)
    task.validate()
    return task, method, settings


def calibrate(task: Any, method: Method, settings: RunSettings, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``model`` with the task's calibration images (a method without calibration: as is), proven
    calibrated (every quantizer observed data); returns the model in eval mode and the record's calibration part."""
    calibration: dict[str, Any] = {"num_images": 0}
    if method.uses_calibration:
        data = task.calibration(method.calibration_size(settings.calib_size), settings.seed, settings.device)
        start = time.perf_counter()
        model = method.quantize(model, data)
        calibration = {**data.identity, "seconds": time.perf_counter() - start}
        check_calibrated(model, task.uncovered_hint())
    return model.eval(), calibration


def run(cfg: DictConfig, overrides: list[str], output_dir: Path, gpu_slot: Optional[int] = None) -> dict[str, Any]:
    """Quantize and evaluate one run; returns its record (the stored one when the run already has a record; on a
    rank other than 0 of a distributed run, the record unwritten). ``gpu_slot``: this job's number in a sweep whose
    jobs run in parallel on one machine (:func:`resolve_device`)."""
    boolean(cfg.get("dry_run", False), "dry_run")
    check_checkpoint_path(cfg.model)
    cfg, protocol = apply_protocol(cfg)  # per-method options, budget caps, checkpoint folder, paper-table cells
    if protocol.skip:  # a job of an experiment's sweep that is not a cell of its table, or a dry run
        log.info("%s", protocol.skip)
        return {"run_key": "", "skipped": protocol.skip}
    task, method, settings = prepare(cfg, gpu_slot)
    backend = check_deploy(cfg.get("deploy"), settings.device, task.compilable)
    label = run_label(cfg, method)
    store, unwritable = results_store(cfg.results_dir)
    check_logger(cfg.logger)  # kind and mode; an online mode's server reached

    seed_everything(settings.seed)
    model, info = task.build_model()
    method.check(model)
    task.check_data(method.calibration_size(settings.calib_size))
    key = run_key(identity(task, cfg, method, settings, info.weights_sha256))
    stored = None if settings.force else store.load_valid(key)  # a damaged record is set aside and the run redone
    if stored is not None:
        log.info("run %s already has a record (%s): skipped; pass force=true to redo it", key, store.path(key))
        return stored
    if unwritable is not None:  # a read-only archive: its records are read, a run that needs one is refused
        raise ConfigError(f"{unwritable}, and run {key} has no record there to read")

    start = time.perf_counter()
    rss_baseline = start_memory_tracking(settings.device)
    model.to(settings.device)
    fp_model = copy.deepcopy(model) if cfg.task.get("compare_fp") and method.uses_calibration else None
    model, calibration = calibrate(task, method, settings, model)
    eval_start = time.perf_counter()
    with evaluating(model, settings.eval_compile) as (evaluated, calls):
        # deploy=<backend>: the fake-quant outputs are kept, the integer model's reference (one evaluation, not two)
        reference = Recorder(evaluated) if backend is not None else None
        metrics = task.evaluate(reference or evaluated, settings.device, label, fp_model)
    eval_seconds = time.perf_counter() - eval_start
    check_ran(calls)

    measured = {
        "model": task.describe_model(model, info),
        "calibration": calibration,
        "quantized": quantized_modules(model),
        "metrics": metrics,
        "timings": {"calibration_s": calibration.get("seconds", 0.0), "eval_s": eval_seconds, "total_s": time.perf_counter() - start},
        "memory": peak_memory(settings.device, rss_baseline),
    }
    if backend is not None:
        from ptq_bench.deploy.evaluate import deploy_section

        measured["deploy"] = deploy_section(task, model, reference, metrics, settings.device, label, backend)
    record = build_record(cfg, overrides, output_dir, key, task, method, settings, protocol.as_record(), measured)
    if not is_main_process():  # torchrun: every rank evaluated its share; rank 0 writes and logs the one record
        return record
    path = store.write(record)
    log.info("%s: %s %.4g (record %s)", label, task.primary_metric, metrics[task.primary_metric], path)
    log_to_wandb(cfg.logger, record, label, output_dir)
    return record
