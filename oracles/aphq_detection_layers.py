#!/usr/bin/env python
"""The per-layer calibration searches of APHQ-ViT's detection fork on seeded tensors: the run behind
tests/fixtures/aphq_det_layers_w4a4.npz. The official layer classes are imported from
$PEER_ROOT/APHQ-ViT/Object-Detection/tools (GoatWu/APHQ-ViT @ 84c9fde) and driven as its quant_utils/calibrator.py
drives them (raw inputs/outputs set, ``hyperparameter_searching``, ``reparam`` for a layer with a prev_layer), with
the settings of its quant_utils/wrap_net.py and quant_configs/4bit.py (eq_n 128, search_round 3, mse, calib_batch_size
1, per-head matmul grids, a_bit 8 for the patch embedding). No official code is copied here. Official code used:
  Object-Detection/tools/quant_layers/linear.py  AsymmetricallyBatchingQuantLinear, AsymmetricallyChannelWiseBatchingQuantLinear
  Object-Detection/tools/quant_layers/conv.py    AsymmetricallyBatchingQuantConv2d
  Object-Detection/tools/quant_layers/matmul.py  AsymmetricallyBatchingQuantMatMul
Patches (run time): ``.cuda()`` on tensors and modules returns them unchanged; torch.cuda reports a fake device of
--memory-mib MiB (the conv and matmul size their candidate chunks from it; 3 MiB gives chunks of 22 and 43 candidates
for the convs, 7 and 8 for the matmuls).

Layers (one torch.Generator seeded --seed, drawn in this order; keys ``<layer>/...``):
  qkv       Linear 96→288, n_V 3, channel-wise input search after a LayerNorm (prev_layer), then ``reparam``;
            input LayerNorm(x0), x0: (4 windows, 16 tokens, 96) with per-channel scales and offsets
  proj      Linear 96→96 on (4, 16, 96), windows 1-3 three times wider (the input search scores window 0 only)
  roi       Linear 64→32 on (6, 64)                 (a RoI head's 2-D input)
  fc2       Linear 128→96, post_relu, on ReLU(N(0, 1)) (1, 64, 128)
  cw_relu   fc2's tensors through the channel-wise search with post_relu (zero points fixed at 0), no reparam
  rpn       Conv2d 16→16 3x3 pad 1, called on (1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4), a_bit 4
  patch     Conv2d 3→16 4x4 stride 4 ('patch_embed', a_bit 8) on (1, 3, 32, 32)
  matmul1   q·kᵀ, q (4, 3, 16, 32) (times 32^-0.5), kᵀ (4, 3, 32, 16); matmul2 softmax(q·kᵀ)·v, v (4, 3, 16, 32)
Each layer's inputs, outputs, weights and every resulting scale and zero point are written; ``qkv`` also the
channel-wise grid before the fold and the LayerNorm and Linear after it; ``patch/input_quantized`` whether the
official conv set an input grid, ``patch/input_passthrough`` whether its ``quant_input`` returns the input as is.

  PEER_ROOT=/work/peers /work/peers/venv/bin/python oracles/aphq_detection_layers.py --out /work/peers/oracle_out/aphq_det_layers_w4a4.npz
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import _repq_lineage as L

SETTINGS = {"eq_n": 128, "search_round": 3, "calib_batch_size": 1, "metric": "mse"}


def draw(a: argparse.Namespace):
    """The seeded tensors and FP layers (nothing official)."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(a.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def linear(i: int, o: int) -> nn.Linear:
        layer = nn.Linear(i, o)
        layer.weight.data = randn(o, i) * i ** -0.5
        layer.bias.data = randn(o) * 0.1
        return layer

    t: dict = {}
    x0 = randn(4, 16, 96) * (1 + 3 * torch.rand(96, generator=g)) + randn(96)
    norm = nn.LayerNorm(96)
    norm.weight.data, norm.bias.data = 1 + 0.5 * randn(96), 0.3 * randn(96)
    t["qkv"] = (linear(96, 288), norm, x0)
    proj_in = randn(4, 16, 96)
    proj_in[:, :, 5] *= 8  # an outlier channel
    proj_in[1:] *= 3  # windows after the first (which alone the input search scores) wider
    t["proj"] = (linear(96, 96), proj_in)
    t["roi"] = (linear(64, 32), randn(6, 64))
    t["fc2"] = (linear(128, 96), torch.relu(randn(1, 64, 128)))
    rpn = nn.Conv2d(16, 16, 3, padding=1)
    rpn.weight.data, rpn.bias.data = randn(16, 16, 3, 3) * 0.1, randn(16) * 0.1
    t["rpn"] = (rpn, [randn(1, 16, s, s) for s in (16, 8, 4)])
    patch = nn.Conv2d(3, 16, 4, stride=4)
    patch.weight.data, patch.bias.data = randn(16, 3, 4, 4) * 0.2, randn(16) * 0.1
    t["patch"] = (patch, [randn(1, 3, 32, 32)])
    q, k, v = randn(4, 3, 16, 32), randn(4, 3, 16, 32), randn(4, 3, 16, 32)
    t["matmul"] = (q * 32 ** -0.5, k.transpose(-2, -1), v)
    return t


