"""Integer execution speed (deploy=x86_int8, docs/deploy.md): int8 latency / FP latency and agreement with the
fake-quant model, per model and method, on random-init timm models.

Each model is calibrated by the method on ``--calib-size`` seeded N(0, 1) images at ``--bits``; its integer form
(:mod:`ptq_bench.deploy`) and the FP model (the same modules with every quantizer off) are compiled by inductor with
``freezing`` and timed interleaved on one batch of ``--batch`` images (median and interquartile range over
``--repeats`` rounds); ``--symmetric-weights`` adds each method again with symmetric per-channel weights
(``method.quantizers``), which need no offset term (docs/deploy.md); agreement (top-1 agreement, logit cosine, max abs difference) is over that batch against the
eager fake-quant model. Threads: ``--threads`` (the CPU's cores are shared on the CI machine).

    python benchmarks/deploy_speed.py --models deit_tiny deit_small --methods minmax --symmetric-weights --threads 1
    python benchmarks/deploy_speed.py --models deit_tiny --methods qdrop \
        --options search_size=8 calib_batch_size=4 batch_size=4 iters=2 eq_n=16   # a reconstruction method, capped
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in

import timm
import torch
from _models import TIMM_NAMES

from ptq_bench.calibration import image_calibration
from ptq_bench.deploy import x86
from ptq_bench.deploy.evaluate import int8_kernels
from ptq_bench.deploy.measure import agreement, latency, model_bytes
from ptq_bench.deploy.sites import plan
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.models.prepare import set_quantizers_enabled

#: The issue's target: int8 at most half the FP latency.
TARGET_RATIO = 0.5
#: ``--symmetric-weights``: the weight role's quantizer in place of the method's own.
SYMMETRIC_WEIGHTS = {"weight": {"name": "uniform", "symmetric": True, "granularity": "channel", "channel_dim": 0, "observer": "minmax"}}


def measure(model_name: str, method: str, symmetric: bool, bits: BitWidth, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAMES[model_name], pretrained=False).eval()
    images = torch.randn(max(args.calib_size, args.batch), 3, 224, 224)
    quantizers = SYMMETRIC_WEIGHTS if symmetric else None
    model = build_method(method, bits, quantizers=quantizers, **args.options).quantize(model, image_calibration(images[: args.calib_size])).eval()
    batch = images[: args.batch]
    sites = plan(model)
    fp = copy.deepcopy(model)
    set_quantizers_enabled(fp, False)
    integer = x86.integer_model(model, sites)
    with torch.no_grad(), x86.freezing():
        reference = model(batch)
        compiled_int8, compiled_fp = x86.compiled(integer), x86.compiled(fp)
        kernels = int8_kernels(compiled_int8, batch)
        agree = agreement([compiled_int8(batch)], [reference])
        timed = latency({"int8": compiled_int8, "fp": compiled_fp}, batch, args.repeats)
    torch._dynamo.reset()
    return {"model": model_name, "method": method + (" (symmetric W)" if symmetric else ""), "bits": bits.label, "sites": len(sites),
            "int8_sites": sum(s.runs == "int8" for s in sites), "kernels": kernels, **agree, **timed,
            "ratio": timed["int8"]["median_ms"] / timed["fp"]["median_ms"], "bytes_int8": model_bytes(integer), "bytes_fp": model_bytes(fp)}


def _option(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"], choices=sorted(TIMM_NAMES))
    parser.add_argument("--methods", nargs="+", default=["minmax"])
    parser.add_argument("--symmetric-weights", action="store_true")
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="method options over its YAML (ints and floats parsed), e.g. iters=2")
    parser.add_argument("--bits", nargs=2, type=int, default=[8, 8], metavar=("W", "A"))
    parser.add_argument("--calib-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.options = dict(_option(item) for item in args.options)
    torch.set_num_threads(args.threads)
    x86.check_available(torch.device("cpu"))
    print("| model | method | bits | int8 sites | kernels (qlinear/qconv) | int8 ms | FP ms | int8/FP | top-1 agr. | cosine | max abs diff (max abs logit) | MB int8 / FP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for method, symmetric in [(m, s) for m in args.methods for s in (False, True)[: 1 + args.symmetric_weights]]:
            r = measure(model_name, method, symmetric, BitWidth(*args.bits), args)
            span = lambda t: f"{t['median_ms']:.1f} ({t['p25_ms']:.1f}-{t['p75_ms']:.1f})"
            print(f"| {r['model']} | {r['method']} | {r['bits']} | {r['int8_sites']}/{r['sites']} | "
                  f"{r['kernels']['qlinear']}/{r['kernels']['qconv']} | {span(r['int8'])} | {span(r['fp'])} | {r['ratio']:.2f} | "
                  f"{r['top1_agreement']:.1f} % | {r['cosine']:.5f} | {r['max_abs_diff']:.3g} ({r['reference_max_abs']:.3g}) | "
                  f"{r['bytes_int8'] / 1e6:.1f} / {r['bytes_fp'] / 1e6:.1f} |", flush=True)
    print(f"target: int8/FP <= {TARGET_RATIO}")


if __name__ == "__main__":
    main()
