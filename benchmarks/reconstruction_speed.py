"""Block-reconstruction throughput (issue 11, item 2): iterations per second of the DopQ-ViT and AIQViT loops.

Each loop runs inside its method's own pipeline (``quantize`` on the model, W4A4 by default), and
``reconstruct_block`` is wrapped to time every iteration: the clock is read after the last optimizer step of an
iteration, so an iteration is everything between two updates (batch draw, forward, loss, backward, Adam, the
step-size projection, and for AIQViT's curriculum the periodic re-ranking). After ``--blocks`` blocks the pipeline
is stopped. Reported per loop: median seconds per iteration (process CPU time on a CPU, synchronized wall time on a
GPU), the interquartile range relative to the median, the mean (re-rankings included) and iterations per second
(1 / median), with the wall-clock iterations per second beside (what more threads buy). The first ``--warmup`` iterations of every block are left out.

Models: the timm models of benchmarks/_models.py (``deit_tiny`` ... ``swin_base``; random-init weights, seeded N(0, 1)
images as in ../shared/oracles) and ``mnist_vit`` (the shipped checkpoint and the first MNIST test-split images). Loops: ``dopq`` (DopQ-ViT's step-size
reconstruction), ``aiqvit_search`` (AIQViT's rank search: two optimizer steps per iteration) and ``aiqvit`` (AIQViT's
reconstruction of branches, DFQ bounds and activation scales with the curriculum).

    python benchmarks/reconstruction_speed.py [--models deit_tiny mnist_vit] [--loops dopq aiqvit_search aiqvit]
        [--iters 30] [--threads 1] [--device cpu] [--compile] [--json out.json]

``--compile`` also times every loop with its method's ``compile: true`` (each training step's forward and loss
through torch.compile), right after the eager one in each round: rows named ``<loop>+compile`` with ``compiled``,
``graphs`` (graphs compiled for the timed blocks) and ``compile_s`` (wall seconds of the iterations that compiled
one, left out of the medians like every block's first ``--warmup`` iterations). ``--cold-compile`` disables
inductor's on-disk caches, so that ``compile_s`` is what a first run on a machine pays.

``--profile`` prints, for the first block of each loop, where the CPU time goes (matmuls, boolean masks, tan/atan,
copies, other elementwise operators) and the top operators. ``--official PEER_ROOT`` also runs the official I&S-ViT
block-reconstruction loop (zysxmu/IaS-ViT, set up outside the repository as ../shared/oracles/README.md describes,
plus benchmarks/peers/ias_block_speed.py) on deit_tiny's first block at the same batch size, thread count and device,
and prints our time per iteration relative to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in

import torch  # noqa: E402

import ptq_bench.methods.aiqvit as aiqvit_module  # noqa: E402
import ptq_bench.methods.dopq_vit as dopq_module  # noqa: E402
from ptq_bench.calibration import image_calibration  # noqa: E402
from ptq_bench.methods import BitWidth, build_method  # noqa: E402
from _clock import clock  # noqa: E402  (benchmarks/_clock.py)
from _models import TIMM_NAMES  # noqa: E402  (benchmarks/_models.py)

REPO = Path(__file__).resolve().parents[1]
LOOPS = ("dopq", "aiqvit_search", "aiqvit")
OFFICIAL_DRIVER = REPO / "benchmarks" / "peers" / "ias_block_speed.py"


class _Done(Exception):
    """Raised by the timing wrapper once enough blocks were timed."""


def build_model(name: str, calib_size: int, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The FP model and ``calib_size`` calibration images."""
    if name in TIMM_NAMES:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(TIMM_NAMES[name], pretrained=False)
        images = torch.randn((calib_size, 3, 224, 224), generator=torch.Generator().manual_seed(1000))
    elif name == "mnist_vit":
        from safetensors.torch import load_file
        from timm.models.vision_transformer import VisionTransformer

        from ptq_bench.datasets import _read_idx

        model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
        model.load_state_dict(load_file(REPO / "checkpoints" / "mnist_vit.safetensors"))
        pixels = _read_idx(REPO / "data" / "mnist" / "t10k-images-idx3-ubyte.gz")[:calib_size]
        images = (torch.from_numpy(pixels.copy()).float().div(255).sub(0.1307).div(0.3081)).unsqueeze(1)
    else:
        raise SystemExit(f"unknown model {name!r} ({', '.join([*TIMM_NAMES, 'mnist_vit'])})")
    return model.eval().to(device), images.to(device)


