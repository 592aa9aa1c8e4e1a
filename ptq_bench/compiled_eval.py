"""Compiled evaluation (``eval_compile: true``): the quantized model runs through ``torch.compile`` (inductor).

Inductor fuses each fake quantizer's div/round/clamp/mul chain into the kernels around it (and on a GPU removes
the launches of hundreds of tiny kernels). The model is captured as one graph per input shape
(``fullgraph=True``: nothing falls back to eager Python), and quantizers trace their literal expressions there
(``torch.compiler.is_compiling()`` branches in :mod:`ptq_bench.quant`). Results may differ from eager ones by
rounding (fused LayerNorm/Softmax reductions move values by ulps and can flip a quantization boundary), so the
setting enters the run key when on, and oracle comparisons run eagerly.

Coverage is proven on what ran: the backend reads each captured graph's ``nn_module_stack`` (the modules whose
operations the graph contains) and every call of that compiled graph counts a call of each enabled quantizer in it,
so :func:`ptq_bench.models.coverage.check_ran` fails for a quantizer the compiled graph left out, as it does for a
layer eager evaluation never called.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn

from ptq_bench.models.coverage import QUANT_LAYERS, tracking_calls
from ptq_bench.quant.base import Quantizer

#: Prefix dynamo gives the compiled module's own path in ``nn_module_stack`` (``L['self'].blocks.0.attn``).
_ROOT = re.compile(r"^L\['self'\]\.?")


def enabled_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every enabled quantizer of a quantized layer, by module name (``blocks.0.attn.qkv.input_quantizer``)."""
    return {
        f"{name}.{slot}": q
        for name, layer in model.named_modules()
        if isinstance(layer, QUANT_LAYERS)
        for slot, q in layer.named_children()
        if isinstance(q, Quantizer) and q.enabled
    }


def graph_modules(gm: fx.GraphModule, model: nn.Module) -> set[str]:
    """Names (in ``model``) of the modules whose forward contributed an operation to the captured graph."""
    names = {str(id(module)): name for name, module in model.named_modules()}
    found = set()
    for node in gm.graph.nodes:
        for key, (path, _type) in (node.meta.get("nn_module_stack") or {}).items():
            found.add(names.get(key) or _ROOT.sub("", str(path)))
    return found


def counting_backend(model: nn.Module, counts: dict[str, int]) -> Callable[[fx.GraphModule, list[Any]], Callable]:
    """An inductor backend whose compiled graphs add one to ``counts[name]`` per call for each quantizer they contain."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        present = [name for name in graph_modules(gm, model) if name in counts]
        compiled = compile_fx(gm, example_inputs)

        def run(*args: Any) -> Any:
            for name in present:
                counts[name] += 1
            return compiled(*args)

        return run

    return backend


@contextmanager
def evaluating(model: nn.Module, compile: bool) -> Iterator[tuple[nn.Module, dict[str, int]]]:
    """The module to evaluate and the call counts :func:`check_ran` checks afterwards: ``model`` itself with
    its quantized layers' forward calls counted, or (``compile``) ``model`` compiled with its quantizers' calls
    counted in the compiled graphs."""
    if not compile:
        with tracking_calls(model) as calls:
            yield model, calls
        return
    counts = dict.fromkeys(enabled_quantizers(model), 0)
    try:
        yield torch.compile(model, backend=counting_backend(model, counts), fullgraph=True, dynamic=False), counts
    finally:
        # the compiled code and its guards hold this model: a sweep in one process would keep every run's model
        # and, after 8 models, reach dynamo's recompile limit
        torch._dynamo.reset()
