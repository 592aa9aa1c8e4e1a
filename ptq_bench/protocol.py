"""A run's protocol: the method YAML (the paper's values) with per-method options and the budget applied.

The harness calls :func:`apply_protocol` first thing, so everything after it (settings, run key, record) sees the
effective method config:

1. ``method_options.<method>.<key>``: options for one method only. A sweep over several methods carries options
   that only some of them have (``-m method=repq_vit,aiqvit +method_options.aiqvit.rank=20``); an experiment file
   sets them the same way. Entries for methods other than the run's are ignored; unknown method names are refused.
2. ``budget`` (``conf/budget/``): ``paper`` changes nothing; ``smoke`` caps calibration images and iterations
   (``budget.caps``: option name → largest value) so that every method ends in seconds on a CPU.
3. ``model.checkpoint_dir``: the weights of a model sweep, found by model name in one folder.
4. ``paper_table`` (set by ``+experiment=<table>``): jobs of the sweep's product that are not a cell of that
   table are skipped without any work; ``dry_run=true`` skips every job after printing what it would run.

The record keeps :meth:`Protocol.as_record` (budget, options the budget changed, options given per method); the
report labels rows from it, so two protocols never share a table cell unmarked.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf, open_dict

from ptq_bench.bits import bits_label
from ptq_bench.errors import ConfigError
from ptq_bench.methods import METHODS
from ptq_bench.methods.options import method_defaults, runtime_fields
from ptq_bench.models.build import CHECKPOINT_SUFFIXES
from ptq_bench.paths import expand_path
from ptq_bench.results.paper import load_spec

log = logging.getLogger("ptq_bench")

#: File name endings a checkpoint in ``model.checkpoint_dir`` may have, in order of preference.


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What :func:`apply_protocol` did to a run's config."""

    budget: str
    caps: dict[str, int]
    budget_changes: dict[str, list[Any]]  # option -> [value before the budget, value after]
    method_options: dict[str, Any]  # options given under method_options.<method>
    skip: str | None = None  # why this job of a sweep does no work (not a cell of the table, dry run)

    def as_record(self) -> dict[str, Any]:
        return {"budget": self.budget, "caps": self.caps, "budget_changes": self.budget_changes,
                "method_options": self.method_options}


def apply_protocol(cfg: DictConfig) -> tuple[DictConfig, Protocol]:
    """A copy of ``cfg`` with per-method options, budget caps and the checkpoint folder applied, and the protocol."""
    cfg = copy.deepcopy(cfg)
    name = str(cfg.method.name)
    METHODS.get(name)  # one-line error for an unknown method before anything else
    options = method_options(cfg, METHODS)
    with open_dict(cfg):
        for key, value in options.items():
            cfg.method[key] = value
    budget_name, caps = budget(cfg)
    changes: dict[str, list[Any]] = {}
    with open_dict(cfg):
        for key, cap in caps.items():
            value = cfg.method.get(key)
            if _is_int(value) and value > cap:
                changes[key] = [value, cap]
                cfg.method[key] = cap
        try:
            _resolve_checkpoint(cfg)
            checkpoint = None
        except ConfigError as error:
            if not cfg.get("dry_run"):
                raise
            checkpoint = str(error)
    protocol = Protocol(budget_name, caps, changes, options, _skip_reason(cfg, changes, checkpoint))
    return cfg, protocol


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def method_options(cfg: DictConfig, methods: Any) -> dict[str, Any]:
    """``method_options.<run's method>`` as a dict; ConfigError for entries naming no method."""
    table = cfg.get("method_options")
    if table is None:
        return {}
    if not OmegaConf.is_dict(table):
        raise ConfigError(f"method_options={table!r}: must map method names to options, e.g. +method_options.aiqvit.rank=20")
    for method in table:
        if str(method) not in methods:
            raise ConfigError(f"method_options.{method}: no method '{method}' (methods: {', '.join(methods.names())})")
        if not OmegaConf.is_dict(table[method]):
            raise ConfigError(f"method_options.{method}={table[method]!r}: must map option names to values")
    chosen = table.get(str(cfg.method.name))
    return dict(OmegaConf.to_container(chosen, resolve=True)) if chosen is not None else {}  # type: ignore[arg-type]


def budget(cfg: DictConfig) -> tuple[str, dict[str, int]]:
    """The budget's name and caps (``paper`` with no caps when the config has no budget group)."""
    node = cfg.get("budget")
    if node is None:
        return "paper", {}
    raw = node.get("caps")
    caps = {} if raw is None else OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
    if not isinstance(caps, dict):
        raise ConfigError(f"budget.caps={caps!r}: must map option names to integers")
    for key, cap in caps.items():
        if not _is_int(cap) or cap < 1:
            raise ConfigError(f"budget.caps.{key}={cap!r}: must be an integer >= 1")
    return str(node.get("name", "paper")), dict(caps)