#: profile categories (self CPU time of torch operators)
CATEGORIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"),
    "boolean masks (comparisons, where)": ("aten::gt", "aten::lt", "aten::ge", "aten::le", "aten::eq", "aten::ne",
                                           "aten::where", "aten::logical_and", "aten::logical_and_"),
    "tan / atan": ("aten::tan", "aten::tan_", "aten::atan", "aten::atan_"),
    "copies": ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::index", "aten::cat", "aten::stack"),
}


def profile_table(prof: Any, iterations: int, top: int = 12) -> str:
    """Self CPU milliseconds per iteration by category, then the top operators."""
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    lines = ["| category | ms / iteration | share |", "|---|---|---|"]
    rest = total
    for name, ops in CATEGORIES.items():
        value = sum(e.self_cpu_time_total for e in events if e.key in ops)
        rest -= value
        lines.append(f"| {name} | {value / 1e3 / iterations:.2f} | {value / total:.0%} |")
    lines.append(f"| other elementwise and reductions | {rest / 1e3 / iterations:.2f} | {rest / total:.0%} |")
    lines += ["", "| operator | calls / iteration | ms / iteration |", "|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        lines.append(f"| {e.key} | {e.count / iterations:.0f} | {e.self_cpu_time_total / 1e3 / iterations:.2f} |")
    return "\n".join(lines)


def time_loop(loop: str, model_name: str, bits: BitWidth, iters: int, batch_size: int, calib_size: int,
              blocks: int, device: torch.device, profile: bool = False, compile: bool = False,
              compiles: dict[str, list[float]] | None = None) -> dict[str, list[list[tuple[float, float]]]]:
    """Per-iteration (wall, CPU) seconds of ``loop`` for each of the first ``blocks`` blocks, keyed by loop name;
    with ``compile``, the method's compiled training step, and ``compiles[name]`` = [graphs, compile seconds]."""
    model, images = build_model(model_name, calib_size, device)
    now = clock(device)
    times: dict[str, list[list[tuple[float, float]]]] = {}
    module = dopq_module if loop == "dopq" else aiqvit_module
    original = module.reconstruct_block
    compiles = {} if compiles is None else compiles

    def timed(block, inputs, targets, steps, n, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        desc = kwargs.get("desc", "")
        name = "aiqvit_search" if desc.startswith("rank search") else "aiqvit" if module is aiqvit_module else "dopq"
        compiled = kwargs.get("compile")
        before = (compiled.graphs, compiled.compile_seconds) if compiled is not None else (0, 0.0)
        marks = [now()]
        last = steps[-1]

        def after() -> None:
            if last.after is not None:
                last.after()
            marks.append(now())

        steps = [*steps[:-1], dataclasses.replace(last, after=after)]
        if profile and name not in times:  # the first block of each loop
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                result = original(block, inputs, targets, steps, n, *args, **kwargs)
            print(f"\nprofile of {model_name} {name}, first block, {n} iterations (profiler overhead included):\n"
                  f"{profile_table(prof, n)}\n", flush=True)
        else:
            result = original(block, inputs, targets, steps, n, *args, **kwargs)
        times.setdefault(name, []).append([(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])])
        if compiled is not None:
            total = compiles.setdefault(name, [0, 0.0])
            total[0] += compiled.graphs - before[0]
            total[1] += compiled.compile_seconds - before[1]
        if all(len(times.get(want, [])) >= blocks for want in wanted):
            raise _Done
        return result

    wanted = ("aiqvit_search", "aiqvit") if loop != "dopq" else ("dopq",)
    if loop == "dopq":
        method = build_method("dopq_vit", bits, calib_size=calib_size, iters=iters, batch_size=batch_size, compile=compile)
    else:
        method = build_method("aiqvit", bits, calib_size=calib_size, search_iters=iters, iters=iters, batch_size=batch_size,
                              compile=compile)
    module.reconstruct_block = timed
    try:
        method.quantize(model, image_calibration(images))
    except _Done:
        pass
    finally:
        module.reconstruct_block = original
    return times


def summary(per_block: list[list[tuple[float, float]]], warmup: int, cpu: bool) -> dict[str, float]:
    """Median (CPU time on a CPU, else wall), spread, mean, it/s; and the wall-clock median and it/s beside."""
    out: dict[str, float] = {}
    for key, index in (("", 1 if cpu else 0), ("wall_", 0)):
        samples = [t[index] for block in per_block for t in block[warmup:]]
        q1, median, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
        out.update({f"{key}median_s": median, f"{key}iqr_rel": (q3 - q1) / median, f"{key}mean_s": statistics.fmean(samples),
                    f"{key}it_per_s": 1 / median})
    out["iterations"] = len(samples)
    return out


def official(peer_root: Path, python: str, iters: int, batch_size: int, threads: int, calib_size: int,
             device: torch.device) -> dict[str, Any]:
    """The official I&S-ViT loop on deit_tiny's first block, timed by benchmarks/peers/ias_block_speed.py."""
    if not (peer_root / "IaS-ViT").is_dir() or not (peer_root / "timm-0.4.12").is_dir():
        raise SystemExit(
            f"no official I&S-ViT setup under {peer_root}: it needs {peer_root}/IaS-ViT (zysxmu/IaS-ViT) and "
            f"{peer_root}/timm-0.4.12, made as ../shared/oracles/README.md 'Setup' says"
        )
    cmd = [python, str(OFFICIAL_DRIVER), "--iters", str(iters), "--batch-size", str(batch_size),
           "--threads", str(threads), "--calib-size", str(calib_size), "--device", device.type]
    done = subprocess.run(cmd, env=dict(os.environ, PEER_ROOT=str(peer_root)), stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:  # its stderr went straight to ours
        raise SystemExit(f"official I&S-ViT driver failed (exit {done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def official_medians(ref: dict[str, Any], warmup: int) -> dict[str, float]:
    """Median seconds per iteration of each official stage (first ``warmup`` iterations left out)."""
    return {stage: statistics.median(ref[f"stage{stage}_iter_{ref.get('clock', 'cpu')}_s"][warmup:]) for stage in ref["stages"]}


def header(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON output: the settings and the rows measured so far."""
    bits = BitWidth(*map(int, args.bits.split(",")))
    return {"torch": torch.__version__, "device": args.device, "threads": args.threads, "bits": bits.label,
            "batch_size": args.batch_size, "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
            "compile": args.compile, "cold_compile": args.cold_compile, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "mnist_vit"], choices=[*TIMM_NAMES, "mnist_vit"])
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), choices=LOOPS)
    parser.add_argument("--bits", default="4,4")
    parser.add_argument("--iters", type=int, default=30, help="iterations per block and loop")
    parser.add_argument("--warmup", type=int, default=3, help="first iterations of each block left out")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=None, help="blocks timed per model (default: timm models 1, mnist_vit 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything (ours, then the official loop) this often")
    parser.add_argument("--official", type=Path, default=None, metavar="PEER_ROOT", help="also time the official I&S-ViT loop")
    parser.add_argument("--official-python", default=sys.executable)
    parser.add_argument("--profile", action="store_true", help="print an operator profile of each loop's first block")
    parser.add_argument("--compile", action="store_true", help="also time each loop compiled (rows <loop>+compile)")
    parser.add_argument("--cold-compile", action="store_true", help="inductor's on-disk caches off (first-run compile time)")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()
    if args.cold_compile:
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bits = BitWidth(*map(int, args.bits.split(",")))
    unit = "CPU s" if device.type == "cpu" else "wall s (synchronized)"
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, {bits.label}, batch {args.batch_size}, "
          f"{args.iters} iterations per block, per-iteration {unit}, {args.rounds} round(s)")
    print("| round | model | loop | blocks | it/s | median (ms) | IQR / median | mean (ms) | it/s (wall) | graphs | compile (s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    references: list[dict[str, Any]] = []
    loops = [loop for loop in args.loops if loop != "aiqvit_search"]
    if "aiqvit_search" in args.loops and "aiqvit" not in loops:
        loops.append("aiqvit")
    for round_ in range(args.rounds):
        for model_name in args.models:
            blocks = args.blocks or (4 if model_name == "mnist_vit" else 1)
            for loop, compiled in [(loop, c) for loop in loops for c in ((False, True) if args.compile else (False,))]:
                compiles: dict[str, list[float]] = {}
                measured = time_loop(loop, model_name, bits, args.iters, args.batch_size, args.calib_size, blocks, device,
                                     args.profile, compiled, compiles)
                for name, per_block in measured.items():
                    if name not in args.loops:
                        continue
                    s = summary(per_block, args.warmup, cpu=device.type == "cpu")
                    row = {"round": round_, "model": model_name, "loop": name + ("+compile" if compiled else ""),
                           "blocks": len(per_block), **s}
                    if compiled:
                        graphs, seconds = compiles.get(name, [0, 0.0])
                        row.update({"compiled": True, "graphs": int(graphs), "compile_s": seconds})
                    rows.append(row)
                    if args.json:  # after every row: a run stopped at its time limit keeps what it measured
                        args.json.write_text(json.dumps(header(args, rows), indent=1))
                    extra = f" {row['graphs']} | {row['compile_s']:.1f} |" if compiled else " | |"
                    print(f"| {round_} | {model_name} | {row['loop']} | {len(per_block)} | {s['it_per_s']:.1f} | "
                          f"{s['median_s'] * 1e3:.1f} | {s['iqr_rel']:.0%} | {s['mean_s'] * 1e3:.1f} | {s['wall_it_per_s']:.1f} |"
                          f"{extra}", flush=True)
        if args.official is not None:
            ref = official(args.official, args.official_python, args.iters, args.batch_size, args.threads, args.calib_size, device)
            ref["round"] = round_
            references.append(ref)
            medians = official_medians(ref, args.warmup)
            for stage, median in medians.items():
                print(f"| {round_} | deit_tiny | official I&S-ViT stage {stage} | 1 | {1 / median:.1f} | {median * 1e3:.1f} | | | | | |",
                      flush=True)
    result = header(args, rows)
    if references:
        ref = references[0]
        print(f"\nours / official I&S-ViT ({ref['peer']} @ {ref['commit'][:7]}, timm {ref['timm']}) per iteration, deit_tiny "
              "block 0, per round (stage 3: weights and activations quantized, as in our loops; target <= 0.5):")
        ratios: dict[str, list[float]] = {}
        for ref in references:
            stage3 = official_medians(ref, args.warmup)["3"]
            for row in rows:
                if row["model"] == "deit_tiny" and row["round"] == ref["round"]:
                    ratios.setdefault(row["loop"], []).append(row["median_s"] / stage3)
        for loop, values in ratios.items():
            print(f"  {loop}: median {statistics.median(values):.3f} (rounds: {', '.join(f'{v:.3f}' for v in values)})")
        result["official"] = references
        result["ratios_vs_official_stage3"] = ratios
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
