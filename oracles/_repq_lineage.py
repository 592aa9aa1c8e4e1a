"""Plumbing shared by the RepQ-ViT-lineage oracle wrappers (I&S-ViT, ERQ, SULQ): ias_oracle.py, erq_oracle.py,
sulq_oracle.py. Nothing here is official code; the wrappers import it from $PEER_ROOT at run time.

* Interpreters: the wrappers run under the peers' venv ($PEER_ROOT/venv/bin/python) with timm 0.4.12 first on the
  path ($PEER_ROOT/timm-0.4.12, the lineage's README version); the FP weights come from tests/pins.py, dumped by the
  repository's own .venv (timm 1.x), so both sides load the same tensors (``weights_file``).
* Models: tests/pins.py's TINY_VIT (same keys in timm 0.4.12 and 1.x) and TINY_SWIN, whose timm 1.x keys are mapped
  into timm 0.4.12's Swin layout (``swin_to_timm0412``: the patch merging sits at the end of stage i in 0.4.12 and at
  the start of stage i + 1 in 1.x; the classifier is ``head`` there and ``head.fc`` here).
* Images: the oracles' convention (shared/oracles/_oracle_common.py): seeded N(0, 1) images of tests/pins.py's
  IMAGE_SHAPE, calibration at seed + 1000, evaluation at seed + 2000.
* ``compare_fixture``: every array of a fixture (all keys but ``meta``) against the new bundle, bit for bit.

Run under the repository's .venv to dump weights:  python oracles/_repq_lineage.py --dump vit|swin --out FILE.pt
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _tiny_models as tiny  # noqa: E402

REPO = HERE.parent
PINS = REPO / "tests" / "pins.py"
PEER_ROOT = Path(os.environ.setdefault("PEER_ROOT", str(REPO.parent / "peers")))
BASE_ORACLES = Path(os.environ.get("BASE_ORACLES", str(REPO.parent / "shared" / "oracles")))
MAIN_PYTHON = os.environ.get("MAIN_PYTHON", str(REPO / ".venv" / "bin" / "python"))
#: timm names the official argument parsers accept, for our tiny models (the model itself is replaced)
OFFICIAL_NAMES = {"vit": "deit_tiny", "swin": "swin_tiny"}


#: tests/pins.py's tiny models and image shape, read from its source by oracles/_tiny_models.py
TINY = {"vit": tiny.TINY_VIT, "swin": tiny.TINY_SWIN}
IMAGE_SHAPE = tiny.IMAGE_SHAPE


# ------------------------------------------------------------------------------------------------ weights
def dump_weights(model: str, out: Path) -> Path:
    """tests/pins.py's weights (the tiny ViT's tiny_vit(), the tiny Swin's seeded_state_dict) as a .pt; run under
    the repository's interpreter."""
    import torch
    sys.path.insert(0, str(PINS.parent))
    import pins
    net = pins.tiny_vit() if model == "vit" else pins.tiny_swin(seeded=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    return out


def weights_file(model: str, directory: Path) -> Path:
    out = Path(directory) / f"repq_lineage_tiny_{model}.pt"
    subprocess.run([MAIN_PYTHON, str(Path(__file__).resolve()), "--dump", model, "--out", str(out)], check=True)
    return out


def swin_to_timm0412(state: dict) -> dict:
    """timm 1.x Swin keys -> timm 0.4.12's: layers.{i}.downsample.* -> layers.{i-1}.downsample.*, head.fc.* -> head.*
    (the sub-patch order of the patch merging, (0,0), (1,0), (0,1), (1,1), is the same in both)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        elif parts[:2] == ["head", "fc"]:
            parts = ["head", *parts[2:]]
        out[".".join(parts)] = value
    return out


def timm1x_name(model: str, key: str) -> str:
    """A timm 0.4.12 parameter or module path as timm 1.x names it (the inverse of ``swin_to_timm0412``), so that a
    Swin bundle reads like our models: layers.{i}.downsample.* -> layers.{i+1}.downsample.*, head.* -> head.fc.*."""
    if model != "swin":
        return key
    parts = key.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[2] == "downsample":
        parts[1] = str(int(parts[1]) + 1)
    elif parts[0] == "head":
        parts = ["head", "fc", *parts[1:]]
    return ".".join(parts)


def learned_state(model: str, state: dict, params: set) -> dict:
    """The state dict's learned tensors (the Swin's index and mask buffers left out) under timm 1.x names."""
    return {timm1x_name(model, k): v for k, v in state.items() if k in params or model != "swin"}


# ------------------------------------------------------------------------------------------ environment
def setup(peer_repo: str, *sub: str, threads: int = 1):
    """timm 0.4.12 and the official repository on sys.path, torchvision stubbed if it does not import; returns the
    organizers' _oracle_common module and the repository's path."""
    sys.path.insert(0, str(BASE_ORACLES))
    import _oracle_common as C
    C.PEER_ROOT = PEER_ROOT
    C.select_timm("0.4.12")
    C.ensure_torchvision_importable()
    repo = C.add_peer_path(peer_repo, *sub)
    import torch
    torch.set_num_threads(threads)
    return C, repo


def tiny_create_model(model: str, weights: Path, drop_path_rate: float | None = None):
    """A replacement for timm.create_model: the tiny model in the imported timm (0.4.12), tests/pins.py's weights
    loaded (every key; the Swin's non-learned index and mask buffers as built)."""
    import timm
    import torch

    def create_model(name, pretrained=False, **kw):
        kwargs = dict(TINY[model])
        if model == "vit":
            from timm.models.vision_transformer import VisionTransformer as cls
        else:
            from timm.models.swin_transformer import SwinTransformer as cls
            kwargs["depths"], kwargs["num_heads"] = tuple(kwargs["depths"]), tuple(kwargs["num_heads"])
            if drop_path_rate is not None:
                kwargs["drop_path_rate"] = drop_path_rate
        net = cls(**kwargs)
        state = torch.load(weights, map_location="cpu")
        if model == "swin":
            state = swin_to_timm0412(state)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith(("relative_position_index", "attn_mask")) for k in missing):
            raise SystemExit(f"weights do not fit timm {timm.__version__}'s tiny {model}: {missing} {unexpected}")
        return net

    return create_model


