"""Compiled block reconstruction (the methods' ``compile`` option, ptq_bench/transforms/compiled_loss.py): the
functional STE forms equal the eager ones; the compiled training step gives eager's gradients and follows the eager
loop (same batches, losses and learned step sizes up to rounding) in one graph shared by the blocks of a model; a
graph break or too many graphs is an error, never an eager fallback; the option enters the run key only when on.

The inductor cases (DopQ-ViT on the shipped MNIST ViT) compile a real graph, about 20-40 s on a 2-core CPU: marked
slow. AIQViT's graphs (rank search, reconstruction) are traced with ``aot_eager`` (dynamo and AOTAutograd, the
captured graphs run unfused), which checks the capture in seconds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import ptq_bench.methods.aiqvit as aiqvit_module
import ptq_bench.methods.dopq_vit as dopq_module
import ptq_bench.transforms.compiled_loss as compiled_loss
import ptq_bench.transforms.reconstruction as reconstruction
from ptq_bench.calibration import image_calibration
from ptq_bench.errors import ConfigError
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.methods.options import method_defaults
from ptq_bench.results.store import run_key
from ptq_bench.quant.ste import _TangentSTE, _TangentSTEGraph, _UniformSTE, _UniformSTEGraph
from ptq_bench.transforms.block_capture import BlockInputs
from ptq_bench.transforms.block_losses import batch_losses
from ptq_bench.transforms.compiled_loss import CompiledLoss
from ptq_bench.transforms.reconstruction import ReconStep, reconstruct_block
from test_cuda import mnist_images, mnist_model
from test_fast_ste import CASES, copies, grads, values_on_and_beyond_the_grid

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]
DOPQ = {"iters": 20, "batch_size": 16, "init_calib_size": 32}
AIQVIT = {"search_iters": 12, "iters": 12, "batch_size": 16, "candidate_ranks": [4, 8], "init_size": 32, "curriculum_rerank_every": 5}


# ------------------------------------------------------------------------ the functional forms


@pytest.mark.parametrize("shape, scale_shape, z_value, need", CASES)
def test_uniform_graph_form_equals_the_eager_function(shape, scale_shape, z_value, need) -> None:
    g = torch.Generator().manual_seed(len(shape) + len(scale_shape))
    s = torch.rand(scale_shape, generator=g) * 0.2 + 0.05
    z = torch.full(scale_shape, z_value)
    x = values_on_and_beyond_the_grid(shape, s, z, 15, seed=1)
    eager_out, eager = grads(lambda a, b: _UniformSTE.apply(a, b, z, 0, 15, None, None), *copies(x, s, grad=need))
    graph_out, graph = grads(lambda a, b: _UniformSTEGraph.apply(a, b, z, 0, 15), *copies(x, s, grad=need))
    assert torch.equal(graph_out, eager_out)
    for got, want in zip(graph, eager):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_uniform_graph_form_learns_the_zero_point_as_the_eager_function() -> None:
    x = values_on_and_beyond_the_grid((6, 9, 10), torch.tensor(0.07), torch.tensor(3.0), 15, seed=2)
    inputs = (x, torch.tensor(0.07), torch.tensor(3.0))
    eager_out, eager = grads(lambda a, b, c: _UniformSTE.apply(a, b, c, 0, 15, None, None), *copies(*inputs, grad=(True,) * 3))
    graph_out, graph = grads(lambda a, b, c: _UniformSTEGraph.apply(a, b, c, 0, 15), *copies(*inputs, grad=(True,) * 3))
    assert torch.equal(graph_out, eager_out)
    for got, want in zip(graph, eager):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tangent_graph_form_equals_the_eager_function() -> None:
    x = (torch.randn(4, 3, 20, 20, generator=torch.Generator().manual_seed(3)) * 3).softmax(-1)
    x = torch.cat([x, torch.tensor([-0.1, 1.2]).expand(4, 3, 20, 2)], dim=-1)  # values outside [0, 1] too
    theta0, theta1 = torch.tensor(-0.75), torch.tensor(0.75)
    eager_out, eager = grads(lambda a: _TangentSTE.apply(a, theta0, theta1, 15), *copies(x, grad=(True,)))
    graph_out, graph = grads(lambda a: _TangentSTEGraph.apply(a, theta0, theta1, 15), *copies(x, grad=(True,)))
    assert torch.equal(graph_out, eager_out)
    assert torch.allclose(graph[0], eager[0], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- the training step of a method


class _Stop(Exception):
    """Raised by a patched reconstruct_block to end the method's pipeline."""


def _trained(steps: list[ReconStep]) -> list[torch.Tensor]:
    return [p for step in steps for group in step.optimizer.param_groups for p in group["params"]]


