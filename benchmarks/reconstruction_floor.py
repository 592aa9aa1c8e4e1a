"""The exact-arithmetic floor of the AdaLog family's block reconstruction (issue 17): official, ours and the floor.

For QDrop (GoatWu/APHQ-ViT @ 84c9fde utils/block_recon.py ``BlockReconstructor.reconstruct_single_block`` with
configs/4bit/qdrop_baseline.py's ``optim_metric = 'mse'``; APHQ-ViT's block loop is the same code), FIMA-Q
(ShiheWang/FIMA-Q @ 64c4b00 utils/block_recon.py, ``fisher_dplr``) and AdaLog's Retrain (GoatWu/AdaLog @ 75a57d2
utils/block_recon.py), W4A4, on deit_tiny's first block (``--depth 1``; tests/pins.py's seeded weights), batch 32
(``optim_batch_size``) drawn from ``--optim-size`` 32 seeded N(0, 1) images, one thread, it measures per iteration of
that block's loop (process CPU time, median over the iterations after ``--warmup``):

* official: the official ``test_quant.main`` run by oracles/adalog_family_tiny.py (``--calibrate --optimize``,
  ``--iters``; the calibration search on ``--calib-size`` images only, to set the quantizers) in the peers'
  interpreter, unpatched torch 2.14 clamp gradient (no ``--clamp-inclusive``); the clock is read at every call of
  ``LossFunction.__call__`` on the block (one per iteration), so an iteration is everything between two loss calls;
* ours: the same method through ptq_bench (``ptq_bench.compare.calibrate_and_reconstruct`` / AdaLog's ``quantize``),
  the clock read at every call of the objective ``reconstruct_block`` receives for ``blocks.0``;
* floor: the FP block (timm, same weights, the attention map explicit: q k^T, softmax, attn v) forward, the same
  loss (sum over tokens of the squared error, mean) and backward with the gradients the loops request (the four
  Linear weights, whose AdaRound variables need dL/dW, and qkv's input, whose quantizer's step size learns), and for
  QDrop and FIMA-Q the uniform draws of QDrop's nine masks (:func:`qdrop_draws`; the generator's stream is part of
  the bits), no quantizer: the matrix products and elementwise operators any implementation with these values and
  gradients performs, whatever its fake-quant costs. FIMA-Q's floor is QDrop's (its loss's low-rank term left out).

FIMA-Q's Fisher refresh (``new_fisher_ro``, k = 5 times per unit, i.e. every 4,000 of 20,000 steps) is taken out of
both clocks (its CPU time subtracted). ``--profile N`` adds torch.profiler's operator self CPU time over N more
iterations of ours (after the timed ones) and of the floor. Rounds alternate ours, official and floor per method.
``--clamp`` (diagnostics): ``inclusive`` runs the official code with the oracle's ``--clamp-inclusive`` (torch <=
2.13's clamp gradient, which tests/fixtures pin), ``exclusive`` ours with torch 2.14's (bits then differ).

    .venv/bin/python benchmarks/reconstruction_floor.py [--methods qdrop fima_q adalog] [--iters 20] [--rounds 3]
        [--profile 4] [--clamp native] [--peer-root /work/peers] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = "venv/bin/python"
#: our method -> (the oracle's --method, extra oracle flags)
OFFICIAL = {
    "qdrop": ("aphqvit", ["--cfg", "optim_metric=mse,use_mean_hessian=False"]),
    "fima_q": ("fimaq", []),
    "adalog": ("adalog", []),
}
BLOCK_DIM, TOKENS, BATCH = 192, 197, 32
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def _profile_rows(profiler: Any, iters: int) -> dict[str, Any]:
    """torch.profiler's top operators by self CPU time per iteration, their total and the matrix products' part."""
    table = profiler.key_averages()
    top = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"profile": [(e.key, e.count / iters, e.self_cpu_time_total / 1e3 / iters) for e in top],
            "profile_total_ms": sum(e.self_cpu_time_total for e in table) / 1e3 / iters,
            "profile_matmul_ms": sum(e.self_cpu_time_total for e in table if e.key in MATMULS) / 1e3 / iters}


def _median_ms(stamps: list[tuple[float, float]], warmup: int) -> dict[str, float]:
    """Median and interquartile range (ms) of the intervals between consecutive (CPU, system) time stamps, the first
    ``warmup`` left out; ``sys_ms``: the mean system (kernel) part of those intervals (rusage's is tick-grained)."""
    stamps = stamps[warmup:]
    total = [b[0] - a[0] for a, b in itertools.pairwise(stamps)]
    q = statistics.quantiles(total, n=4) if len(total) > 1 else [total[0]] * 3
    return {"ms": 1e3 * statistics.median(total), "q1": 1e3 * q[0], "q3": 1e3 * q[2], "n": len(total),
            "sys_ms": 1e3 * (stamps[-1][1] - stamps[0][1]) / len(total)}


class _Clock:
    """Process CPU time stamps (with their system part) with the time spent in excluded calls (Fisher refreshes)
    taken out."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []
        self.excluded = (0.0, 0.0)

    @staticmethod
    def now() -> tuple[float, float]:
        return time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime

    def stamp(self) -> None:
        cpu, system = self.now()
        self.stamps.append((cpu - self.excluded[0], system - self.excluded[1]))

    def excluding(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                end = self.now()
                self.excluded = (self.excluded[0] + end[0] - start[0], self.excluded[1] + end[1] - start[1])
        return wrapped


def run_official(method: str, a: argparse.Namespace) -> dict[str, Any]:
    """In the peers' interpreter: the official pipeline with the block's loss calls timed."""
    sys.path.insert(0, str(REPO / "oracles"))
    import adalog_family_tiny as driver  # oracles/adalog_family_tiny.py

    clock = _Clock()
    patches = driver.official_patches

    def timed_patches(args: Any, repo: Path) -> None:
        patches(args, repo)
        recon = sys.modules["utils.block_recon"]
        call = recon.LossFunction.__call__

        def loss_call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if type(self.block).__name__ == "Block":
                clock.stamp()
            return call(self, *args, **kwargs)

        recon.LossFunction.__call__ = loss_call
        if hasattr(recon.BlockReconstructor, "new_fisher_ro"):
            recon.BlockReconstructor.new_fisher_ro = clock.excluding(recon.BlockReconstructor.new_fisher_ro)

    driver.official_patches = timed_patches
    oracle, extra = OFFICIAL[method]
    out = Path(tempfile.mkdtemp(prefix="recon_floor_")) / f"{oracle}.npz"
    sys.argv = ["adalog_family_tiny.py", "--method", oracle, "--model", "deit_tiny", "--depth", "1",
                "--calib-size", str(a.calib_size), "--optimize", "--optim-size", str(a.optim_size),
                "--iters", str(a.iters), "--threads", "1", "--out", str(out), *extra,
                *(["--clamp-inclusive"] if a.clamp == "inclusive" else [])]
    sys.stdout = sys.stderr  # the official prints stay off our JSON
    driver.main()
    return {"method": method, "role": "official", **_median_ms(clock.stamps, a.warmup)}


def _deit(depth: int) -> Any:
    """timm's deit_tiny with tests/pins.py's seeded weights (all 12 blocks' draws), first ``depth`` blocks."""
    import timm

    sys.path.insert(0, str(REPO / "tests"))
    from pins import seeded_state_dict

    state = seeded_state_dict(timm.create_model("deit_tiny_patch16_224", pretrained=False))
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=depth)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < depth})
    return model.eval()


