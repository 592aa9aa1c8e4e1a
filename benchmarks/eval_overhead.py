"""Eval-time cost of fake quantization: quantized model vs FP model on the same batch, in one process.

Four variants of each model are timed in interleaved rounds (their order rotates from round to round, after
``--warmup`` untimed rounds), at each thread count given:

* ``fp_fused``: the FP timm model as shipped (its Attention uses fused ``scaled_dot_product_attention``);
* ``fp_explicit``: the same model with timm's ``fused_attn`` off (the explicit q·kᵀ, softmax, ·v path);
* ``quant``: the quantized model (explicit attention with quantized matmul inputs, fake-quantized activations);
* ``quant_off``: the quantized model with every quantizer disabled: what the explicit, quantizable attention and
  the module structure cost without any fake-quant operation.

With ``--compile`` two more (``torch.compile`` through :mod:`ptq_bench.compiled_eval`, as ``eval_compile=true``
runs; compiled afresh at each thread count, the first call's extra time reported as ``<variant>_compile_s``):

* ``quant_compiled``: the quantized model compiled (every quantizer proven to run in the compiled graph);
* ``fp_compiled``: the FP model (fused attention) compiled, the fair baseline of compiled numbers.

and the logit difference of each compiled variant to its eager one on the timed batch (max abs, argmax flips).

Per round the ratios of each variant to ``fp_fused`` are formed from that round's times, so load that changes
between rounds affects numerator and denominator alike; reported are the median ratio and its interquartile
range, and the median time per batch. On a CPU the time is process CPU time (at 1 thread the cost of the code,
free of waiting; at more threads it includes spinning), with wall time beside it; on a GPU, synchronized wall
time. Random-init weights (timing does not depend on them) and seeded N(0, 1) images. Target (issue 11): quant /
fp_fused at most 1.1 at W4A4 for deit_tiny and deit_small with minmax and repq_vit. The JSON output also has images
per second (wall) of each variant and, on a GPU, the peak memory of each variant's first timed batch.

    python benchmarks/eval_overhead.py [--models deit_tiny deit_small] [--methods minmax repq_vit] [--threads 1 2]
        [--repeats 15] [--batch-size 32] [--device cpu] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in

import timm  # noqa: E402
import torch  # noqa: E402

from ptq_bench.calibration import image_calibration  # noqa: E402
from ptq_bench.compiled_eval import evaluating  # noqa: E402
from ptq_bench.methods import BitWidth, build_method  # noqa: E402
from _clock import clock  # noqa: E402  (benchmarks/_clock.py)
from _models import TIMM_NAMES  # noqa: E402  (benchmarks/_models.py)
from ptq_bench.models import set_quantizers_enabled  # noqa: E402
from ptq_bench.models.coverage import check_ran  # noqa: E402

VARIANTS = ("fp_fused", "fp_explicit", "quant", "quant_off")
TARGET = 1.1


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    """timm's switch between fused scaled_dot_product_attention and the explicit path (ViT/DeiT and Swin)."""
    for module in model.modules():
        if hasattr(module, "fused_attn") and not getattr(module, "quantizable", False):
            module.fused_attn = fused


def spread(values: list[float]) -> float:
    """Interquartile range relative to the median."""
    if len(values) < 2:
        return 0.0
    q1, median, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / median


def measure(fp: torch.nn.Module, quantized: torch.nn.Module, batch: torch.Tensor, threads: int, repeats: int,
            warmup: int, device: torch.device, compile: bool = False) -> dict[str, Any]:
    """Interleaved rounds of the four variants (six with ``compile``); per-round ratios to fp_fused, medians and
    spreads."""
    torch.set_num_threads(threads)  # before compiling: inductor's CPU kernels take the thread count they see
    if not compile:
        return _measure(fp, quantized, {}, batch, threads, repeats, warmup, device)
    with evaluating(fp, True) as (fp_compiled, _), evaluating(quantized, True) as (quant_compiled, calls):
        compiled = {"fp_compiled": fp_compiled, "quant_compiled": quant_compiled}
        out = _measure(fp, quantized, compiled, batch, threads, repeats, warmup, device)
    check_ran(calls)  # every quantizer ran in the compiled graph
    return out