def _step_gradients(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: list[ReconStep], loss: str,
                    compiled: CompiledLoss | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss and gradients of one training step on the first batch (nothing updated)."""
    for step in steps:
        if step.before is not None:
            step.before()
    params = _trained(steps)
    x, t = inputs[:16], targets[:16]
    if compiled is None:
        value = batch_losses(block, x, t, loss).mean()
        return value.detach(), list(torch.autograd.grad(value, params, allow_unused=True))
    with compiled.timing():
        value = compiled(block, x, t, loss)
        return value.detach(), list(torch.autograd.grad(value, params, allow_unused=True))


def _check_gradients(method: str, options: dict[str, Any], backend: str, device: str, calls: int) -> int:
    """Compare eager and compiled gradients at the first ``calls`` reconstruct_block calls of ``method`` (the eager
    loop runs in between); returns the number of graphs compiled."""
    module = dopq_module if method == "dopq_vit" else aiqvit_module
    original = module.reconstruct_block
    compiled = CompiledLoss(backend)
    seen = []

    def check(block, inputs, targets, steps, iters, batch_size, generator, loss="mse", *args, **kwargs):  # type: ignore[no-untyped-def]
        state = generator.get_state()
        eager_value, eager = _step_gradients(block, inputs, targets, steps, loss, None)
        generator.set_state(state)  # the same drop-path draws
        value, got = _step_gradients(block, inputs, targets, steps, loss, compiled)
        generator.set_state(state)
        assert torch.allclose(value, eager_value, rtol=1e-5), (value, eager_value)
        for g, e in zip(got, eager):
            if e is None:
                assert g is None or not g.any()
                continue
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item()), ((g - e).abs().max(), e.abs().max())
        seen.append(kwargs.get("desc"))
        if len(seen) == calls:
            raise _Stop
        return original(block, inputs, targets, steps, iters, batch_size, generator, loss, *args, **kwargs)

    model = mnist_model().to(device)
    module.reconstruct_block = check
    try:
        build_method(method, BitWidth(4, 4), calib_size=64, **options).quantize(model, image_calibration(mnist_images(0, 64).to(device)))
    except _Stop:
        pass
    finally:
        module.reconstruct_block = original
        torch._dynamo.reset()
    assert len(seen) == calls
    return compiled.graphs


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_dopq_step_gives_the_eager_gradients(device: str) -> None:
    """Inductor: every step size's gradient within 1e-4 of eager's on the first MNIST-ViT block."""
    assert _check_gradients("dopq_vit", DOPQ, "inductor", device, calls=1) == 1


def test_compiled_aiqvit_steps_give_the_eager_gradients() -> None:
    """Rank search (branches, α, drop-path) and reconstruction (branch, DFQ bounds, activation scales) of the first
    block, traced by dynamo and AOTAutograd: two graphs, eager's gradients."""
    assert _check_gradients("aiqvit", AIQVIT, "aot_eager", "cpu", calls=2) == 2


def _run(method: str, options: dict[str, Any], compile: bool, backend: str, monkeypatch: pytest.MonkeyPatch,
         device: str = "cpu") -> tuple[list[tuple[str, list[float]]], dict[str, torch.Tensor], int]:
    """The method on the MNIST ViT: per reconstruct_block call its loss history, the learned quantizer tensors of
    the first block, and the graphs compiled."""
    module = dopq_module if method == "dopq_vit" else aiqvit_module
    original = reconstruction.reconstruct_block
    histories: list[tuple[str, list[float]]] = []
    graphs = []

    def record(*args: Any, **kwargs: Any) -> list[float]:
        compiled = kwargs.get("compile")
        history = original(*args, **kwargs)
        histories.append((kwargs["desc"], history))
        if isinstance(compiled, CompiledLoss):
            graphs[:] = [compiled.graphs]
        return history

    monkeypatch.setattr(module, "reconstruct_block", record)
    monkeypatch.setattr(compiled_loss, "CompiledLoss", lambda: CompiledLoss(backend))
    model = mnist_model().to(device)
    calib = mnist_images(0, 64).to(device)
    build_method(method, BitWidth(4, 4), calib_size=64, compile=compile, **options).quantize(model, image_calibration(calib))
    learned = {name: t.detach().cpu() for name, t in model.blocks[0].state_dict().items() if name.endswith(("scale", "b1", "b2"))}
    return histories, learned, graphs[0] if graphs else 0


def _close(compiled: dict[str, torch.Tensor], eager: dict[str, torch.Tensor], rtol: float) -> None:
    assert compiled.keys() == eager.keys()
    for name in eager:
        assert torch.allclose(compiled[name], eager[name], rtol=rtol), (name, ((compiled[name] - eager[name]).abs() / eager[name].abs()).max())


@pytest.mark.slow
def test_compiled_dopq_follows_the_eager_reconstruction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor, 20 iterations per block: the first block's losses and learned step sizes are eager's up to
    rounding (measured: losses 1e-7 relative); the four blocks share one graph."""
    eager, eager_learned, _ = _run("dopq_vit", DOPQ, False, "inductor", monkeypatch)
    compiled, learned, graphs = _run("dopq_vit", DOPQ, True, "inductor", monkeypatch)
    assert graphs == 1 and len(compiled) == len(eager) == 4
    assert torch.allclose(torch.tensor(compiled[0][1]), torch.tensor(eager[0][1]), rtol=1e-4)
    _close(learned, eager_learned, rtol=1e-3)


def test_compiled_aiqvit_follows_the_eager_reconstruction(monkeypatch: pytest.MonkeyPatch) -> None:
    """aot_eager: the first block's search and reconstruction losses (curriculum re-ranking included) and its
    learned scales and DFQ bounds follow eager's."""
    eager, eager_learned, _ = _run("aiqvit", AIQVIT, False, "aot_eager", monkeypatch)
    compiled, learned, graphs = _run("aiqvit", AIQVIT, True, "aot_eager", monkeypatch)
    assert [d for d, _ in compiled] == [d for d, _ in eager] and graphs >= 2
    for (_, got), (_, want) in zip(compiled[:2], eager[:2]):  # block 0: search, reconstruction
        assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-4)
    _close(learned, eager_learned, rtol=1e-3)


