#!/usr/bin/env python
"""I&S-ViT's official pipeline (zysxmu/IaS-ViT @ 9300cea) on the tests' tiny ViT or tiny Swin: the run behind
tests/fixtures/ias_vit_tiny_{w4a4_it4,w3a3_it8}.npz.

Runs the official ``test_quant.py::main()`` unmodified from $PEER_ROOT/IaS-ViT (timm 0.4.12 from
$PEER_ROOT/timm-0.4.12) with run-time patches only; no official code is copied here. Patched (test_quant.py's
module globals and, through them, quant/block_recon.py and quant/layer_recon.py):
  * ``timm.create_model`` (called by utils/build_model.py, whose attention patching still runs) -> the tiny model
    of tests/pins.py in timm 0.4.12 with tests/pins.py's weights (oracles/_repq_lineage.py; Swin keys mapped);
  * ``build_dataset`` -> one batch of ``--calib-size`` seeded N(0, 1) images (seed + 1000) and ``--eval-size``
    evaluation images (seed + 2000), 3x32x32;
  * ``validate`` -> the quantized logits on the evaluation images are captured (after stage 1: ``logits/stage1``;
    at the end: ``logits/q``) instead of an ImageNet evaluation;
  * ``block_reconstruction`` / ``layer_reconstruction`` -> the same functions with ``batch_size`` = --batch-size
    (main hard-codes 64) and, with --reseed S, ``torch.manual_seed(S)`` right before each unit's reconstruction;
  * the hard-coded device 'cuda' of the reconstruction loops -> the CPU (``Tensor.to``, ``.cuda()``);
  * --drop-path R (Swin only): the tiny Swin built with drop_path_rate R instead of timm's default 0.1.
The official flags are ``--model deit_tiny|swin_tiny --w_bits --a_bits --w_cw --iter --calib-batchsize --seed``.
Bundle (--out, outside the repository; .json sidecar): inputs/*, fp_weight/*, q_weight/*, logits/{fp,stage1,q},
qparam/<module>.<quantizer>.<attr> (all official quantizer tensors but ``inited``), q_weight_sha256 (json: sha256
of every final learned tensor outside the quantizers). --compare FIXTURE checks every array of a fixture.

  PEER_ROOT=/work/peers /work/peers/venv/bin/python oracles/ias_oracle.py --w-bits 4 --a-bits 4 --iters 4 \\
      --batch-size 4 --reseed 7 --out /work/peers/oracle_out/ias_vit_tiny_w4a4_it4.npz

Compare with ours: python -m ptq_bench.compare --oracle BUNDLE --method ias_vit --model deit_tiny_patch16_224
  --model-kwargs '<TINY_VIT as json>' --option iters=4 --option batch_size=4 --option seed=7
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repq_lineage as L  # noqa: E402


def main() -> None:
    ap = L.common_args(__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=4, help="official --iter: steps per unit and stage")
    ap.add_argument("--batch-size", type=int, default=4, help="replaces main's hard-coded 64")
    ap.add_argument("--reseed", type=int, default=None, help="torch.manual_seed before every unit's reconstruction")
    ap.add_argument("--drop-path", type=float, default=None, help="Swin: drop_path_rate (timm's default 0.1)")
    a = ap.parse_args()
    C, repo = L.setup("IaS-ViT", threads=a.threads)
    import numpy as np
    import timm
    import torch
    L.cuda_to_cpu()
    weights = L.weights_file(a.model, a.out.parent)
    timm.create_model = L.tiny_create_model(a.model, weights, a.drop_path)
    import test_quant as tq  # official entry point (imports its utils/ and quant/)

    calib = C.synthetic_batch(a.seed + 1000, a.calib_size, L.IMAGE_SHAPE)
    evalx = C.synthetic_batch(a.seed + 2000, a.eval_size, L.IMAGE_SHAPE)
    cap = L.patch_test_quant(tq, calib, evalx)

    def unit(fn):
        def run(*args, **kw):
            kw["batch_size"] = a.batch_size
            if a.reseed is not None:
                torch.manual_seed(a.reseed)
            return fn(*args, **kw)
        return run

    tq.block_reconstruction, tq.layer_reconstruction = unit(tq.block_reconstruction), unit(tq.layer_reconstruction)
    tq.args = L.official_args(tq, a, "--w_cw", "--iter", str(a.iters))
    tq.main()

    qm = cap["q_model"]
    stage1, final = cap["logits"]
    arrays = {"inputs/calib": calib.numpy(), "inputs/eval": evalx.numpy(), "logits/fp": cap["fp_logits"].numpy(),
              "logits/stage1": stage1.numpy(), "logits/q": final.numpy(),
              "q_weight_sha256": np.array(json.dumps(L.weight_digests(qm, a.model)))}
    params = {n for n, _ in qm.named_parameters()}
    fp_state = L.learned_state(a.model, C.state_dict_np(cap["fp_sd"]), cap["fp_params"])
    arrays.update({f"fp_weight/{k}": v for k, v in fp_state.items()})
    q_state = L.learned_state(a.model, C.state_dict_np(qm.state_dict()), params)
    arrays.update({f"q_weight/{k}": v for k, v in q_state.items() if "quantizer" not in k})
    arrays.update(L.quantizer_tensors(C, qm, a.model))
    meta = {"method": "I&S-ViT", "peer_repo": "zysxmu/IaS-ViT", "peer_commit": C.peer_commit(repo),
            "args": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                     "model": "swin_tiny_patch4_window7_224" if a.model == "swin" else "deit_tiny_patch16_224",
                     "model_kwargs": L.TINY[a.model]},
            "official_args": vars(tq.args), "env": C.env_info(),
            "n_qparams": sum(k.startswith("qparam/") for k in arrays)}
    C.save_bundle(a.out, arrays, meta)
    print({"out": str(a.out), "n_qparams": meta["n_qparams"]})
    if a.compare and not L.compare_fixture(a.out, a.compare):
        sys.exit(1)


if __name__ == "__main__":
    main()
