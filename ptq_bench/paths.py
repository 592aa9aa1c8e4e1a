"""Where the repository's files live (``conf/``, ``results/``) and the OmegaConf resolvers its configs use.

Importing :mod:`ptq_bench` registers the resolvers, so every way a config is loaded (Hydra in ``run.py``, a method
YAML read for its defaults, a test composing a config) resolves them alike:

* ``${repo_root:}``: the repository root (``results_dir``'s default);
* ``${quantizer_default:<quantizer>,<option>}``: a registered quantizer's option default, from its ``Options``
  dataclass (the one place quantizer defaults live), for method YAMLs that show it as an option of their own.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ptq_bench.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def conf_path(*parts: str) -> Path:
    """``<repo>/conf/<parts...>``."""
    return REPO.joinpath("conf", *parts)


def expand_path(path: str | Path) -> Path:
    """``path`` with ``~`` and ``$VAR``/``${VAR}`` expanded (data roots, checkpoints, output folders)."""
    return Path(os.path.expandvars(str(path))).expanduser()


def quantizer_default(quantizer: str, option: str) -> Any:
    """The default of ``option`` of the registered quantizer ``quantizer`` (tuples as lists, for YAML)."""
    from ptq_bench.quant import QUANTIZERS

    fields = {f.name: f for f in dataclasses.fields(QUANTIZERS.get(quantizer).Options)}
    if option not in fields:
        raise ConfigError(f"quantizer_default: quantizer '{quantizer}' has no option '{option}' (options: {', '.join(fields)})")
    f = fields[option]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return list(value) if isinstance(value, tuple) else value


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO), replace=True)
    OmegaConf.register_new_resolver("quantizer_default", quantizer_default, replace=True)