# ------------------------------------------------------------------------- errors, identity


def _tiny_step(block: nn.Module) -> ReconStep:
    return ReconStep(torch.optim.Adam(block.parameters(), lr=1e-3), torch.arange(6))


def test_graphs_beyond_the_limit_are_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new batch size is a new static graph; past RECOMPILE_LIMIT the run stops instead of falling back to eager."""
    monkeypatch.setattr(compiled_loss, "RECOMPILE_LIMIT", 1)
    block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    inputs, targets = torch.randn(6, 5, 8), torch.randn(6, 5, 8)
    compiled = CompiledLoss("aot_eager")
    try:
        reconstruct_block(block, inputs, targets, [_tiny_step(block)], 2, 4, torch.Generator().manual_seed(0), compile=compiled)
        assert compiled.graphs == 1
        with pytest.raises(Exception, match="recompile_limit|RecompileLimit|cache_size_limit"):
            reconstruct_block(block, inputs, targets, [_tiny_step(block)], 1, 6, torch.Generator().manual_seed(0), compile=compiled)
    finally:
        torch._dynamo.reset()


def test_graph_breaks_are_an_error() -> None:
    class Breaking(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._dynamo.graph_break()  # what untraceable code (e.g. data-dependent Python) causes
            return x * 2

    block = nn.Sequential(nn.Linear(8, 8), Breaking())
    try:
        with pytest.raises(Exception, match="graph_break"):
            reconstruct_block(block, torch.randn(6, 5, 8), torch.randn(6, 5, 8), [_tiny_step(block)], 1, 4,
                              torch.Generator().manual_seed(0), compile=CompiledLoss("aot_eager"))
    finally:
        torch._dynamo.reset()


def test_blocks_with_extra_arguments_are_refused() -> None:
    block = nn.Linear(8, 8)
    inputs = BlockInputs([torch.randn(1, 5, 8)] * 4, [((5, 1),)] * 4)
    with pytest.raises(ConfigError, match="compile: false"):
        reconstruct_block(block, inputs, inputs, [_tiny_step(block)], 1, 2, torch.Generator(), compile=True)


@pytest.mark.parametrize("method", ["dopq_vit", "aiqvit"])
def test_compile_enters_the_identity_only_when_on(method: str) -> None:
    assert method_defaults(method)["compile"] is False  # off by default (the YAML)
    eager = build_method(method, BitWidth(4, 4))
    compiled = build_method(method, BitWidth(4, 4), compile=True)
    assert "compile" not in eager.identity()  # the keys of runs recorded before the option existed stay valid
    assert compiled.identity() == {**eager.identity(), "compile": True}
    assert run_key({"method": compiled.identity()}) != run_key({"method": eager.identity()})
    if method == "aiqvit":  # saved blocks of an eager run are not resumed by a compiled one
        assert compiled.options.fingerprint(BitWidth(4, 4), 0) != eager.options.fingerprint(BitWidth(4, 4), 0)
    with pytest.raises(ConfigError, match="expected true or false"):
        build_method(method, BitWidth(4, 4), compile="yes")

