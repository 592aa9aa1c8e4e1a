"""Compare our PTQ4ViT / Base PTQ with the official-code oracle (shared/oracles/ptq4vit_oracle.py output).

Loads the oracle's ``fp_weight/*``, ``inputs/calib`` and ``inputs/eval``, builds the same (reduced-depth) timm
model, runs our method with the oracle's bits, then prints per-layer agreement of every searched scale
(w_interval, a_interval, A/B_interval, split: every one of our values against the oracle value of its group of
rows) and logits agreement with ``logits/q``. The bundle comes from a run of ../shared/oracles/ptq4vit_oracle.py
(official code set up outside the repository as ../shared/oracles/README.md says), e.g.
``$PEER_ROOT/venv/bin/python ../shared/oracles/ptq4vit_oracle.py --seed 0 --depth 1 --out <dir>/ptq4vit_d1.npz``.

    python benchmarks/compare_ptq4vit.py <dir>/ptq4vit_d1.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script sits in

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ptq_bench.calibration import image_calibration  # noqa: E402
from ptq_bench.methods import BitWidth, build_method  # noqa: E402
from ptq_bench.quant.layers import QuantConv2d, QuantLinear, QuantMatMul  # noqa: E402
from ptq_bench.quant.twin_uniform import TwinGeluQuantizer, TwinSoftmaxQuantizer, signed_qmax  # noqa: E402

METHOD_OF_CONFIG = {"PTQ4ViT": "ptq4vit", "BasePTQ": "base_ptq"}


def build_model(oracle: np.lib.npyio.NpzFile, name: str, depth: int | None) -> nn.Module:
    """The oracle's FP model: timm ``name`` (``depth`` blocks) with the oracle's ``fp_weight/*``."""
    kwargs = {"depth": depth} if depth else {}
    model = timm.create_model(name, pretrained=False, **kwargs)
    state = {k[len("fp_weight/") :]: torch.from_numpy(oracle[k]) for k in oracle.files if k.startswith("fp_weight/")}
    model.load_state_dict(state)
    return model.eval()


def our_scales(model: nn.Module, a_bits: int) -> dict[str, torch.Tensor]:
    """Our searched scales under the oracle's key names (``<layer>.w_interval`` etc.), flattened."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            out[f"{name}.w_interval"] = m.weight_quantizer.scale.flatten().cpu()
            q = m.input_quantizer
            if isinstance(q, TwinGeluQuantizer):
                out[f"{name}.a_interval"] = q.interval.flatten().cpu()
            elif q is not None:
                out[f"{name}.a_interval"] = q.scale.flatten().cpu()
        elif isinstance(m, QuantMatMul):
            qa = m.quantizer_a
            if isinstance(qa, TwinSoftmaxQuantizer):
                out[f"{name}.split"] = qa.split.flatten().cpu()
                out[f"{name}.A_interval"] = (qa.split / (signed_qmax(a_bits) - 1)).flatten().cpu()
            else:
                out[f"{name}.A_interval"] = qa.scale.flatten().cpu()
            out[f"{name}.B_interval"] = m.quantizer_b.scale.flatten().cpu()
    return out


def expand_groups(ref: torch.Tensor, mine: torch.Tensor) -> torch.Tensor | None:
    """The oracle's values, one per group of consecutive rows, repeated to our one value per row (None when our
    count is not a multiple of the oracle's)."""
    if mine.numel() == ref.numel():
        return ref
    if ref.numel() == 0 or mine.numel() % ref.numel():
        return None
    return ref.repeat_interleave(mine.numel() // ref.numel())


def compare_scales(oracle: np.lib.npyio.NpzFile, ours: dict[str, torch.Tensor]) -> float:
    """Print one line per oracle scale, comparing every one of our values with its group's oracle value (as
    ptq_bench.compare does); return the largest relative difference."""
    worst = 0.0
    print(f"{'scale':42s} {'n':>4s} {'ours n':>6s} {'oracle[0]':>12s} {'ours[0]':>12s} {'max rel diff':>12s} {'#differ':>8s}")
    for key in sorted(k for k in oracle.files if k.startswith("qparam/")):
        name = key[len("qparam/") :]
        if name not in ours:
            print(f"{name:42s} (not quantized here: the conv input stays FP in both implementations)")
            continue
        ref = torch.from_numpy(np.asarray(oracle[key], dtype=np.float32)).flatten()
        mine = ours[name].detach().float()
        expanded = expand_groups(ref, mine)
        if expanded is None:
            print(f"{name:42s} {ref.numel():4d} {mine.numel():6d} value counts do not match: cannot compare")
            worst = float("inf")
            continue
        rel = ((mine - expanded).abs() / expanded.abs().clamp_min(1e-12)).max().item()
        differ = int((~torch.isclose(mine, expanded, rtol=1e-4, atol=0)).sum())
        worst = max(worst, rel)
        print(f"{name:42s} {ref.numel():4d} {mine.numel():6d} {ref[0].item():12.6g} {mine[0].item():12.6g} {rel:12.3e} {differ:8d}")
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
    ap.add_argument("--device", default="cpu", help="where ours runs (the oracle ran on the CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    oracle = np.load(args.oracle)
    meta = json.loads(args.oracle.with_suffix(".json").read_text())
    run = meta["args"]
    model = build_model(oracle, run["model"], run.get("depth")).to(device)
    calib, evalx = torch.from_numpy(oracle["inputs/calib"]).to(device), torch.from_numpy(oracle["inputs/eval"]).to(device)
    with torch.no_grad():
        fp = model(evalx).cpu()
    print(f"FP logits vs oracle logits/fp: {logits_agreement(fp, torch.from_numpy(oracle['logits/fp']))}")

    metric = next(iter(meta["quantizers"].values()))["metric"]  # example/test_all.py sets it for both configs
    method = build_method(METHOD_OF_CONFIG[run.get("config", "PTQ4ViT")], BitWidth(run["w_bits"], run["a_bits"]), metric=metric)
    print(f"method {method.name}, metric {metric}, W{run['w_bits']}A{run['a_bits']}, depth {run.get('depth')}")
    start, cpu_start = time.perf_counter(), time.process_time()
    method.quantize(model, image_calibration(calib))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    worst = compare_scales(oracle, our_scales(model, run["a_bits"]))
    with torch.no_grad():
        q = model(evalx).cpu()
    print(f"largest relative scale difference: {worst:.3e}")
    print(f"quantized logits vs oracle logits/q: {logits_agreement(q, torch.from_numpy(oracle['logits/q']))}")
    print(f"quantized vs FP logits (ours):       {logits_agreement(q, fp)}")
    timing = meta.get("timings_s", {})
    print(f"calibration: ours {wall:.2f} s wall / {cpu:.2f} s CPU; oracle {timing.get('calibration')} s wall")


if __name__ == "__main__":
    main()
