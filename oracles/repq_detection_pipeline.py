"""RepQ-ViT's detection fork (zkkli/RepQ-ViT ``detection/``) quantizing the tiny seeded Swin Mask R-CNN.

The fork (a vendored mmdet 2.11, Swin-Transformer-Object-Detection) runs under ``$PEER_ROOT/det2-venv`` exactly as
oracles/aphq_detection_pipeline.py does (its setup, tiny config, seeded images and re-exec are imported from there;
the tiny config is built from the RepQ fork's own ``configs/swin/mask_rcnn_swin_tiny_..._1x_coco.py``).

The steps are tools/test.py's (lines ~195-270) as run: ``quant.quant_model`` with ``{'n_bits': w, 'channel_wise':
True}`` / ``{'n_bits': a, 'channel_wise': False}``, ``set_quant_state(.., True, True)``, one calibration forward of
the FIRST image, the scale reparameterization over ``backbone.layers`` (norm1 -> attn.qkv, norm2 -> mlp.fc1,
downsample.norm -> reduction), then a re-calibration forward of the same image. test.py writes the
reparameterization as an inline loop in ``main``; ``reparameterize`` re-expresses that loop only (nothing else of
the fork is restated). Bundle: ``state/*`` (the FP mmdet-2 weights); ``fp/*`` and ``q/*``, the FP and the quantized
detector's outputs on every image (``aphq_detection_pipeline.detector_outputs``: backbone features, RPN proposals,
the box head on them, the detections); every quantizer's ``delta``/``zero_point`` after calibration (``calib/*``)
and after re-calibration (``quant/*``); the folded LayerNorm weights/biases and the changed next-layer
weights/biases (``fold/*``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import aphq_detection_pipeline as A  # noqa: E402

FORK = A.PEER_ROOT / "RepQ-ViT" / "detection"
A.FORK = FORK
A.CONFIG = FORK / "configs" / "swin" / "mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco.py"


def setup(threads: int):
    """The fork on sys.path with the det2 stand-ins (aphq_detection_pipeline.setup's recipe, RepQ-ViT's fork)."""
    import _repq_lineage as L
    C, _ = L.setup("RepQ-ViT", "detection", "tools", threads=threads)
    C.cpu_only_cuda_calls()
    A.install_ext()
    sys.path.insert(0, str(FORK))
    sys.path.insert(0, str(FORK / "tools"))
    return C


def quantizers(model, prefix: str) -> dict:
    """Every quantizer's state (delta, zero_point) by module name."""
    import numpy as np
    out = {}
    for name, m in model.named_modules():
        for k in ("delta", "zero_point"):
            v = getattr(m, k, None)
            if v is not None and hasattr(m, "n_bits"):
                out[f"{prefix}/{name}/{k}"] = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
    return out


def reparameterize(model) -> dict:
    """tools/test.py's inline scale reparameterization loop, re-expressed (the fork has it in ``main`` only)."""
    import torch
    from torch.nn import Parameter
    out = {}
    for name, module in model.backbone.layers.named_modules():
        if not ("norm1" in name or "norm2" in name or "norm" in name):
            continue
        father = model.backbone.layers.get_submodule(name[:name.rfind(".")])
        nxt = father.attn.qkv if "norm1" in name else father.mlp.fc1 if "norm2" in name else father.reduction
        delta = nxt.input_quantizer.delta.reshape(-1)
        zp = nxt.input_quantizer.zero_point.reshape(-1)
        t_delta, t_zp = torch.mean(delta), torch.mean(zp)
        r = delta / t_delta
        b = (-zp * delta) / r - (-t_zp * t_delta)
        module.weight.data = module.weight.data / r
        module.bias.data = module.bias.data / r - b
        nxt.weight.data = nxt.weight.data * r
        if nxt.bias is not None:
            nxt.bias.data = nxt.bias.data + torch.mm(nxt.weight.data, b.reshape(-1, 1)).reshape(-1)
        else:
            nxt.bias = Parameter(torch.Tensor(nxt.out_features))
            nxt.bias.data = torch.mm(nxt.weight.data, b.reshape(-1, 1)).reshape(-1)
        nxt.input_quantizer.channel_wise = False
        nxt.input_quantizer.delta = t_delta
        nxt.input_quantizer.zero_point = t_zp
        nxt.weight_quantizer.inited = False
        nxt_name = name[:name.rfind(".")] + (".attn.qkv" if "norm1" in name else ".mlp.fc1" if "norm2" in name
                                             else ".reduction")
        for k, v in ((f"{name}.weight", module.weight), (f"{name}.bias", module.bias),
                     (f"{nxt_name}.weight", nxt.weight), (f"{nxt_name}.bias", nxt.bias)):
            out[f"fold/backbone.layers.{k}"] = v.detach().numpy().copy()
    return out


def run(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    setup(a.threads)
    from quant.quant_model import quant_model, set_quant_state
    model = A.build_model(a.seed)
    xs, batches = A.images(a.seed, a.sizes)
    out: dict = {f"state/{k}": v.numpy() for k, v in model.state_dict().items()}
    out.update(A.detector_outputs(model, xs, batches, "fp"))
    q = quant_model(model, input_quant_params={"n_bits": a.a_bits, "channel_wise": False},
                    weight_quant_params={"n_bits": a.w_bits, "channel_wise": True}).eval()
    calib = batches[0]
    set_quant_state(q, input_quant=True, weight_quant=True)
    with torch.no_grad():
        q(img=calib["img"].data, img_metas=calib["img_metas"].data, return_loss=False, rescale=True)
    out.update(quantizers(q, "calib"))
    with torch.no_grad():
        out.update(reparameterize(q))
    set_quant_state(q, input_quant=True, weight_quant=True)
    with torch.no_grad():
        q(img=calib["img"].data, img_metas=calib["img_metas"].data, return_loss=False, rescale=True)
    out.update(quantizers(q, "quant"))
    out.update(A.detector_outputs(q, xs, batches, "q"))
    sizes = ",".join(f"{h}x{w}" for h, w in a.sizes)
    meta = {"source": "zkkli/RepQ-ViT detection/tools/test.py", "w_bits": a.w_bits, "a_bits": a.a_bits,
            "seed": a.seed, "sizes": sizes,
            "images_sha256": hashlib.sha256(b"".join(x.numpy().tobytes() for x in xs)).hexdigest(),
            "oracle": f"oracles/repq_detection_pipeline.py --sizes {sizes} --w-bits {a.w_bits} --a-bits {a.a_bits}"}
    out["meta"] = np.array(json.dumps(meta))
    return out


def main() -> None:
    A.reexec_under_det2()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=A.image_sizes, default=[(96, 160), (64, 96)], help="HxW,... (multiples of 32; the first is the calibration image)")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    A.write_bundle(a.out, run(a))


if __name__ == "__main__":
    main()
