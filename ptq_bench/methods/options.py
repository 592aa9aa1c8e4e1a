"""Method options: one frozen dataclass per method, values from its YAML only (``conf/method/<name>.yaml``).

An options class has no defaults, so code and config cannot drift: :func:`parse_options` builds it from the
method's config, refusing unknown and missing keys and values of the wrong type (``2.7`` for an int, ``"maybe"``
for a bool) in one line naming the key. A field with ``metadata={"runtime": True}`` (see :func:`runtime`) changes
how a run goes, never its result (memory budgets, resume folders): it is left out of run keys and table labels. A
boolean switch added after records existed, off by default, is declared with :func:`keyed_when_on`: it enters the
identity only when on, so the keys of earlier runs (made with it off) stay valid; the options of the stage it switches
on are declared with :func:`keyed_with` and enter the identity only with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence, TypeVar, get_type_hints

from omegaconf import OmegaConf

from ptq_bench.errors import ConfigError
from ptq_bench.paths import conf_path
from ptq_bench.typed import coerce

#: Where the method YAMLs live (the defaults of every option).
METHOD_CONFIGS = conf_path("method")
#: Keys of a method config that are not options of the method itself.
HARNESS_KEYS = ("name", "calib_size")

T = TypeVar("T")


def runtime() -> Any:
    """A dataclass field that does not change a run's result (no default: its value comes from the YAML)."""
    return dataclasses.field(metadata={"runtime": True})


def runtime_fields(options_cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(options_cls) if f.metadata.get("runtime"))


def keyed_when_on() -> Any:
    """A boolean field that changes results but enters the identity only when true (no default: the YAML's)."""
    return dataclasses.field(metadata={"keyed_when_on": True})


def keyed_with(switch: str) -> Any:
    """A field of the stage the :func:`keyed_when_on` field ``switch`` turns on: in the identity only while it is on."""
    return dataclasses.field(metadata={"keyed_with": switch})


def identity_options(options: Any) -> dict[str, Any]:
    """The options that determine a result: runtime fields left out, :func:`keyed_when_on` fields while off, and
    :func:`keyed_with` fields while their switch is off."""
    return {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(options)
        if not f.metadata.get("runtime") and not (f.metadata.get("keyed_when_on") and getattr(options, f.name) is False)
        and not ("keyed_with" in f.metadata and getattr(options, f.metadata["keyed_with"]) is False)
    }


def method_defaults(name: str) -> dict[str, Any]:
    """The method's YAML as a plain dict (every option's default)."""
    path = METHOD_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no config for method '{name}' ({path})")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def unknown_options(method: str, unknown: Sequence[str], options: Iterable[str]) -> str:
    """The one-line refusal of ``unknown`` keys: the method's ``options`` and the harness's ``calib_size`` listed."""
    known = [*(k for k in options if k not in HARNESS_KEYS), *(k for k in HARNESS_KEYS if k != "name")]
    return f"method '{method}' has no option(s) {', '.join(unknown)} (options: {', '.join(known)})"


def parse_options(options_cls: type[T], values: Mapping[str, Any], method: str) -> T:
    """``options_cls`` built from ``values``; one-line :class:`ConfigError` for unknown, missing or mistyped keys."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(unknown_options(method, unknown, fields))
    missing = sorted(set(fields) - set(values))
    if missing:
        raise ConfigError(f"method '{method}' is missing option(s) {', '.join(missing)} (set them in conf/method/{method}.yaml)")
    hints = get_type_hints(options_cls)
    parsed = {name: coerce(values[name], hints[name], f"method.{name}") for name in fields}
    return options_cls(**parsed)
