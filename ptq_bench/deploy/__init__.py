"""Real integer execution of a method's quantized model (``deploy=<backend>``; docs/deploy.md)."""

from __future__ import annotations

from typing import Any

import torch

from ptq_bench.errors import ConfigError

#: Backends ``deploy`` takes.
BACKENDS = ("x86_int8",)


def check_deploy(value: Any, device: torch.device, compilable: bool) -> str | None:
    """The backend named by ``deploy`` (None: off), refused in one line before any work when unknown, when the
    task does not call its model as ``model(batch)`` or when this machine cannot run it."""
    if value is None:
        return None
    if value not in BACKENDS:
        raise ConfigError(f"deploy={value!r}: unknown backend (backends: {', '.join(BACKENDS)}; null: off)")
    if not compilable:
        raise ConfigError(f"deploy={value}: the task does not call its model as model(batch), which the integer model needs")
    from ptq_bench.deploy import x86

    x86.check_available(device)
    return str(value)
