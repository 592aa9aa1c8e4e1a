"""Per-call cost of the elementwise fake-quant kernels on deit_tiny's activation shapes (issue 11, item 1).

Each quantizer kind's default inference path ("after") is timed beside the form it replaced ("before": the
literal six-pass form for a fractional zero point, the level-table gather for the log quantizers; the integer zero
point already took the four-pass form, so its two columns time the same code), torch's fused fake_quantize op where
it applies (it rounds x·(1/s) rather than x/s, so it is not exact; "fused ≠" counts the elements it gets wrong) and
the FP floor ``x.clone()``. Warm-up, then interleaved repeats; medians, and the largest interquartile range of a
row relative to its median as the spread.

    python benchmarks/fakequant_kernels.py [--threads 1 2] [--batch-size 32] [--repeats 25] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, not an installed copy

from ptq_bench.quant import UniformQuantizer
from ptq_bench.quant.base import Quantizer
from ptq_bench.quant.log import Log2Quantizer, LogSqrt2Quantizer, _LogQuantizer

Kernel = Callable[[torch.Tensor], torch.Tensor]
TOKENS, DIM, HEADS = 197, 192, 3  # deit_tiny


@dataclass
class Case:
    kind: str
    x: torch.Tensor
    before: Kernel
    after: Kernel
    fused: Kernel | None = None


def calibrated(quantizer: Quantizer, x: torch.Tensor) -> Quantizer:
    quantizer.to(x.device)
    quantizer.calibrating = True
    with torch.no_grad():
        quantizer(x)
    quantizer.calibrating = False
    return quantizer


def tensor_case(x: torch.Tensor, bits: int) -> Case:
    q = calibrated(UniformQuantizer(bits), x)
    s, z = q.scale, q.zero_point
    lo, hi = q.qmin - z.item(), q.qmax - z.item()
    return Case(
        "uniform tensor, integer z",
        x,
        lambda t: torch.div(t, s).round_().clamp_(lo, hi).mul_(s),
        q.quantize,
        lambda t: torch.fake_quantize_per_tensor_affine(t, s.item(), int(z), q.qmin, q.qmax),
    )


def odd_last_bit(value: float) -> float:
    """``value`` in float32 with the last mantissa bit set: r + z then rounds once it reaches z's next binade."""
    return torch.tensor(value).view(torch.int32).bitwise_or(1).view(torch.float32).item()


def fractional_case(x: torch.Tensor, bits: int, zero_point: float) -> Case:
    """Per tensor with RepQ-ViT's fractional zero point after reparameterization."""
    q = calibrated(UniformQuantizer(bits), x)
    s, z = q.scale, torch.tensor(zero_point, device=x.device)
    q.set_params(s, z)
    return Case(
        f"uniform tensor, z = {zero_point:.7g}",
        x,
        lambda t: torch.div(t, s).round_().add_(z).clamp_(q.qmin, q.qmax).sub_(z).mul_(s),
        q.quantize,
    )


def channel_case(x: torch.Tensor, bits: int) -> Case:
    q = calibrated(UniformQuantizer(bits, granularity="channel", channel_dim=-1), x)
    s, z = q.scale, q.zero_point
    return Case(
        "uniform channel, integer z",
        x,
        lambda t: torch.div(t, s).round_().clamp_(q.qmin - z, q.qmax - z).mul_(s),
        q.quantize,
        lambda t: torch.fake_quantize_per_channel_affine(t, s, z.int(), t.ndim - 1, q.qmin, q.qmax),
    )


def log_case(kind: str, quantizer: _LogQuantizer, attention: torch.Tensor) -> Case:
    q = calibrated(quantizer, attention)
    return Case(kind, attention, lambda t: q._fake_quant_table(t, q.scale), q.quantize)


def cases(batch_size: int, bits: int, device: torch.device = torch.device("cpu")) -> list[Case]:
    torch.manual_seed(0)
    tokens = [torch.randn(batch_size, TOKENS, width).to(device) for width in (DIM, 4 * DIM)]
    attention = (torch.randn(batch_size, HEADS, TOKENS, TOKENS) * 2).softmax(-1).to(device)
    z = 2 ** (bits - 1) - 0.5  # the middle of the grid, as for a symmetric post-LayerNorm range
    return [
        *(tensor_case(x, bits) for x in (*tokens, attention)),
        # the shifted clamp is provably exact for the first fractional zero point, not for the second
        *(fractional_case(x, bits, frac) for x in tokens for frac in (z - 2**-5, odd_last_bit(z - 0.0052))),
        *(channel_case(x, bits) for x in tokens),
        log_case("log√2", LogSqrt2Quantizer(bits), attention),
        log_case("log2", Log2Quantizer(bits), attention),
    ]


def interleaved(kernels: dict[str, Kernel], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each kernel: two warm-up calls, then ``repeats`` rounds calling each once in turn (wall
    time, after a synchronization on a GPU)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.no_grad():
        for _ in range(2):
            for kernel in kernels.values():
                kernel(x)
        for _ in range(repeats):
            for name, kernel in kernels.items():
                sync()
                start = time.perf_counter()
                kernel(x)
                sync()
                times[name].append(time.perf_counter() - start)
    return times


def spread(samples: list[float]) -> float:
    """Interquartile range relative to the median."""
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / median


def row(case: Case, threads: int, repeats: int) -> str:
    kernels = {"floor": torch.Tensor.clone, "before": case.before, "after": case.after}
    if case.fused is not None:
        kernels["fused"] = case.fused
    times = interleaved(kernels, case.x, repeats)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    with torch.no_grad():
        exact = case.before(case.x)
        equal = "yes" if torch.equal(case.after(case.x), exact) else "**NO**"
        wrong = f"{ms['fused']:.2f} ({int((case.fused(case.x) != exact).sum())})" if case.fused else "–"
    shape = "×".join(map(str, case.x.shape))
    return (
        f"| {case.kind} | {shape} | {threads} | {ms['floor']:.2f} | {ms['before']:.2f} | {ms['after']:.2f} | "
        f"{ms['after'] / ms['before']:.2f} | {ms['before'] / ms['floor']:.2f} | {ms['after'] / ms['floor']:.2f} | "
        f"{max(map(spread, times.values())):.0%} | {equal} | {wrong} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bits", type=int, default=4, help="activation bit-width")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.device}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.bits}-bit activations")
    print(
        "| kind | shape | threads | floor (ms) | before (ms) | after (ms) | after/before | before/floor | after/floor "
        "| spread | after = before | fused ms (≠ elements) |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    all_cases = cases(args.batch_size, args.bits, device)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in all_cases:
            print(row(case, threads, args.repeats), flush=True)


if __name__ == "__main__":
    main()
