#!/usr/bin/env python
"""The AdaLog family's official code on the tests' tiny ViT / tiny Swin: the run behind the pin fixtures
tests/fixtures/{adalog,aphq_vit,qdrop,fimaq}_*.npz.

Drives the organizers' base oracle ``../shared/oracles/adalog_family_oracle.py`` (its ``main()``: the official
``test_quant.main(args)`` with I/O patches, see its docstring) and adds run-time patches only; no official code is
copied here. Official code patched (imported from $PEER_ROOT/<repo>, timm 0.9.2 from $PEER_ROOT/timm-0.9.2):
  GoatWu/AdaLog @ 75a57d2     test_quant.py, configs/{3,4,6}bit.py, utils/block_recon.py
  GoatWu/APHQ-ViT @ 84c9fde   test_quant.py, configs/{3,4}bit/best.py, utils/block_recon.py, utils/mlp_recon.py
  ShiheWang/FIMA-Q @ 64c4b00  test_quant.py, configs/4bit/best.py, utils/block_recon.py
Patches (on top of the base oracle's):
  * timm.create_model -> the tiny model of oracles/_tiny_models.py (tests/pins.py's TINY_VIT / TINY_SWIN) in timm
    0.9.2; its FP weights come from tests/pins.py through the base oracle's --init-weights;
  * _oracle_common.synthetic_batch -> images of tests/pins.py's IMAGE_SHAPE (3x32x32) instead of 224x224, same seeds;
    (neither with --model deit_tiny: the real timm-0.9.2 deit_tiny_patch16_224 on 224x224 images, --depth N keeps its
    first N blocks; its weights: tests/pins.py's seeded_state_dict of timm 1.x's deit_tiny, the blocks past N dropped,
    or --weights official)
  * --cfg k=v,...: the config file's Config.__init__ wrapped to set those attributes (CLI flags still win, as in
    the official main);
  * APHQ-ViT: its argument parser gains --optim-size (into Config.optim_size; FIMA-Q has the flag, APHQ-ViT reads
    the config only) and the spelling --val-batchsize the base oracle passes;
  * --iters N: every reconstructor's reconstruct_single_block runs N steps (block and, APHQ-ViT, MLP reconstruction);
  * --reseed S: torch.manual_seed(S) at the start of each reconstructor's reconstruct_model;
  * --clamp-inclusive: torch.clamp / Tensor.clamp with number bounds pass the gradient on the bounds,
    where(min <= x <= max, grad, 0), as torch <= 2.13 (the official READMEs' torch 1.10) did; torch 2.14 gives 0;
  * Adam.step's CUDA-graph-capture health check skipped (the base oracle's fake CUDA device sends it to the driver).
The base oracle hands its calibration images to every loader of --calib-size images: with --optim-size equal to
--calib-size the reconstruction runs on them, and the bundle's inputs/optim is rewritten to say so.
The bundle (.npz + .json sidecar, keys as the base oracle writes them) goes to --out, outside the repository.
--compare FIXTURE checks every array of a fixture (all keys but ``meta``) against the bundle, bit for bit.

  PEER_ROOT=/work/peers /work/peers/venv/bin/python oracles/adalog_family_tiny.py --method aphqvit --model swin \\
      --weights seeded --optimize --optim-size 8 --iters 4 --reseed 7 --clamp-inclusive -- --reconstruct-mlp
  PEER_ROOT=/work/peers /work/peers/venv/bin/python oracles/adalog_family_tiny.py --method aphqvit --model deit_tiny \
      --calib-size 8 --optimize --optim-size 8 --iters 4 --reseed 7 --clamp-inclusive --out /abs/path.npz [--depth N]
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
os.environ.setdefault("PEER_ROOT", str(REPO.parent / "peers"))
BASE_ORACLES = Path(os.environ.get("BASE_ORACLES", str(REPO.parent / "shared" / "oracles")))
sys.path.insert(0, str(HERE))
import _tiny_models as tiny
from _inclusive_clamp import inclusive_clamp

CONFIGS = {"adalog": "configs/{b}bit.py", "aphqvit": "configs/{b}bit/best.py", "fimaq": "configs/{b}bit/best.py"}
TIMM_NAMES = {"vit": "deit_tiny_patch16_224", "swin": "swin_tiny_patch4_window7_224",
              "deit_tiny": "deit_tiny_patch16_224"}
#: tests/pins.py's seeded_state_dict of timm 1.x's deit_tiny (made by the repository's interpreter), first blocks kept
DEIT_WEIGHTS = """import sys, torch, timm
sys.path.insert(0, sys.argv[1])
from pins import seeded_state_dict
depth, out = int(sys.argv[2]), sys.argv[3]
state = seeded_state_dict(timm.create_model("deit_tiny_patch16_224", pretrained=False))
torch.save({k: v for k, v in state.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < depth}, out)
"""


def deit_weights(depth: int | None, directory: Path) -> Path:
    """seeded_state_dict weights of deit_tiny (all 12 blocks' draws, the first ``depth`` kept) as a .pt."""
    import subprocess
    out = Path(directory) / f"deit_tiny_seeded_d{depth or 12}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([tiny.MAIN_PYTHON, "-c", DEIT_WEIGHTS, str(REPO / "tests"), str(depth or 12), str(out)], check=True)
    return out


def parse_cfg(text: str) -> dict:
    """'eq_n=64,pct=0.99,optim_metric=mse,use_mean_hessian=False' -> typed values (literals, else strings)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def official_patches(a, repo: Path):
    """Patches of the official modules, applied after the base oracle has imported test_quant (from its
    fake_cuda_device call, right before it parses the official CLI and calls main)."""
    import torch
    tq = sys.modules["test_quant"]

    # config overrides (and APHQ-ViT's optim_size, which has no CLI flag there)
    overrides = dict(a.cfg)
    if a.method == "aphqvit" and a.optimize:
        overrides.setdefault("optim_size", a.optim_size)
    if overrides:
        cfg_file = repo / CONFIGS[a.method].format(b=a.w_bits)
        if str(cfg_file.parent) not in sys.path:
            sys.path.append(str(cfg_file.parent))
        config_module = importlib.import_module(cfg_file.stem)  # test_quant.main imports the same module by name
        init = config_module.Config.__init__

        @functools.wraps(init)
        def config_init(self, _init=init):
            _init(self)
            for key, value in overrides.items():
                if not hasattr(self, key):
                    raise SystemExit(f"{cfg_file.name} has no setting {key!r}")
                setattr(self, key, value)

        config_module.Config.__init__ = config_init

    if a.method == "aphqvit":  # the base oracle's spellings for APHQ-ViT's parser
        parser_fn = tq.get_args_parser

        def get_args_parser(_fn=parser_fn):
            parser = _fn()
            parser.add_argument("--val-batchsize", dest="val_batch_size", type=int)
            parser.add_argument("--optim-size", type=int, default=argparse.SUPPRESS)
            return parser

        tq.get_args_parser = get_args_parser

    reconstructors = [sys.modules["utils.block_recon"].BlockReconstructor]
    if "utils.mlp_recon" in sys.modules:
        reconstructors.append(sys.modules["utils.mlp_recon"].MLPReconstructor)
    for cls in reconstructors:
        if a.iters is not None:
            single = cls.reconstruct_single_block

            @functools.wraps(single)
            def reconstruct_single_block(self, *args, _single=single, **kw):
                kw["iters"] = a.iters
                return _single(self, *args, **kw)

            cls.reconstruct_single_block = reconstruct_single_block
        if a.reseed is not None:
            whole = cls.reconstruct_model

            @functools.wraps(whole)
            def reconstruct_model(self, *args, _whole=whole, **kw):
                torch.manual_seed(a.reseed)
                return _whole(self, *args, **kw)

            cls.reconstruct_model = reconstruct_model
    if a.clamp_inclusive:
        inclusive_clamp()
    # the base oracle's torch.cuda.is_available() -> True sends Adam.step's CUDA-graph-capture check to the (absent)
    # device; nothing is captured on a CPU, so the check is skipped
    torch.optim.Optimizer._accelerator_graph_capture_health_check = lambda self: None


def same_sets(bundle: Path) -> None:
    """The base oracle's loader returns its calibration images for every request of ``calib_size`` images, so with
    --optim-size equal to --calib-size the reconstruction (and APHQ-ViT's MLP reconstruction) ran on inputs/calib:
    the bundle's inputs/optim is made to say so."""
    import numpy as np
    with np.load(bundle) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["inputs/optim"] = arrays["inputs/calib"]
    np.savez(bundle, **arrays)
    print(f"{bundle.name}: optim_size == calib_size, the reconstruction ran on the calibration images (inputs/optim set to them)")


def compare(bundle: Path, fixture: Path) -> bool:
    import numpy as np
    with np.load(bundle) as z:
        got = {k: z[k] for k in z.files}
    with np.load(fixture) as z:
        keys = [k for k in z.files if k != "meta"]
        worst, bad = 0.0, []
        for k in keys:
            ref = z[k]
            if k not in got:
                bad.append(f"{k} (missing)")
                continue
            if got[k].dtype != ref.dtype or got[k].shape != ref.shape or not np.array_equal(got[k], ref):
                diff = float(np.abs(got[k].astype(np.float64) - ref.astype(np.float64)).max()) \
                    if got[k].shape == ref.shape else float("inf")
                worst = max(worst, diff)
                bad.append(f"{k} (max abs diff {diff:.3g})")
    print(f"compare {fixture.name}: {len(keys) - len(bad)}/{len(keys)} arrays bit-identical"
          + ("" if not bad else f"; largest difference {worst:.3g}; apart: " + ", ".join(bad[:20])))
    return not bad


def main() -> None:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=sorted(CONFIGS), default="adalog")
    ap.add_argument("--model", choices=sorted(TIMM_NAMES), default="vit")
    ap.add_argument("--weights", choices=("seeded", "timm", "official"), default=None,
                    help="tests/pins.py's weights: seeded_state_dict, or timm 1.x's init after torch.manual_seed(0) "
                         "(Swin only); or 'official': no --init-weights, timm 0.9.2's init after the official "
                         "seed_all(--seed). Default: seeded for the ViT, timm for the Swin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--calib-size", type=int, default=4)
    ap.add_argument("--eval-size", type=int, default=4)
    ap.add_argument("--optimize", action="store_true")
    ap.add_argument("--optim-size", type=int, default=8)
    ap.add_argument("--iters", type=int, default=None, help="steps per reconstruction unit (default: the code's 20000)")
    ap.add_argument("--reseed", type=int, default=None, help="torch.manual_seed before each reconstruct_model")
    ap.add_argument("--clamp-inclusive", action="store_true", help="torch <= 2.13's clamp gradient at number bounds")
    ap.add_argument("--cfg", type=parse_cfg, default={}, help="config overrides k=v,k=v")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--depth", type=int, default=None, help="deit_tiny only: its first blocks (default all 12)")
    ap.add_argument("--out", type=Path, default=None, help="bundle .npz (default $PEER_ROOT/oracle_out/<name>.npz)")
    ap.add_argument("--compare", type=Path, default=None, help="a fixture .npz to check the bundle against")
    a = ap.parse_args(argv)
    real = a.model == "deit_tiny"
    if a.depth is not None and not real:
        raise SystemExit("--depth is for --model deit_tiny")
    weights = a.weights or ("seeded" if real else tiny.DEFAULT_WEIGHTS[a.model])
    fixture = a.compare.resolve() if a.compare is not None else None  # the base oracle changes directory
    out_dir = Path(os.environ["PEER_ROOT"]) / "oracle_out"
    out = (a.out or out_dir / f"{a.method}_{a.model}_w{a.w_bits}a{a.a_bits}.npz").resolve()
    if REPO in out.parents:
        raise SystemExit(f"{out}: oracle output stays outside the repository")
    if real and weights == "timm":
        raise SystemExit("deit_tiny takes --weights seeded or official")
    init = None if weights == "official" else deit_weights(a.depth, out.parent) if real \
        else tiny.weights_file(a.model, weights, out.parent)

    sys.path.insert(0, str(BASE_ORACLES))
    import _oracle_common as C
    import adalog_family_oracle as base
    C.select_timm("0.9.2")
    import timm
    import timm.models as tm

    def create_model(name, pretrained=False, **kwargs):  # the official main asks for deit_tiny / swin_tiny
        return tiny.build(a.model)

    if not real:
        timm.create_model = tm.create_model = create_model
        batch = C.synthetic_batch
        C.synthetic_batch = lambda seed, n, shape=tiny.IMAGE_SHAPE: batch(seed, n, shape)
    fake_cuda = C.fake_cuda_device

    def fake_cuda_device(*args, **kwargs):
        official_patches(a, C.PEER_ROOT / base.METHODS[a.method][0])
        return fake_cuda(*args, **kwargs)

    C.fake_cuda_device = fake_cuda_device

    sys.argv = [str(BASE_ORACLES / "adalog_family_oracle.py"), "--method", a.method, "--model", TIMM_NAMES[a.model],
                "--seed", str(a.seed), "--w-bits", str(a.w_bits), "--a-bits", str(a.a_bits),
                "--calib-size", str(a.calib_size), "--eval-size", str(a.eval_size), "--threads", str(a.threads),
                "--out", str(out)]
    if init is not None:
        sys.argv += ["--init-weights", str(init)]
    if a.depth is not None:
        sys.argv += ["--depth", str(a.depth)]
    if a.optimize:
        sys.argv += ["--optimize", "--optim-size", str(a.optim_size)]
    if extra:
        sys.argv += ["--", *extra]
    base.main()
    if a.optimize and a.optim_size == a.calib_size:
        same_sets(out)
    if fixture is not None and not compare(out, fixture):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
