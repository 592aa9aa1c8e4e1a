#!/usr/bin/env python
"""I&S-ViT's shift-uniform-log2 post-Softmax quantizer (SULQ) from the official code, zysxmu/IaS-ViT @ 9300cea
``quant/quantizer.py`` (the class it names ``LogSqrt2Quantizer``), on seeded attention maps: the run behind
tests/fixtures/sulq_official.npz. The class is imported from $PEER_ROOT/IaS-ViT (timm 0.4.12 on the path for its
package imports) and called as is; no official code is copied here and nothing of it is patched.

Per bit width b in --bits (3, 4, 6), from one torch.Generator seeded --seed (0) and drawn in this order:
calibration map softmax(3·N(0, 1)) of shape (1, 2, 9, 9) over the last dim, evaluation map (same), weights N(0, 1).
The quantizer (``n_bits=b``, per tensor, ``is_act=True``) calibrates on its first call (the calibration map, no
autograd: ``out_calib``), then quantizes the evaluation map with autograd; ``grad_eval`` is the gradient of
sum(out_eval · weights) w.r.t. the evaluation map. Keys: ``w<b>/{calib,eval,weights,out_calib,out_eval,grad_eval,
delta,maxv,minv}`` (delta: the shift η; maxv, minv: the log2 range) and ``peer_commit``.

  PEER_ROOT=/work/peers /work/peers/venv/bin/python oracles/sulq_oracle.py --out /work/peers/oracle_out/sulq_official.npz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repq_lineage as L  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="3,4,6")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="bundle .npz, outside the repository")
    ap.add_argument("--compare", type=Path, default=None, help="a fixture to check bit for bit against the bundle")
    a = ap.parse_args()
    C, repo = L.setup("IaS-ViT", threads=a.threads)
    import numpy as np
    import torch
    from quant.quantizer import LogSqrt2Quantizer  # the official SULQ

    g = torch.Generator().manual_seed(a.seed)
    arrays = {"peer_commit": np.array(C.peer_commit(repo))}
    for bits in (int(b) for b in a.bits.split(",")):
        calib = torch.softmax(3 * torch.randn(1, 2, 9, 9, generator=g), dim=-1)
        evalx = torch.softmax(3 * torch.randn(1, 2, 9, 9, generator=g), dim=-1)
        weights = torch.randn(1, 2, 9, 9, generator=g)
        q = LogSqrt2Quantizer(n_bits=bits, channel_wise=False, is_act=True)
        with torch.no_grad():
            out_calib = q(calib)
        x = evalx.clone().requires_grad_(True)
        out_eval = q(x)
        (out_eval * weights).sum().backward()
        values = {"calib": calib, "eval": evalx, "weights": weights, "out_calib": out_calib, "out_eval": out_eval,
                  "grad_eval": x.grad, "delta": q.delta, "maxv": q.maxv, "minv": q.minv}
        arrays.update({f"w{bits}/{k}": v.detach().numpy() for k, v in values.items()})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(a.out, **arrays)
    print({"out": str(a.out), "arrays": len(arrays)})
    if a.compare and not L.compare_fixture(a.out, a.compare):
        sys.exit(1)


if __name__ == "__main__":
    main()
