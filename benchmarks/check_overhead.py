"""Cost of the trust checks, measured side by side in one process (issue: never a silently wrong quantized model).

* invariant check: RepQ-ViT calibration (32 images) with ``keeps_fp_function`` as shipped vs replaced by a no-op,
  and the CPU time spent inside the check's own forward passes as a share of the checked calibration (the steadier
  figure on a loaded machine);
* coverage: fake-quant evaluation of one batch with the call-tracking hooks vs without.

Random-init timm models, seeded N(0, 1) images; interleaved repeats, medians of process CPU seconds (steadier than
wall time on a shared machine; synchronized wall seconds on a GPU). Run from the repository root:

    python benchmarks/check_overhead.py [--models deit_tiny_patch16_224] [--repeats 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in

import timm  # noqa: E402
import torch  # noqa: E402

import ptq_bench.methods.repq_vit as repq_module  # noqa: E402
import ptq_bench.transforms.invariants as invariants  # noqa: E402
from ptq_bench.calibration import image_calibration  # noqa: E402
from ptq_bench.methods import BitWidth, build_method  # noqa: E402
from ptq_bench.models.coverage import tracking_calls  # noqa: E402
from _clock import clock  # noqa: E402  (benchmarks/_clock.py)


@contextlib.contextmanager
def _no_check(_model: object, _data: object, transform: str):
    yield invariants.InvariantCheck(transform)  # never measured


class TimedTrace:
    """Wraps the invariant check's traced forward pass and adds up its process CPU seconds."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = invariants._trace

    def __call__(self, *args: object):
        start = time.process_time()
        try:
            return self.original(*args)
        finally:
            self.seconds += time.process_time() - start


def seconds(device: torch.device) -> float:
    """Process CPU seconds on a CPU; on a GPU, wall seconds after a synchronization (benchmarks/_clock.py)."""
    wall, cpu = clock(device)()
    return wall if device.type == "cuda" else cpu


def calibrate(fp: torch.nn.Module, images: torch.Tensor, checked: bool) -> tuple[float, torch.nn.Module]:
    original = repq_module.keeps_fp_function
    repq_module.keeps_fp_function = original if checked else _no_check
    try:
        start = seconds(images.device)
        model = build_method("repq_vit", BitWidth(4, 4)).quantize(copy.deepcopy(fp), image_calibration(images))
        return seconds(images.device) - start, model
    finally:
        repq_module.keeps_fp_function = original


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: torch.Tensor, tracked: bool) -> float:
    start = seconds(batch.device)
    with tracking_calls(model) if tracked else contextlib.nullcontext():
        model(batch)
    return seconds(batch.device) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    unit = "CPU seconds" if device.type == "cpu" else "synchronized wall seconds"
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, RepQ-ViT W4A4, 32 calibration images, eval batch 32, {unit}")
    print("| model | check's own forwards / calibration | calibration with check / without | eval with coverage hooks / without |\n|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        fp = timm.create_model(name, pretrained=False).eval().to(device)
        images = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
        with_check, without_check, tracked, plain, shares = [], [], [], [], []
        model = None
        for _ in range(args.repeats):
            timer = TimedTrace()
            invariants._trace = timer
            try:
                seconds, model = calibrate(fp, images, checked=True)
            finally:
                invariants._trace = timer.original
            with_check.append(seconds)
            shares.append(timer.seconds / seconds)
            without_check.append(calibrate(fp, images, checked=False)[0])
        assert model is not None
        evaluate(model, images, tracked=False)  # warm-up
        for _ in range(args.repeats * 3):
            tracked.append(evaluate(model, images, tracked=True))
            plain.append(evaluate(model, images, tracked=False))
        calib_ratio = statistics.median(with_check) / statistics.median(without_check)
        eval_ratio = statistics.median(tracked) / statistics.median(plain)
        print(f"| {name} | {100 * statistics.median(shares):.1f} % | {calib_ratio:.3f} ({statistics.median(with_check):.2f} s / "
              f"{statistics.median(without_check):.2f} s) | {eval_ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
