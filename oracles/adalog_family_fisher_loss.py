#!/usr/bin/env python
"""FIMA-Q's DPLR Fisher loss alone: the official ``LossFunction(rec_loss='fisher_dplr')`` on seeded tensors, the run
behind tests/fixtures/fimaq_loss.npz (tests/test_fisher_loss.py).

Imports ShiheWang/FIMA-Q @ 64c4b00 utils/block_recon.py (``LossFunction``) from $PEER_ROOT/FIMA-Q with timm 0.9.2 from
$PEER_ROOT/timm-0.9.2; no official code is copied here. What the harness supplies is the state the official
``BlockReconstructor`` would have built: a block (an empty module: no AdaRound weights, so the rounding term is 0)
holding ``inverse_B``, the k Fisher rows G and the k output-difference rows D gathered so far, and the official
reconstruction loop's ``update_fisher`` flag (True at the first call after a refresh). As ``new_fisher_ro`` does,
each refresh appends one row to G and D and sets inverse_B = inv(D Dᵀ).

Tensors, from the global generator seeded 0: per refresh (2) a G row rand(1, 30) and a D row rand(1, 30); per call
(2 after each refresh) pred and tgt randn(4, 5, 6). p1 = p2 = 1 (configs/*/best.py). Output keys:
refresh{r}/grad, refresh{r}/delta (the rows added), refresh{r}/inverse_b, refresh{r}/step{s}/{pred,tgt,loss}.

  PEER_ROOT=/work/peers /work/peers/venv/bin/python oracles/adalog_family_fisher_loss.py \\
      --out /work/peers/oracle_out/fimaq_loss.npz --compare tests/fixtures/fimaq_loss.npz
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refreshes", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2, help="loss calls after each refresh")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compare", type=Path, default=None, help="a fixture .npz to check the output against")
    a = ap.parse_args()
    peer_root = Path(os.environ.get("PEER_ROOT", str(REPO.parent / "peers")))
    out = (a.out or peer_root / "oracle_out" / "fimaq_loss.npz").resolve()
    if REPO in out.parents:
        raise SystemExit(f"{out}: oracle output stays outside the repository")
    sys.path.insert(0, str(peer_root / "timm-0.9.2"))
    sys.path.insert(0, str(peer_root / "FIMA-Q"))
    import numpy as np
    import torch
    from torch import nn
    from utils.block_recon import LossFunction  # official

    torch.manual_seed(a.seed)
    block = nn.Module()
    loss_func = LossFunction(block, rec_loss="fisher_dplr", p1=1.0, p2=1.0)
    arrays, rows, deltas = {}, [], []
    for r in range(a.refreshes):
        grad, delta = torch.rand(1, 30), torch.rand(1, 30)
        rows.append(grad)
        deltas.append(delta)
        d = torch.cat(deltas, dim=0)
        block.inverse_B = torch.linalg.inv(d @ d.transpose(1, 0))
        arrays.update({f"refresh{r}/grad": grad, f"refresh{r}/delta": delta, f"refresh{r}/inverse_b": block.inverse_B})
        for s in range(a.calls):
            pred, tgt = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
            loss_func.update_fisher = s == 0
            loss = loss_func(pred, tgt, torch.cat(rows, dim=0))
            arrays.update({f"refresh{r}/step{s}/pred": pred, f"refresh{r}/step{s}/tgt": tgt,
                           f"refresh{r}/step{s}/loss": loss})
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{k: v.detach().numpy() for k, v in arrays.items()})
    print(out)
    if a.compare is not None:
        with np.load(a.compare) as ref, np.load(out) as got:
            keys = [k for k in ref.files if k != "meta"]
            same = [k for k in keys if k in got.files and got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k])]
        print(f"compare {a.compare.name}: {len(same)}/{len(keys)} arrays bit-identical")
        if len(same) != len(keys):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
