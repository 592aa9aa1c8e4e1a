"""The record's ``deploy`` section: build the integer model from the method's grids, evaluate it through the task
on the same images as the fake-quant model, and measure agreement, latency beside the compiled FP model, and bytes."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from ptq_bench.deploy import x86
from ptq_bench.deploy.measure import Recorder, agreement, latency, model_bytes
from ptq_bench.deploy.sites import plan
from ptq_bench.models.prepare import set_quantizers_enabled

#: Rounds of the side-by-side latency measurement (after two warm-up rounds).
LATENCY_REPEATS = 20
#: A call of a oneDNN int8 kernel in inductor's generated code.
INT8_KERNEL = re.compile(r"torch\.ops\.onednn\.(qlinear|qconv)\w*")


def int8_kernels(model: nn.Module, batch: torch.Tensor) -> dict[str, int]:
    """Compile ``model`` for ``batch``'s shape and count the oneDNN int8 kernel calls in the generated code."""
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad():
        _, sources = run_and_get_code(model, batch)
    found = [match.group(1) for source in sources for match in INT8_KERNEL.finditer(source)]
    return {"qlinear": found.count("qlinear"), "qconv": found.count("qconv")}


def deploy_section(task: Any, model: nn.Module, reference: Recorder, reference_metrics: dict[str, Any], device: torch.device,
                   label: str, backend: str, repeats: int = LATENCY_REPEATS) -> dict[str, Any]:
    """Evaluate the integer form of the calibrated fake-quant ``model`` on the images ``reference`` recorded the
    fake-quant outputs of (the run's own evaluation, whose metrics are ``reference_metrics``) and return the record's
    deploy section."""
    sites = plan(model)
    integer = x86.integer_model(model, sites)
    fp = copy.deepcopy(model).eval()
    set_quantizers_enabled(fp, False)
    deployed = None
    try:
        with x86.freezing():
            compiled_integer, compiled_fp = x86.compiled(integer), x86.compiled(fp)
            kernels = int8_kernels(compiled_integer, reference.first_input)
            deployed = Recorder(compiled_integer)
            metrics = task.evaluate(deployed, device, f"{label} {backend}")
            timed = latency({"int8": compiled_integer, "fp": compiled_fp}, reference.first_input, repeats)
    finally:
        torch._dynamo.reset()  # the compiled code holds both models
    int8_sites = sum(site.runs == "int8" for site in sites)
    return {
        "backend": backend,
        "sites": [site.record() for site in sites],
        "int8_sites": int8_sites,
        "float_sites": len(sites) - int8_sites,
        "int8_kernels": kernels,
        "metrics": metrics,
        "fake_quant_metrics": reference_metrics,
        "agreement": agreement(deployed.outputs, reference.outputs),
        "latency": {**timed, "batch_size": int(reference.first_input.shape[0]),
                    "ratio": timed["int8"]["median_ms"] / timed["fp"]["median_ms"], "threads": torch.get_num_threads()},
        "bytes": {"int8": model_bytes(integer), "fp": model_bytes(fp)},
    }
