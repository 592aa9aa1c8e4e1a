"""Eval-time overhead of fake quantization: time(quantized model) / time(FP model) on the same batch, same run.

The two models are timed alternately (interleaved repeats, median of each) so machine load affects both alike.
Target (issue 2): at most 1.2 at W4A4 on deit_tiny/deit_small. Random-init weights (timing does not depend on them).

    python benchmarks/eval_overhead.py [--models deit_tiny_patch16_224 deit_small_patch16_224] [--method minmax]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

from ptq_bench.calibration import image_calibration
from ptq_bench.methods import BitWidth, build_method


def timed(model: torch.nn.Module, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(batch)
    return time.perf_counter() - start


def measure(name: str, method: str, bits: BitWidth, batch_size: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    fp = timm.create_model(name, pretrained=False).eval()
    batch = torch.randn(batch_size, 3, 224, 224)
    quantized = build_method(method, bits).quantize(copy.deepcopy(fp), image_calibration(batch[:8]))
    timed(fp, batch), timed(quantized, batch)  # warm-up
    fp_times, q_times = [], []
    for _ in range(repeats):
        fp_times.append(timed(fp, batch))
        q_times.append(timed(quantized, batch))
    fp_s, q_s = statistics.median(fp_times), statistics.median(q_times)
    return {"fp_s": fp_s, "quant_s": q_s, "ratio": q_s / fp_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--bits", default="4,4")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bits = BitWidth(*map(int, args.bits.split(",")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.method} {bits.label}, batch {args.batch_size}")
    print("| model | FP eval (s) | fake-quant eval (s) | ratio |\n|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.method, bits, args.batch_size, args.repeats)
        print(f"| {name} | {r['fp_s']:.3f} | {r['quant_s']:.3f} | {r['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
