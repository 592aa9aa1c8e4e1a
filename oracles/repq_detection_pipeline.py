"""RepQ-ViT's detection fork (zkkli/RepQ-ViT ``detection/``) quantizing the tiny seeded Swin Mask R-CNN.

The fork (a vendored mmdet 2.11, Swin-Transformer-Object-Detection) runs under ``$PEER_ROOT/det2-venv`` exactly as
oracles/aphq_detection_pipeline.py does (its setup, tiny config, seeded images and re-exec are imported from there;
the tiny config is built from the RepQ fork's own ``configs/swin/mask_rcnn_swin_tiny_..._1x_coco.py``).

It runs tools/test.py's ``main`` itself (``run``: only its I/O is patched, nothing of the fork is restated):
``quant.quant_model`` with ``{'n_bits': w, 'channel_wise': True}`` / ``{'n_bits': a, 'channel_wise': False}``,
``set_quant_state(.., True, True)``, one calibration forward of the FIRST image, its inline scale reparameterization
over ``backbone.layers`` (norm1 -> attn.qkv, norm2 -> mlp.fc1, downsample.norm -> reduction), then a re-calibration
forward of the same image and ``single_gpu_test`` over every image.

Bundle: ``state/*`` (the FP mmdet-2 weights); ``fp/*`` and ``q/*``, the FP and the quantized detector's outputs on
every image (``aphq_detection_pipeline.detector_outputs``: backbone features, RPN proposals, the box head on them,
the detections); every quantizer's ``delta``/``zero_point`` after calibration (``calib/*``) and after re-calibration
(``quant/*``); the folded LayerNorm weights/biases and the changed next-layer weights/biases (``fold/*``).
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


def folded(model) -> dict:
    """The LayerNorms that tools/test.py's scale reparameterization rewrites and their next layers' weights and biases
    (norm1 -> attn.qkv, norm2 -> mlp.fc1, downsample.norm -> reduction), in the order its loop visits them."""
    out = {}
    for name, module in model.backbone.layers.named_modules():
        if "norm" not in name:
            continue
        father = name[:name.rfind(".")]
        nxt = father + (".attn.qkv" if "norm1" in name else ".mlp.fc1" if "norm2" in name else ".reduction")
        layer = model.backbone.layers.get_submodule(nxt)
        for k, v in ((f"{name}.weight", module.weight), (f"{name}.bias", module.bias),
                     (f"{nxt}.weight", layer.weight), (f"{nxt}.bias", layer.bias)):
            out[f"fold/backbone.layers.{k}"] = v.detach().numpy().copy()
    return out


def fork_test_module():
    """tools/test.py loaded under its own name (``test`` would be the standard library's package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("repq_detection_test", FORK / "tools" / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(a: argparse.Namespace) -> dict:
    """tools/test.py's ``main`` as written, its I/O patched: the tiny seeded detector for build_detector and the
    checkpoint, the seeded images for the dataset and loader, a CPU stand-in for MMDataParallel that records the
    quantizers after the first (calibration) forward and the folded weights before the second (re-calibration),
    and single_gpu_test recording the quantizers and the quantized detector's outputs."""
    import numpy as np
    import torch
    setup(a.threads)
    fork = fork_test_module()
    model = A.build_model(a.seed)
    xs, batches = A.images(a.seed, a.sizes)
    out: dict = {f"state/{k}": v.numpy() for k, v in model.state_dict().items()}
    out.update(A.detector_outputs(model, xs, batches, "fp"))

    class Dataset(list):
        CLASSES = tuple(str(c) for c in range(80))

        def evaluate(self, outputs, **_):
            return {}

    class Loader(list):
        dataset = Dataset(batches)

    class Parallel(torch.nn.Module):
        """MMDataParallel on the CPU: the DataContainers unwrapped as its scatter does for one device."""

        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, return_loss, rescale, img, img_metas):
            self.calls += 1
            if self.calls == 2:  # after the reparameterization, before the re-calibration
                out.update(folded(self.module))
            result = self.module(return_loss=return_loss, rescale=rescale, img=img.data, img_metas=img_metas.data)
            if self.calls == 1:
                out.update(quantizers(self.module, "calib"))
            return result

    def tested(q_model, *_a, **_k):
        out.update(quantizers(q_model.module, "quant"))
        out.update(A.detector_outputs(q_model.module, xs, batches, "q"))
        return []

    fork.build_dataset = lambda cfg: Loader.dataset
    fork.build_dataloader = lambda dataset, **_: Loader(batches)
    fork.build_detector = lambda cfg, **_: model
    fork.load_checkpoint = lambda *_a, **_k: {}
    fork.MMDataParallel = Parallel
    fork.single_gpu_test = tested
    argv = sys.argv
    sys.argv = ["test.py", str(A.CONFIG), "tiny-seeded.pth", "--eval", "bbox",
                "--w_bits", str(a.w_bits), "--a_bits", str(a.a_bits)]
    try:
        fork.main()
    finally:
        sys.argv = argv
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