def _resolve_checkpoint(cfg: DictConfig) -> None:
    """``model.checkpoint_dir``: set ``model.checkpoint`` (when unset) to ``<dir>/<name>.<suffix>``; the key is
    removed, so the run key and record of a run are those of the same run given ``model.checkpoint``."""
    folder = cfg.model.get("checkpoint_dir")
    if "checkpoint_dir" in cfg.model:
        del cfg.model["checkpoint_dir"]
    if folder is None or cfg.model.get("checkpoint") or cfg.model.get("weights") == "builder":
        return
    root = expand_path(str(folder))
    if not root.is_dir():
        raise ConfigError(f"model.checkpoint_dir={folder}: no such folder")
    names = [str(cfg.model.name)]
    builder = cfg.model.get("builder") or {}
    if builder.get("model_name"):
        names.append(str(builder.model_name))
    for stem in names:
        for suffix in CHECKPOINT_SUFFIXES:
            if (root / f"{stem}{suffix}").is_file():
                cfg.model.checkpoint = str(root / f"{stem}{suffix}")
                return
    raise ConfigError(f"model.checkpoint_dir={folder}: no checkpoint for {cfg.model.name} "
                      f"(looked for {' or '.join(names)} with {', '.join(CHECKPOINT_SUFFIXES)})")


def _skip_reason(cfg: DictConfig, changes: Mapping[str, list[Any]], checkpoint: str | None) -> str | None:
    """Why this job does no work: ``dry_run`` (what it would run, with what protocol and weights), or (under
    ``paper_table``) not a cell of that table."""
    table = cfg.get("paper_table")
    bits = bits_label(cfg.bits.w, cfg.bits.a)
    job = f"{cfg.model.name}/{cfg.method.name}" + (f"/{bits}" if METHODS.get(str(cfg.method.name)).uses_bits else "")
    if table:
        spec = load_spec(str(table))
        if not spec.has_cell(str(cfg.model.name), str(cfg.method.name), bits):
            return f"{job}: not a cell of {spec.name}: skipped"
    if cfg.get("dry_run"):
        method = OmegaConf.to_container(cfg.method, resolve=True)
        chosen = option_changes(str(cfg.method.name), method)  # type: ignore[arg-type]
        details = [f"calib_size={method.get('calib_size', 0)}"]  # type: ignore[union-attr]
        details += [f"{k}={v}" for k, v in sorted(chosen.items()) if k != "calib_size"]
        details += [f"budget {cfg.get('budget', {}).get('name', 'paper')} capped {', '.join(sorted(changes))}"] if changes else []
        weights = checkpoint or cfg.model.get("checkpoint") or ("pretrained" if cfg.model.get("pretrained") else "no checkpoint")
        return f"dry run: would run {job} [{'; '.join(details)}] weights: {weights}"
    return None


def option_changes(name: str, method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{key: value}`` of ``method_cfg`` that differ from ``conf/method/<name>.yaml`` (``calib_size`` included;
    runtime options, ``name`` and keys the YAML no longer has, e.g. in old records, left out). An unknown method
    gives {}."""
    if name not in METHODS:
        return {}
    try:
        defaults = method_defaults(name)
    except ConfigError:
        return {}
    skip = runtime_fields(METHODS.get(name).Options) | {"name"}
    return {k: v for k, v in method_cfg.items() if k in defaults and k not in skip and not same_value(defaults[k], v)}


def chosen_options(method_cfg: Mapping[str, Any], protocol: Mapping[str, Any]) -> dict[str, Any]:
    """The options a run chose over its method's YAML (the paper's values), :func:`option_changes` less those only
    the budget changed (``protocol``: :meth:`Protocol.as_record`): what the record's label names."""
    name = str(method_cfg["name"])
    changes = option_changes(name, method_cfg)
    defaults = method_defaults(name) if changes else {}
    for key, (before, _after) in (protocol.get("budget_changes") or {}).items():
        if key in changes and same_value(before, defaults.get(key)):
            del changes[key]
    return changes


def same_value(a: Any, b: Any) -> bool:
    """Equal as option values: lists and tuples alike, 1.0 and 1 alike."""
    return _normal(a) == _normal(b)


def _normal(value: Any) -> Any:
    """Lists and tuples compare equal; ints and equal floats too (YAML 1.0e-3 vs 0.001)."""
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
