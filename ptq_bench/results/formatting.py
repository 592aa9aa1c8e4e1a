"""How values appear in labels and table cells (shared by the report and the paper tables)."""

from __future__ import annotations

import math
from typing import Any, Mapping


def text(value: Any) -> str:
    """An option value as a label shows it: lists as ``[a,b]``, mappings as ``{k:v,...}`` (sorted)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{text(v)}" for k, v in sorted(value.items())) + "}"
    return str(value)


def deploy_text(section: Mapping[str, Any] | None) -> str:
    """A record's ``deploy`` section as a cell shows it: backend, int8/FP latency ratio, int8/FP megabytes and
    top-1 agreement with the fake-quant model (docs/deploy.md); "" without one."""
    if not section:
        return ""
    size = section["bytes"]
    return (f"{section['backend']} {section['latency']['ratio']:.2f}x FP, {size['int8'] / 1e6:.1f}/{size['fp'] / 1e6:.1f} MB, "
            f"{section['agreement']['top1_agreement']:.1f}% agr.")


def format_value(mean: float, std: float | None, n: int, digits: int = 2) -> str:
    """``mean`` alone for one run, ``mean ± std (n=k)`` for several seeds."""
    if n <= 1 or std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"
