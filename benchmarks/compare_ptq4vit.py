"""Compare our PTQ4ViT / Base PTQ with the official-code oracle (shared/oracles/ptq4vit_oracle.py output).

Loads the oracle's ``fp_weight/*``, ``inputs/calib`` and ``inputs/eval``, builds the same (reduced-depth) timm
model, runs our method with the oracle's bits, then prints per-layer agreement of every searched scale
(w_interval, a_interval, A/B_interval, split) and logits agreement with ``logits/q``.

    .venv/bin/python benchmarks/compare_ptq4vit.py ../peers/oracle_out/ptq4vit_deit_tiny_d1_w4a4.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ptq_bench.calibration import image_calibration
from ptq_bench.methods import BitWidth, build_method
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul
from ptq_bench.quant.twin_uniform import TwinGeluQuantizer, TwinSoftmaxQuantizer, signed_qmax

METHOD_OF_CONFIG = {"PTQ4ViT": "ptq4vit", "BasePTQ": "base_ptq"}


def build_model(oracle: np.lib.npyio.NpzFile, name: str, depth: int | None) -> nn.Module:
    """The oracle's FP model: timm ``name`` (``depth`` blocks) with the oracle's ``fp_weight/*``."""
    kwargs = {"depth": depth} if depth else {}
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = {k[len("fp_weight/") :]: torch.from_numpy(oracle[k]) for k in oracle.files if k.startswith("fp_weight/")}
    model.load_state_dict(state)
    return model.eval()


def our_scales(model: nn.Module, a_bits: int) -> dict[str, torch.Tensor]:
    """Our searched scales under the oracle's key names (``<layer>.w_interval`` etc.), one value per group."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            out[f"{name}.w_interval"] = m.weight_quantizer.scale.flatten()
            q = m.input_quantizer
            if isinstance(q, TwinGeluQuantizer):
                out[f"{name}.a_interval"] = q.interval.flatten()
            elif q is not None:
                out[f"{name}.a_interval"] = q.scale.flatten()
        elif isinstance(m, QuantMatMul):
            qa = m.quantizer_a
            if isinstance(qa, TwinSoftmaxQuantizer):
                out[f"{name}.split"] = qa.split.flatten()
                out[f"{name}.A_interval"] = (qa.split / (signed_qmax(a_bits) - 1)).flatten()
            else:
                out[f"{name}.A_interval"] = qa.scale.flatten()
            out[f"{name}.B_interval"] = m.quantizer_b.scale.flatten()
    return out


def compare_scales(oracle: np.lib.npyio.NpzFile, ours: dict[str, torch.Tensor]) -> float:
    """Print one line per oracle scale; return the largest relative difference."""
    worst = 0.0
    print(f"{'scale':42s} {'n':>4s} {'oracle[0]':>12s} {'ours[0]':>12s} {'max rel diff':>12s} {'#differ':>8s}")
    for key in sorted(k for k in oracle.files if k.startswith("qparam/")):
        name = key[len("qparam/") :]
        if name not in ours:
            print(f"{name:42s} (not quantized here: the conv input stays FP in both implementations)")
            continue
        ref = torch.from_numpy(np.asarray(oracle[key], dtype=np.float32)).flatten()
        mine = ours[name]
        if mine.numel() != ref.numel():  # ours stores one scale per output row
            mine = mine.view(ref.numel(), -1)[:, 0]
        rel = ((mine - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
        differ = int((~torch.isclose(mine, ref, rtol=1e-4, atol=0)).sum())
        worst = max(worst, rel)
        print(f"{name:42s} {ref.numel():4d} {ref[0].item():12.6g} {mine[0].item():12.6g} {rel:12.3e} {differ:8d}")
    return worst


def logits_agreement(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {
        "cosine": F.cosine_similarity(ours.flatten(), ref.flatten(), dim=0).item(),
        "max_abs_diff": (ours - ref).abs().max().item(),
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("oracle", type=Path, help="oracle .npz (its .json sidecar must sit next to it)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    oracle = np.load(args.oracle)
    meta = json.loads(args.oracle.with_suffix(".json").read_text())
    run = meta["args"]
    model = build_model(oracle, run["model"], run.get("depth"))
    calib, evalx = torch.from_numpy(oracle["inputs/calib"]), torch.from_numpy(oracle["inputs/eval"])
    with torch.no_grad():
        fp = model(evalx)
    print(f"FP logits vs oracle logits/fp: {logits_agreement(fp, torch.from_numpy(oracle['logits/fp']))}")

    metric = next(iter(meta["quantizers"].values()))["metric"]  # example/test_all.py sets it for both configs
    method = build_method(METHOD_OF_CONFIG[run.get("config", "PTQ4ViT")], BitWidth(run["w_bits"], run["a_bits"]), metric=metric)
    print(f"method {method.name}, metric {metric}, W{run['w_bits']}A{run['a_bits']}, depth {run.get('depth')}")
    start, cpu_start = time.perf_counter(), time.process_time()
    method.quantize(model, image_calibration(calib))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    worst = compare_scales(oracle, our_scales(model, run["a_bits"]))
    with torch.no_grad():
        q = model(evalx)
    print(f"largest relative scale difference: {worst:.3e}")
    print(f"quantized logits vs oracle logits/q: {logits_agreement(q, torch.from_numpy(oracle['logits/q']))}")
    print(f"quantized vs FP logits (ours):       {logits_agreement(q, fp)}")
    timing = meta.get("timings_s", {})
    print(f"calibration: ours {wall:.2f} s wall / {cpu:.2f} s CPU; oracle {timing.get('calibration')} s wall")


if __name__ == "__main__":
    main()