def _measure(fp: torch.nn.Module, quantized: torch.nn.Module, compiled: dict[str, torch.nn.Module], batch: torch.Tensor,
             threads: int, repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    now = clock(device)
    variants = VARIANTS + tuple(compiled)

    def run(variant: str) -> tuple[float, float]:
        model = compiled[variant] if variant in compiled else fp if variant.startswith("fp") else quantized
        if variant.startswith("fp"):
            set_fused_attention(fp, variant != "fp_explicit")
        else:
            set_quantizers_enabled(quantized, variant != "quant_off")
        with torch.no_grad():
            start = now()
            model(batch)
            end = now()
        return end[0] - start[0], end[1] - start[1]

    out: dict[str, Any] = {"threads": threads, "clock": "wall" if device.type == "cuda" else "cpu", "repeats": repeats}
    first_call = {variant: run(variant)[0] for variant in compiled}  # compiles: wall time
    for variant, eager in (("fp_compiled", "fp_fused"), ("quant_compiled", "quant")):
        if variant in compiled:
            set_fused_attention(fp, True)
            set_quantizers_enabled(quantized, True)
            with torch.no_grad():
                a, b = compiled[variant](batch), (fp if eager == "fp_fused" else quantized)(batch)
            out[f"{variant}_max_abs_diff"] = (a - b).abs().max().item()
            out[f"{variant}_argmax_flips"] = (a.argmax(1) != b.argmax(1)).float().mean().item()
    times: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in variants}
    peak: dict[str, float] = {}
    for r in range(warmup + repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            if device.type == "cuda" and r == warmup:
                torch.cuda.reset_peak_memory_stats(device)
            wall, cpu = run(variant)
            if device.type == "cuda" and r == warmup:
                peak[variant] = torch.cuda.max_memory_allocated(device) / 2**20
            if r >= warmup:
                times[variant]["wall"].append(wall)
                times[variant]["cpu"].append(cpu)
    set_fused_attention(fp, True)
    set_quantizers_enabled(quantized, True)
    unit = out["clock"]
    for variant in variants:
        out[f"{variant}_s"] = statistics.median(times[variant][unit])
        if variant in first_call:
            out[f"{variant}_compile_s"] = first_call[variant] - statistics.median(times[variant]["wall"])
        out[f"{variant}_images_per_s"] = batch.shape[0] / statistics.median(times[variant]["wall"])
        if variant in peak:
            out[f"{variant}_peak_mib"] = peak[variant]
        out[f"{variant}_wall_s"] = statistics.median(times[variant]["wall"])
        for base in ("fp_fused", "fp_explicit"):
            if variant == base or (base == "fp_explicit" and variant == "fp_fused"):
                continue
            _ratio(out, times, unit, variant, base)
    if compiled:
        _ratio(out, times, unit, "quant_compiled", "fp_compiled")
    return out


def _ratio(out: dict[str, Any], times: dict[str, dict[str, list[float]]], clock: str, variant: str, base: str) -> None:
    """``out[variant/base]``: the median per-round ratio, its spread and its wall-clock median."""
    ratios = [a / b for a, b in zip(times[variant][clock], times[base][clock])]
    out[f"{variant}/{base}"] = statistics.median(ratios)
    out[f"{variant}/{base}_iqr"] = spread(ratios)
    wall_ratios = [a / b for a, b in zip(times[variant]["wall"], times[base]["wall"])]
    out[f"{variant}/{base}_wall"] = statistics.median(wall_ratios)


def cell(r: dict[str, Any], key: str) -> str:
    """``median ratio (IQR / median) [median wall ratio]``."""
    return f"{r[key]:.3f} ({r[key + '_iqr']:.0%}) [{r[key + '_wall']:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"], choices=sorted(TIMM_NAMES))
    parser.add_argument("--methods", nargs="+", default=["minmax", "repq_vit"])
    parser.add_argument("--bits", default="4,4")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads (on a GPU: host threads)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time fp_compiled and quant_compiled (torch.compile)")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()
    device = torch.device(args.device)
    bits = BitWidth(*map(int, args.bits.split(",")))
    clock_text = "synchronized wall time" if device.type == "cuda" else "process CPU time (wall in brackets)"
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.device}, {bits.label}, batch {args.batch_size}, "
          f"{args.repeats} interleaved rounds after {args.warmup} warm-up rounds; ratios: median of per-round ratios "
          f"(IQR / median), {clock_text}")
    compiled = " | quant compiled / FP fused | quant compiled / FP compiled | compile s (FP, quant)" if args.compile else ""
    print("| model | method | threads | FP fused (s) | quant / FP fused | quant / FP explicit | FP explicit / FP fused "
          f"| quant, quantizers off / FP fused{compiled} |\n|---|---|---|---|---|---|---|---|" + "---|" * 3 * args.compile)
    rows: list[dict[str, Any]] = []
    for short in args.models:
        torch.manual_seed(0)
        fp = timm.create_model(TIMM_NAMES[short], pretrained=False).eval().to(device)
        batch = torch.randn((args.batch_size, 3, 224, 224), generator=torch.Generator().manual_seed(2000)).to(device)
        calib = torch.randn((args.calib_size, 3, 224, 224), generator=torch.Generator().manual_seed(1000)).to(device)
        for method in args.methods:
            torch.set_num_threads(max(args.threads))
            quantized = build_method(method, bits).quantize(copy.deepcopy(fp), image_calibration(calib)).eval()
            for threads in args.threads:
                r = measure(fp, quantized, batch, threads, args.repeats, args.warmup, device, args.compile)
                rows.append({"model": short, "method": method, "bits": bits.label, "batch_size": args.batch_size, **r})
                if args.json:  # after every row: a run stopped at its time limit keeps what it measured
                    args.json.write_text(json.dumps({"torch": torch.__version__, "timm": timm.__version__,
                                                     "device": args.device, "target": TARGET, "rows": rows}, indent=1))

                keys = ["quant/fp_fused", "quant/fp_explicit", "fp_explicit/fp_fused", "quant_off/fp_fused"]
                cells = " | ".join(cell(r, key) for key in keys + ["quant_compiled/fp_fused", "quant_compiled/fp_compiled"] * args.compile)
                if args.compile:
                    cells += f" | {r['fp_compiled_compile_s']:.0f}, {r['quant_compiled_compile_s']:.0f}"
                print(f"| {short} | {method} | {threads} | {r['fp_fused_s']:.3f} [{r['fp_fused_wall_s']:.3f}] | {cells} |", flush=True)
            del quantized


if __name__ == "__main__":
    main()
