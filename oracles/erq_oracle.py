#!/usr/bin/env python
"""ERQ's official pipeline (zysxmu/ERQ @ 2f5b4ce) on the tests' tiny ViT or tiny Swin: the run behind
tests/fixtures/erq_tiny_w4a4.npz; or on a full timm model (``--model deit_tiny_patch16_224 --init-weights FP.pt``,
224x224 images), as benchmarks/calibration_speed.py --method erq times it.

Runs the official ``test_quant_expand.py::main()`` unmodified from $PEER_ROOT/ERQ (timm 0.4.12 from
$PEER_ROOT/timm-0.4.12) with run-time patches only; no official code is copied here. Patched:
  * ``timm.create_model`` (called by utils/build_model.py, whose attention patching still runs) -> the tiny model
    of tests/pins.py in timm 0.4.12 with tests/pins.py's weights (oracles/_repq_lineage.py; Swin keys mapped);
  * test_quant_expand.py's ``build_dataset`` -> one batch of ``--calib-size`` seeded N(0, 1) images (seed + 1000,
    labels 0) and ``--eval-size`` evaluation images (seed + 2000), 3x32x32;
  * its ``validate`` -> the quantized logits on the evaluation images are captured (``logits/q``);
  * ``.cuda()`` (test_quant_expand.py, quant/quantizer.py) -> no-op: everything runs on the CPU;
  * the working directory -> a temporary folder beside --out (``hook_fp_act`` pickles to ./fp_output/);
  * --swin-reduction-fix (Swin only, a departure): ``IPython.embed``, which Wqer reaches on a bias-free Linear
    (Swin's patch-merging ``reduction``), is replaced by a no-op so that the run continues with what the branch
    computed before the shell (see the option's help).
The official flags are ``--model deit_tiny|swin_tiny --w_bits --a_bits --coe --calib-batchsize --seed``.
The sidecar's ``timings_s``: ``calibration`` (and ``calibration_cpu``, process CPU) is ``main()`` less its two patched
model builds (the official ``build_model`` with the FP logits captured after it) and ``validate`` calls: quantizer
wrapping, activation calibration, reparameterization, FP capture, Aqer, weight calibration and Wqer.
Bundle (--out, outside the repository; .json sidecar with ``final_weight_sha256``): inputs/*, fp_weight/*,
q_weight/*, logits/{fp,q}, qparam/<module>.<quantizer>.<attr> (all official quantizer tensors but ``inited``).
--compare FIXTURE checks every array of a fixture and its meta's final_weight_sha256.

  PEER_ROOT=/work/peers /work/peers/venv/bin/python oracles/erq_oracle.py --w-bits 4 --a-bits 4 --coe 10000 \\
      --out /work/peers/oracle_out/erq_tiny_w4a4.npz

Compare with ours: python -m ptq_bench.compare --oracle BUNDLE --method erq --model deit_tiny_patch16_224
  --model-kwargs '<TINY_VIT as json>' --option coe=10000
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repq_lineage as L  # noqa: E402


def main() -> None:
    ap = L.common_args(__doc__.split("\n\n")[0], full_models=True)
    ap.add_argument("--coe", type=int, default=10000, help="official --coe (the README's 10000; argparse's 20000)")
    ap.add_argument("--swin-reduction-fix", action="store_true",
                    help="Swin: make IPython.embed a no-op, so the bias-free reduction's Wqer branch returns with the "
                         "weights it computed before the shell (every column but the last quantized)")
    a = ap.parse_args()
    a.out = a.out.resolve()
    C, repo = L.setup("ERQ", threads=a.threads)
    import numpy as np
    import timm
    L.cuda_to_cpu()
    full = a.model not in L.TINY
    if full and a.init_weights is None:
        raise SystemExit(f"--model {a.model}: a full model needs --init-weights (its FP state dict)")
    shape = (3, 224, 224) if full else L.IMAGE_SHAPE
    timm.create_model = L.full_create_model(a.init_weights) if full else L.tiny_create_model(a.model, L.weights_file(a.model, a.out.parent))
    if a.swin_reduction_fix:
        sys.modules["IPython"] = types.SimpleNamespace(embed=lambda *x, **k: print("IPython.embed skipped"))
    import test_quant_expand as tq  # official entry point (imports its utils/ and quant/)

    calib = C.synthetic_batch(a.seed + 1000, a.calib_size, shape)
    evalx = C.synthetic_batch(a.seed + 2000, a.eval_size, shape)
    cap = L.patch_test_quant(tq, calib, evalx)
    evaluations = timed(tq, ("build_model", "validate"))

    tq.args = L.official_args(tq, a, "--coe", str(a.coe))
    work = Path(tempfile.mkdtemp(prefix="erq_fp_output_", dir=a.out.parent))
    cwd = os.getcwd()
    os.chdir(work)
    start = (time.perf_counter(), time.process_time())
    try:
        tq.main()
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    wall, cpu = time.perf_counter() - start[0] - evaluations[0], time.process_time() - start[1] - evaluations[1]

    qm = cap["q_model"]
    arrays = {"inputs/calib": calib.numpy(), "inputs/eval": evalx.numpy(), "logits/fp": cap["fp_logits"].numpy(),
              "logits/q": cap["logits"][-1].numpy()}
    params = {n for n, _ in qm.named_parameters()}
    fp_state = L.learned_state(a.model, C.state_dict_np(cap["fp_sd"]), cap["fp_params"])
    arrays.update({f"fp_weight/{k}": v for k, v in fp_state.items()})
    q_state = L.learned_state(a.model, C.state_dict_np(qm.state_dict()), params)
    arrays.update({f"q_weight/{k}": v for k, v in q_state.items() if "quantizer" not in k})
    arrays.update(L.quantizer_tensors(C, qm, a.model))
    digests = dict(sorted(L.weight_digests(qm, a.model).items()))
    meta = {"method": "ERQ", "peer_repo": "zysxmu/ERQ", "peer_commit": C.peer_commit(repo),
            "args": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                     "model": a.model if full else "swin_tiny_patch4_window7_224" if a.model == "swin" else "deit_tiny_patch16_224",
                     "model_kwargs": {} if full else L.TINY[a.model]},
            "timings_s": {"calibration": wall, "calibration_cpu": cpu},
            "official_args": vars(tq.args), "env": C.env_info(), "final_weight_sha256": digests,
            "n_qparams": sum(k.startswith("qparam/") for k in arrays)}
    C.save_bundle(a.out, arrays, meta)
    print({"out": str(a.out), "n_qparams": meta["n_qparams"]})
    if a.compare:
        ok = L.compare_fixture(a.out, a.compare)
        with np.load(a.compare) as z:
            want = json.loads(str(z["meta"])).get("final_weight_sha256") if "meta" in z.files else None
        if want is not None:
            same = {k: digests.get(k) == v for k, v in want.items()}
            print(f"final_weight_sha256: {sum(same.values())}/{len(same)} equal")
            ok = ok and all(same.values())
        if not ok:
            sys.exit(1)


def timed(module, names: tuple[str, ...]) -> list[float]:
    """Wrap ``module``'s functions ``names`` so that their wall and process CPU seconds add up in the returned list."""
    spent = [0.0, 0.0]
    for name in names:
        def wrapper(*args, _inner=getattr(module, name), **kw):
            start = (time.perf_counter(), time.process_time())
            try:
                return _inner(*args, **kw)
            finally:
                spent[0] += time.perf_counter() - start[0]
                spent[1] += time.process_time() - start[1]
        setattr(module, name, wrapper)
    return spent


if __name__ == "__main__":
    main()