def official_linear(cls, fp, x, w_bits: int, a_bits: int, n_v: int = 1, post_relu: bool = False):
    import torch.nn.functional as F
    layer = cls(fp.in_features, fp.out_features, bias=True, mode="raw", w_bit=w_bits, a_bit=a_bits,
                metric=SETTINGS["metric"], calib_batch_size=SETTINGS["calib_batch_size"],
                search_round=SETTINGS["search_round"], eq_n=SETTINGS["eq_n"], n_V=n_v, post_relu=post_relu)
    layer.weight.data.copy_(fp.weight.data)
    layer.bias.data.copy_(fp.bias.data)
    layer.raw_input, layer.raw_out = x, F.linear(x, fp.weight, fp.bias)
    return layer


def official_conv(cls, fp, xs, w_bits: int, a_bits: int):
    layer = cls(fp.in_channels, fp.out_channels, fp.kernel_size, fp.stride, fp.padding, fp.dilation, fp.groups,
                bias=True, padding_mode=fp.padding_mode, mode="raw", metric=SETTINGS["metric"], w_bit=w_bits,
                a_bit=a_bits, calib_batch_size=SETTINGS["calib_batch_size"], search_round=SETTINGS["search_round"],
                eq_n=SETTINGS["eq_n"])
    layer.weight.data.copy_(fp.weight.data)
    layer.bias.data.copy_(fp.bias.data)
    layer.raw_input, layer.raw_out = list(xs), [fp(x) for x in xs]
    return layer


def grids(prefix: str, quantizer, name: str) -> dict:
    return {f"{prefix}/{name}_scale": quantizer.scale, f"{prefix}/{name}_zp": quantizer.zero_point}