def full_create_model(weights: Path):
    """A replacement for timm.create_model: the named model of the imported timm (0.4.12), never downloaded, with the
    FP weights of ``weights`` (timm 1.x keys; every key must fit)."""
    import timm
    import torch
    create = timm.create_model

    def create_model(name, pretrained=False, **kw):
        net = create(name, pretrained=False, **kw)
        net.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
        return net

    return create_model


def cuda_to_cpu():
    """The official code's hard-coded 'cuda' on a CPU: .cuda() is a no-op, .to('cuda'...) goes to the CPU."""
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    to = torch.Tensor.to

    def to_cpu(self, *args, **kw):
        args = tuple("cpu" if isinstance(x, str) and x.startswith("cuda") else x for x in args)
        return to(self, *args, **kw)

    torch.Tensor.to = to_cpu


def patch_test_quant(tq, calib, evalx) -> dict:
    """The I/O patches of a lineage ``test_quant`` module (test_quant.py / test_quant_expand.py): ``build_dataset``
    -> one batch of ``calib`` and of ``evalx``; ``build_model`` -> the official build, its FP state, parameter names
    and logits on ``evalx`` captured; ``validate`` -> the quantized logits on ``evalx`` captured (one per call) instead
    of an ImageNet evaluation. Returns the capture: fp_sd, fp_params, fp_logits, logits (list), q_model."""
    import copy

    import torch
    cap: dict = {"logits": []}
    build_model = tq.build_model

    def build_dataset(args):
        return [(calib, torch.zeros(len(calib), dtype=torch.long))], [(evalx, torch.zeros(len(evalx), dtype=torch.long))]

    def build_model_fp(name):
        model = build_model(name).eval()
        cap["fp_sd"] = copy.deepcopy(model.state_dict())
        cap["fp_params"] = {n for n, _ in model.named_parameters()}
        with torch.no_grad():
            cap["fp_logits"] = model(evalx).clone()
        return model

    def validate(args, val_loader, model, criterion, device):
        model.eval()
        with torch.no_grad():
            cap["logits"].append(model(evalx).clone())
        cap["q_model"] = model
        return 0.0, 0.0, 0.0

    tq.build_dataset, tq.build_model, tq.validate = build_dataset, build_model_fp, validate
    return cap


