"""The ``x86_int8`` backend: the method's fake-quant model with every int8-capable site swapped for its Q/DQ form
(:mod:`ptq_bench.deploy.int8_layers`), compiled by inductor with ``freezing``; torchao's x86 inductor passes
(``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer``, imported for the passes it registers) then turn
each dq → linear/conv on a frozen int8 weight into oneDNN ``qlinear_pointwise``/``qconv_pointwise`` kernels.
Sites left float keep the method's fake quantizers, so the two models differ only by integer-kernel rounding.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ptq_bench.deploy.int8_layers import Int8Conv2d, Int8Linear
from ptq_bench.deploy.sites import Site
from ptq_bench.errors import ConfigError

#: The module whose import registers the x86 int8 lowering passes (torchao >= 0.10).
TORCHAO_PASSES = "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"


def check_available(device: torch.device) -> None:
    """One-line ConfigError, before any work, when this machine cannot run the backend."""
    if device.type != "cpu":
        raise ConfigError(f"deploy=x86_int8 runs on the CPU (oneDNN int8 kernels); the run's device is {device}: set device=cpu")
    if not torch.backends.mkldnn.is_available():
        raise ConfigError("deploy=x86_int8: this torch build has no oneDNN (torch.backends.mkldnn.is_available() is false)")
    try:
        importlib.import_module(TORCHAO_PASSES)
    except ImportError as error:
        raise ConfigError(f"deploy=x86_int8 needs torchao ({error}); install the extra: pip install -e '.[deploy]'") from None


def integer_model(model: nn.Module, sites: list[Site]) -> nn.Module:
    """A copy of the fake-quant ``model`` with each ``int8`` site replaced by its Q/DQ layer."""
    integer = copy.deepcopy(model).eval()
    for site in sites:
        if site.runs != "int8":
            continue
        parent_name, _, child = site.layer.rpartition(".")
        parent = integer.get_submodule(parent_name)
        layer = getattr(parent, child)
        if site.op == "linear":
            replacement = Int8Linear(site.input_grid, site.weight, layer.bias)
        else:
            replacement = Int8Conv2d(layer, site.input_grid, site.weight)
        setattr(parent, child, replacement.to(layer.weight.device))
    return integer


@contextmanager
def freezing() -> Iterator[None]:
    """Inductor's freezing (constant weights, which the int8 weight-prepack passes need) while compiling."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


def compiled(model: nn.Module) -> nn.Module:
    """``model`` compiled by inductor (one graph per input shape) with the int8 lowering passes registered;
    compile (the first call per shape) inside :func:`freezing`."""
    importlib.import_module(TORCHAO_PASSES)
    return torch.compile(model, fullgraph=True, dynamic=False)