def run(a: argparse.Namespace) -> dict:
    import torch
    C, _ = L.setup("APHQ-ViT", "Object-Detection", "tools", threads=a.threads)
    C.cpu_only_cuda_calls()
    C.fake_cuda_device(a.memory_mib / 1024)
    from quant_layers.conv import AsymmetricallyBatchingQuantConv2d as QConv
    from quant_layers.linear import AsymmetricallyBatchingQuantLinear as QLinear
    from quant_layers.linear import (
        AsymmetricallyChannelWiseBatchingQuantLinear as QChannelLinear,
    )
    from quant_layers.matmul import AsymmetricallyBatchingQuantMatMul as QMatMul

    w, b = a.w_bits, a.a_bits
    t = draw(a)
    out: dict = {}
    with torch.no_grad():
        fp, norm, x0 = t["qkv"]
        x = norm(x0)
        out.update({"qkv/x0": x0, "qkv/norm_weight": norm.weight.clone(), "qkv/norm_bias": norm.bias.clone(),
                    "qkv/x": x, "qkv/weight": fp.weight, "qkv/bias": fp.bias})
        layer = official_linear(QChannelLinear, fp, x, w, b, n_v=3)
        out["qkv/out"] = layer.raw_out
        layer.prev_layer = norm
        layer.hyperparameter_searching()
        out.update(grids("qkv/channel", layer.a_quantizer, "a"))
        layer.reparam()
        out.update({"qkv/folded_norm_weight": norm.weight, "qkv/folded_norm_bias": norm.bias,
                    "qkv/folded_weight": layer.weight, "qkv/folded_bias": layer.bias})
        out.update(grids("qkv", layer.w_quantizer, "w") | grids("qkv", layer.a_quantizer, "a"))

        for name in ("proj", "roi", "fc2"):
            fp, x = t[name]
            layer = official_linear(QLinear, fp, x, w, b, post_relu=name == "fc2")
            out.update({f"{name}/x": x, f"{name}/out": layer.raw_out, f"{name}/weight": fp.weight, f"{name}/bias": fp.bias})
            layer.hyperparameter_searching()
            out.update(grids(name, layer.w_quantizer, "w") | grids(name, layer.a_quantizer, "a"))
        fp, x = t["fc2"]
        layer = official_linear(QChannelLinear, fp, x, w, b, post_relu=True)
        layer.hyperparameter_searching()
        out.update(grids("cw_relu", layer.a_quantizer, "a"))

        for name, a_bits in (("rpn", b), ("patch", 8)):
            fp, xs = t[name]
            layer = official_conv(QConv, fp, xs, w, a_bits)
            out.update({f"{name}/weight": fp.weight, f"{name}/bias": fp.bias})
            for i, (x, y) in enumerate(zip(layer.raw_input, layer.raw_out)):
                out.update({f"{name}/x{i}": x, f"{name}/out{i}": y})
            layer.hyperparameter_searching()
            out.update(grids(name, layer.w_quantizer, "w"))
            if a_bits < 8:
                out.update(grids(name, layer.a_quantizer, "a"))
            else:
                out[f"{name}/input_quantized"] = torch.tensor(layer.a_quantizer.inited)
                out[f"{name}/input_passthrough"] = torch.tensor(torch.equal(layer.quant_input(xs[0]), xs[0]))

        q, k_t, v = t["matmul"]
        attn = torch.softmax(q @ k_t, dim=-1)
        for name, (lhs, rhs) in (("matmul1", (q, k_t)), ("matmul2", (attn, v))):
            layer = QMatMul(A_bit=b, B_bit=b, mode="raw", metric=SETTINGS["metric"],
                            calib_batch_size=SETTINGS["calib_batch_size"], search_round=SETTINGS["search_round"],
                            eq_n=SETTINGS["eq_n"], head_channel_wise=True, num_heads=lhs.shape[1], input_shape_lenth=4)
            layer.raw_input, layer.raw_out = [lhs, rhs], lhs @ rhs
            out.update({f"{name}/a": lhs, f"{name}/b": rhs, f"{name}/out": layer.raw_out})
            layer.hyperparameter_searching()
            out.update(grids(name, layer.A_quantizer, "a") | grids(name, layer.B_quantizer, "b"))

    import numpy as np
    arrays = {k: v.detach().numpy() for k, v in out.items()}
    arrays["memory_bytes"] = np.array(int(a.memory_mib / 1024 * 2**30))
    arrays["eq_n"] = np.array(SETTINGS["eq_n"])
    arrays["peer_commit"] = np.array(C.peer_commit(L.PEER_ROOT / "APHQ-ViT"))
    return arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--memory-mib", type=float, default=3.0, help="the fake device's memory (sizes conv/matmul chunks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="bundle .npz, outside the repository")
    ap.add_argument("--compare", type=Path, default=None, help="a fixture to check bit for bit against the bundle")
    a = ap.parse_args()
    out = a.out.resolve()
    if REPO in out.parents:
        raise SystemExit(f"{out}: oracle output stays outside the repository")
    import numpy as np
    arrays = run(a)
    flags = "" if (a.seed, a.w_bits, a.a_bits, a.memory_mib) == (0, 4, 4, 3.0) else \
        f" --seed {a.seed} --w-bits {a.w_bits} --a-bits {a.a_bits} --memory-mib {a.memory_mib}"
    meta = {"source": f"GoatWu/APHQ-ViT @ {arrays['peer_commit']} Object-Detection/tools/quant_layers/"
                      "{linear,conv,matmul}.py, via oracles/aphq_detection_layers.py",
            "seed": a.seed, "w_bits": a.w_bits, "a_bits": a.a_bits, "memory_mib": a.memory_mib, **SETTINGS,
            "threads": a.threads, "oracle": f"oracles/aphq_detection_layers.py{flags}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, meta=np.array(json.dumps(meta)), **arrays)
    print({"out": str(out), "arrays": len(arrays)})
    if a.compare and not L.compare_fixture(out, a.compare):
        sys.exit(1)


if __name__ == "__main__":
    main()