def run_ours(method: str, a: argparse.Namespace) -> dict[str, Any]:
    """Our pipeline with ``blocks.0``'s objective calls timed (and ``--profile`` more iterations profiled)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from ptq_bench.calibration import image_calibration
    from ptq_bench.compare import calibrate_and_reconstruct
    from ptq_bench.methods import BitWidth, build_method
    from ptq_bench.methods.fima_q import FisherUnitLoss
    from ptq_bench.transforms import unit_training

    clock, profile = _Clock(), {}
    FisherUnitLoss.refresh = clock.excluding(FisherUnitLoss.refresh)
    reconstruct_block = unit_training.reconstruct_block

    def timed_reconstruct_block(unit: Any, inputs: Any, targets: Any, steps: Any, iters: int, batch_size: int,
                                generator: Any, loss: Any, desc: str = "", **kwargs: Any) -> Any:
        if not desc.endswith("blocks.0"):
            return reconstruct_block(unit, inputs, targets, steps, iters, batch_size, generator, loss, desc, **kwargs)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

        def objective(idx: Any) -> Any:
            if len(clock.stamps) <= a.iters:
                clock.stamp()
            if len(clock.stamps) == a.iters + 1 and a.profile and not profile:
                profile["on"] = True
                profiler.start()
            return loss(idx)

        history = reconstruct_block(unit, inputs, targets, steps, iters, batch_size, generator, objective, desc, **kwargs)
        if profile:
            profiler.stop()
            profile.update(_profile_rows(profiler, a.profile))
        return history

    unit_training.reconstruct_block = timed_reconstruct_block
    if a.clamp == "exclusive":  # diagnostic: torch 2.14's clamp gradient instead of the pinned torch <= 2.13 one
        import contextlib

        from ptq_bench.methods import adalog_retrain, fima_q, qdrop

        official_gradients = unit_training.official_gradients

        @contextlib.contextmanager
        def exclusive(quantizers: list[Any]) -> Any:
            with official_gradients(quantizers):
                for q in quantizers:
                    q.inclusive_clamp = False
                yield

        for module in (adalog_retrain, fima_q, qdrop):
            module.official_gradients = exclusive  # type: ignore[attr-defined]
    gen = torch.Generator
    calib = torch.randn((a.calib_size, 3, 224, 224), generator=gen().manual_seed(1000))  # the oracle's seed + 1000
    optim = torch.randn((a.optim_size, 3, 224, 224), generator=gen().manual_seed(3000))  # and seed + 3000
    model, iters = _deit(1), a.iters + a.profile
    if method == "adalog":
        m = build_method("adalog", BitWidth(4, 4), calib_size=a.calib_size, optimize=True, optim_size=a.optim_size, iters=iters)
        m.quantize(model, image_calibration(torch.cat([calib, optim])))
    else:
        m = build_method(method, BitWidth(4, 4), iters=iters, calib_size=a.optim_size, search_size=a.calib_size)
        calibrate_and_reconstruct(m, model, calib, optim, 0)
    profile.pop("on", None)
    return {"method": method, "role": "ours", **_median_ms(clock.stamps, a.warmup), **profile}


def qdrop_draws(batch: int, heads: int = 3) -> list[tuple[int, ...]]:
    """Shapes of the uniform draws of one QDrop step on a deit_tiny block (the official ``rand_like`` masks): the
    block input's mix and every activation quantizer's input (qkv, proj, fc1, fc2; q, k^T, the attention, v)."""
    n, c, d = TOKENS, BLOCK_DIM, BLOCK_DIM // heads
    return [(batch, n, c)] * 4 + [(batch, n, 4 * c), (batch, heads, n, d), (batch, heads, d, n), (batch, heads, n, n),
                                  (batch, heads, n, d)]


def run_floor(method: str, a: argparse.Namespace) -> dict[str, Any]:
    """The FP block's forward, loss and backward with the gradients the loops request (the four Linear weights and
    qkv's input, whose quantizer's step size learns), no quantizer; with ``method`` qdrop or fima_q also the random
    draws of QDrop's masks (the CPU generator's stream, which bit-exactness fixes)."""
    import torch

    torch.set_num_threads(1)
    block = _deit(1).blocks[0]
    block.attn.fused_attn = False  # the attention map explicit (q k^T, softmax, attn v), as the quantized loops need it
    for p in block.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)]
    for w in weights:
        w.requires_grad_(True)
    block.attn.qkv.register_forward_pre_hook(lambda module, args: (args[0].detach().requires_grad_(True),))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((a.optim_size, TOKENS, BLOCK_DIM), generator=g)
    with torch.no_grad():
        target = block(x) + 0.01 * torch.randn((a.optim_size, TOKENS, BLOCK_DIM), generator=g)
    draws = qdrop_draws(BATCH) if method in ("qdrop", "fima_q") else []

    def step() -> None:
        idx = torch.randperm(a.optim_size, generator=g)[:BATCH]
        for shape in draws:
            torch.rand(shape, generator=g)
        for w in weights:
            w.grad = None
        loss = (block(x[idx]) - target[idx]).pow(2).sum(1).mean()
        loss.backward()

    clock = _Clock()
    for _ in range(a.iters + 1):
        clock.stamp()
        step()
    profile: dict[str, Any] = {}
    if a.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(a.profile):
                step()
        profile = _profile_rows(profiler, a.profile)
    return {"method": method, "role": "floor", **_median_ms(clock.stamps, a.warmup), **profile}


ROLES = {"official": run_official, "ours": run_ours, "floor": run_floor}


def _child(role: str, method: str, a: argparse.Namespace) -> dict[str, Any]:
    python = str(Path(a.peer_root) / PEER_PYTHON) if role == "official" else sys.executable
    argv = [python, __file__, "--role", role, "--methods", method, "--iters", str(a.iters), "--warmup", str(a.warmup),
            "--calib-size", str(a.calib_size), "--optim-size", str(a.optim_size), "--profile", str(a.profile),
            "--clamp", a.clamp]
    env = {**os.environ, "PEER_ROOT": str(a.peer_root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    done = subprocess.run(argv, env=env, check=True, stdout=subprocess.PIPE, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": round((load + os.getloadavg()[0]) / 2, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(OFFICIAL), choices=list(OFFICIAL))
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per run (plus --profile for ours)")
    parser.add_argument("--warmup", type=int, default=2, help="first iterations left out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calib-size", type=int, default=2, help="images of the calibration search (sets the quantizers)")
    parser.add_argument("--optim-size", type=int, default=32, help="reconstruction images (batch 32 drawn from them)")
    parser.add_argument("--profile", type=int, default=0, help="iterations of ours and the floor profiled after the timed ones")
    parser.add_argument("--clamp", choices=("native", "inclusive", "exclusive"), default="native",
                        help="diagnostics: 'inclusive' runs the official code with the oracle's --clamp-inclusive (the "
                             "torch <= 2.13 clamp gradient our fixtures pin), 'exclusive' ours with torch 2.14's")
    parser.add_argument("--peer-root", default=os.environ.get("PEER_ROOT", str(REPO.parent / "peers")))
    parser.add_argument("--role", choices=list(ROLES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args()
    if a.role is not None:  # one measurement, in a child process
        result = ROLES[a.role](a.methods[0], a)
        sys.stdout = sys.__stdout__
        print(json.dumps(result))
        return
    rows: list[dict[str, Any]] = []
    for r in range(a.rounds):
        for method in a.methods:
            for role in ("ours", "official", "floor"):
                row = {**_child(role, method, a), "round": r}
                rows.append(row)
                print(f"round {r} {method:7s} {role:8s} {row['ms']:7.0f} ms/it (system {row['sys_ms']:.0f}; "
                      f"IQR {row['q1']:.0f}-{row['q3']:.0f}, n={row['n']}, load {row['load']})", flush=True)
                if row.get("profile"):
                    print(f"    torch.profiler, operator self CPU time per iteration: {row['profile_total_ms']:.0f} ms, "
                          f"of which matrix products {row['profile_matmul_ms']:.0f} ms")
                for name, calls, ms in row.get("profile") or []:
                    print(f"    {name:40s} {calls:6.1f} calls/it {ms:8.1f} ms/it")
    print("\n| method | official ms/it | ours ms/it | floor ms/it | floor/official | ours/official |\n|---|---|---|---|---|---|")
    for method in a.methods:
        off = statistics.median(x["ms"] for x in rows if x["role"] == "official" and x["method"] == method)
        ours = statistics.median(x["ms"] for x in rows if x["role"] == "ours" and x["method"] == method)
        floor = statistics.median(x["ms"] for x in rows if x["role"] == "floor" and x["method"] == method)
        print(f"| {method} | {off:.0f} | {ours:.0f} | {floor:.0f} | {floor / off:.2f} | {ours / off:.2f} |")
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