def official_args(tq, a, *extra: str):
    """``tq.get_args_parser()`` on the wrapper's I/O flags (``a``: model, sizes, seed, bits; CPU, no workers) plus
    ``extra`` official flags. A full model is named by its key in the official ``model_zoo``."""
    parser = argparse.ArgumentParser(parents=[tq.get_args_parser()])
    zoo = {timm_name: short for short, timm_name in getattr(tq, "model_zoo", {}).items()}
    return parser.parse_args([
        "--model", OFFICIAL_NAMES.get(a.model) or zoo[a.model], "--dataset", "<synthetic>", "--calib-batchsize", str(a.calib_size),
        "--val-batchsize", str(a.eval_size), "--num-workers", "0", "--device", "cpu", "--seed", str(a.seed),
        "--w_bits", str(a.w_bits), "--a_bits", str(a.a_bits), *extra])


# ------------------------------------------------------------------------------------------------ outputs
def quantizer_tensors(C, model, name: str = "vit") -> dict:
    """Every tensor of every official quantizer (delta, zero_point, SULQ's maxv/minv, the two-part grids and their
    column split), without the ``inited`` flag buffer; module paths as timm 1.x names them."""
    tensors, _ = C.quantizer_state(model)
    return {f"qparam/{timm1x_name(name, k)}": v for k, v in tensors.items() if not k.endswith(".inited")}


def sha256(tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def weight_digests(model, name: str = "vit") -> dict:
    """sha256 of every learned tensor outside the quantizers, in state-dict order (timm 1.x names)."""
    params = {n for n, _ in model.named_parameters()}
    return {timm1x_name(name, k): sha256(v) for k, v in model.state_dict().items() if k in params and "quantizer" not in k}


def compare_fixture(bundle: Path, fixture: Path) -> bool:
    """Every array of the fixture (all keys but ``meta``) equal to the bundle's: dtype, shape and values."""
    import numpy as np
    with np.load(bundle) as got, np.load(fixture) as want:
        keys = [k for k in want.files if k != "meta"]
        bad, worst = [], 0.0
        for k in keys:
            if k not in got.files:
                bad.append(f"{k} (missing)")
                continue
            a, b = got[k], want[k]
            if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) \
                    if a.shape == b.shape and a.dtype.kind == "f" else float("inf")
                worst = max(worst, diff)
                bad.append(f"{k} ({diff:.3g})")
    print(f"compare {fixture.name}: {len(keys) - len(bad)}/{len(keys)} arrays bit-identical"
          + ("" if not bad else f"; largest difference {worst:.3g}; apart: " + ", ".join(bad[:20])))
    return not bad


def common_args(description: str, full_models: bool = False) -> argparse.ArgumentParser:
    """The wrappers' I/O flags; ``full_models``: --model also takes a timm model name (a full model, whose FP weights
    --init-weights gives)."""
    ap = argparse.ArgumentParser(description=description)
    if full_models:
        ap.add_argument("--model", default="vit", help="vit | swin (tests/pins.py's TINY_VIT or TINY_SWIN) or a timm "
                                                       "model name of the official model zoo, e.g. deit_tiny_patch16_224")
        ap.add_argument("--init-weights", type=Path, default=None, help="a full model's FP state dict (timm 1.x keys)")
    else:
        ap.add_argument("--model", choices=("vit", "swin"), default="vit", help="tests/pins.py's TINY_VIT or TINY_SWIN")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--calib-size", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="bundle .npz (+ .json sidecar), outside the repository")
    ap.add_argument("--compare", type=Path, default=None, help="a fixture to check bit for bit against the bundle")
    return ap


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", choices=("vit", "swin"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    print(dump_weights(a.dump, a.out))
