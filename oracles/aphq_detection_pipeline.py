#!/usr/bin/env python
"""APHQ-ViT's whole detection pipeline as the detection fork runs it (GoatWu/APHQ-ViT @ 84c9fde,
Object-Detection/tools/test.py ``main`` with quant_configs/4bit.py: MLP reconstruction, calibration search, block
reconstruction) on a tiny seeded Swin Mask R-CNN and seeded image tensors: the run behind
tests/fixtures/aphq_det_pipeline_*.npz. No official code is copied here; the fork's
mmdet 2.11.0 (``$PEER_ROOT/APHQ-ViT/Object-Detection``) and its ``tools`` are imported at run time.

Interpreter: ``$PEER_ROOT/det2-venv`` (set-up in oracles/README.md): mmcv 1.3.17 installed from its sdist with
``MMCV_WITH_OPS=0`` (pure Python), on top of the peers' venv (torch 2.14.1, numpy, timm) through a .pth file.

Patches (run time, nothing written into the fork):
* ``mmcv._ext``: mmcv 1.3.17 without compiled ops has none, and mmdet 2.11 imports ``mmcv.ops`` everywhere. The
  module put in ``sys.modules`` serves every function of the compiled ``mmcv/_ext`` of the repository's .venv
  (mmcv 2.1.0 built against the same torch 2.14.1 and CPython 3.11; $MMCV_EXT overrides the path): the ops the
  pipeline calls (``nms``, ``roi_align_forward``) are thus the very kernels our mmdet 3 side runs (``nms``, a
  float32 kernel, ranks float64 boxes as float32 copies: in the float64 MLP stage only, where the detections do not
  enter the loss); any other name raises NotImplementedError when called. Likewise mmdet 2.11's ``_do_paste_mask``
  pastes float64 mask logits as float32 copies.
* ``.cuda()`` on tensors and modules returns them unchanged (``_oracle_common.cpu_only_cuda_calls``), and during the
  calibration search torch.cuda reports a fake device of --memory-mib MiB (the conv/matmul searches size their
  candidate chunks from it; outside it the device is reported absent again, since Adam queries a device it is told of).
* Data: the fork's loaders (train2017 through the train pipeline) are replaced by a list of batches
  ``{'img': DC([x]), 'img_metas': DC([[meta]])}`` of seeded N(0, 1) image tensors of the sizes in --sizes, already
  "normalised" and padded (multiples of 32): img_shape = pad_shape = ori_shape, scale_factor 1, no flip. The
  block reconstruction iterates them through a torch DataLoader (``loader``: one base seed drawn from the global
  generator per pass, as the fork's loaders draw). The test.py calls then run as written:
  MLPReconstructor(model, full_model, loader, optim_size).reconstruct_model(pct), wrap_modules_in_net(model, cfg,
  reparam=True, recon=True), QuantCalibrator(model, loader, 1).batching_quant_calib(), BlockReconstructor (below).
  optim_size = the number of images; the MLP reconstruction's 20000 iterations become --mlp-iters (the default
  argument of ``reconstruct_single_block`` rebound; lr 4e-5 and the loss as written).
* The MLP reconstruction runs in float64 (--mlp-dtype; model, FP copy and images cast, then back to float32 for the
  calibration): its Hessian is float rounding (a constant ±ε on an FFN output is removed by the next LayerNorm), and
  in float64 the rest of the stage can be compared at all.
* The tiny detector: the fork's configs/swin/mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco.py
  shrunk (``TINY``: embed_dim 8, depths 2,2,2,2, heads 1,2,2,4, window 2, FPN 16, RPN test nms_pre 60 /
  max_per_img 30, rcnn score_thr 0 / max_per_img 8), built with ``torch.manual_seed(--seed)`` and
  ``init_weights()``, then ``rpn_head.rpn_cls.bias = 1`` (objectness > 0.7 somewhere on every image: the Hessian's
  box term needs it). Window 2 and the default sizes 64x64, 64x128 leave no window padded at any stage; 64x96,96x160
  pad the last stage's windows.

Bundle keys (module names the fork's: mmdet 2 Swin ``backbone.layers.N.blocks.M.attn.qkv``, ``mlp.fc1``...):
``state/<key>`` the tiny detector's weights (also a checkpoint at --state); ``fp/backbone/<i>/<level>``,
``fp/proposals/<i>`` (x1, y1, x2, y2, score), ``fp/roi_cls/<i>``, ``fp/roi_reg/<i>`` (the box head on those
proposals), ``fp/dets/<i>`` (boxes, score, class; listed by class as mmdet 2 returns them); after the MLP
reconstruction ``mlp/<block>/{fc1,fc2}_{weight,bias}`` (float32), ``mlp/<block>/ub`` and the Hessians it trained
with ``mlp/<block>/h/<i>``; after the calibration search ``calib/<module>/<w|a|A|B>_{scale,zp}`` of every quantizer,
``calib/<module>/bias`` of every quantized layer and ``calib/<norm>/{weight,bias}`` of every LayerNorm (folded
ones included). Debug options add ``--mlp-data`` (each FFN's inputs and FP outputs), ``--calib-weights`` (weight
matrices), ``--calib-inputs`` (the inputs the calibrator hands named layers). The images' sha256 is in the meta.

The third stage (``--stages``, default mlp,calib,recon) runs ``BlockReconstructor`` as test.py does
(``wrap_quantizers_in_net``, ``reconstruct_model(quant_act=True, mode='qdrop', ...)``, the 4bit.py metric
hessian_perturb) with --recon-iters steps per unit (the default argument rebound), --drop-prob and --quant-ratio
(4bit.py's 0.5 and 0.5 by default; 1 and 1 turn QDrop's dropping off), and writes ``recon/<unit>/h/<i>`` (the unit's
Hessians), ``recon/<layer>/codes`` (int8 rounded weight codes ``round(weight / w_scale)`` after the hard rounding)
and ``recon/<layer>/<a|A|B>_scale`` (the learned steps). The fork draws QDrop's masks with ``rand_like`` from the
global generator, seeded --seed right before ``BlockReconstructor`` (and drawn from by each loader pass).

  PEER_ROOT=/work/peers /work/peers/det2-venv/bin/python oracles/aphq_detection_pipeline.py \\
      --out /work/peers/oracle_out/aphq_det_pipeline_w4a4.npz                  (APHQ-ViT)
  ... --stages calib,recon --optim-metric mse --out .../aphq_det_pipeline_qdrop_w4a4.npz   (QDrop: no MLP stage)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_ROOT = Path(os.environ.setdefault("PEER_ROOT", str(REPO.parent / "peers")))
FORK = PEER_ROOT / "APHQ-ViT" / "Object-Detection"
MMCV_EXT = Path(os.environ.get("MMCV_EXT", str(REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "mmcv"
                                            / "_ext.cpython-311-x86_64-linux-gnu.so")))
CONFIG = FORK / "configs" / "swin" / "mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco.py"
SOURCE_COMMIT = "84c9fde5fbdf9fc85561ab7c0898b75c8e5ec381"
DET2_PYTHON = PEER_ROOT / "det2-venv" / "bin" / "python"

TINY = dict(
    backbone=dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=2, drop_path_rate=0.0,
                  ape=False, patch_norm=True, use_checkpoint=False),
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=16),
        bbox_head=dict(in_channels=16, fc_out_channels=32),
        mask_roi_extractor=dict(out_channels=16),
        mask_head=dict(in_channels=16, conv_out_channels=16)),
    test_cfg=dict(rpn=dict(nms_pre=60, max_per_img=30), rcnn=dict(score_thr=0.0, max_per_img=8)),
)


def install_ext() -> None:
    """``mmcv._ext`` served from the compiled mmcv 2.1.0 extension (module docstring)."""
    import torch  # noqa: F401  (the extension links against libtorch)
    spec = importlib.util.spec_from_file_location("_ext", MMCV_EXT)
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)

    class Ext(types.ModuleType):
        def __getattr__(self, name: str):
            if name == "nms":  # float32 only: float64 boxes (the float64 MLP stage) are ranked as float32 copies
                return lambda boxes, scores, **k: real.nms(boxes.float(), scores.float(), **k)
            if hasattr(real, name):
                return getattr(real, name)

            def missing(*_a, **_k):
                raise NotImplementedError(f"mmcv._ext.{name} is not served by the oracle's stand-in")
            return missing

    sys.modules["mmcv._ext"] = Ext("mmcv._ext")


def paste_masks_as_float32() -> None:
    """mmdet 2.11's mask pasting builds a float32 grid: float64 mask logits are pasted as float32 copies (the float64
    MLP stage only; the pasted masks enter no loss)."""
    from mmdet.models.roi_heads.mask_heads import fcn_mask_head
    paste = fcn_mask_head._do_paste_mask
    fcn_mask_head._do_paste_mask = lambda masks, boxes, *a, **k: paste(masks.float(), boxes.float(), *a, **k)


def setup(memory_mib: float, threads: int):
    sys.path.insert(0, str(HERE))
    import _repq_lineage as L
    C, _ = L.setup("APHQ-ViT", "Object-Detection", "tools", threads=threads)
    C.cpu_only_cuda_calls()
    install_ext()
    sys.path.insert(0, str(FORK))
    sys.path.insert(0, str(FORK / "tools"))
    paste_masks_as_float32()
    return C


def build_model(seed: int):
    import torch
    from mmcv import Config
    from mmdet.models import build_detector
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict({"model": TINY})
    cfg.model.pretrained = None
    torch.manual_seed(seed)
    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    with torch.no_grad():
        model.rpn_head.rpn_cls.bias.fill_(1.0)
    return model.eval()


def as_dtype(batches, dtype):
    """The same batches with the image tensors cast (the metas shared)."""
    from mmcv.parallel import DataContainer as DC
    return [{"img": DC([x.to(dtype) for x in b["img"].data]), "img_metas": b["img_metas"]} for b in batches]


def images(seed: int, sizes: list[tuple[int, int]]):
    import numpy as np
    import torch
    from mmcv.parallel import DataContainer as DC
    g = torch.Generator().manual_seed(seed + 1000)
    xs, batches = [], []
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=g)
        meta = {"filename": None, "ori_filename": None, "ori_shape": (h, w, 3), "img_shape": (h, w, 3),
                "pad_shape": (h, w, 3), "scale_factor": np.ones(4, dtype=np.float32), "flip": False,
                "flip_direction": None, "img_norm_cfg": {}}
        xs.append(x)
        batches.append({"img": DC([x]), "img_metas": DC([[meta]], cpu_only=True)})
    return xs, batches


def loader(batches):
    """The batches through a torch DataLoader (batch 1, in order, no workers): like the fork's loaders, each pass
    draws one base seed from the global generator, which QDrop's masks also draw from."""
    from torch.utils.data import DataLoader
    return DataLoader(batches, batch_size=1, shuffle=False, num_workers=0, collate_fn=lambda items: items[0])


def detections(model, batches) -> list:
    import numpy as np
    import torch
    out = []
    with torch.no_grad():
        for b in batches:
            result = model(img=b["img"].data, img_metas=b["img_metas"].data, return_loss=False)[0]
            bbox = result[0] if isinstance(result, tuple) else result
            rows = [np.concatenate([r, np.full((len(r), 1), c, np.float32)], 1) for c, r in enumerate(bbox) if len(r)]
            out.append(np.concatenate(rows) if rows else np.zeros((0, 6), np.float32))
    return out


def detector_outputs(model, xs, batches, prefix: str) -> dict:
    """Each image's ``<prefix>/backbone/<i>/<level>``, ``<prefix>/proposals/<i>`` (x1, y1, x2, y2, score),
    ``<prefix>/roi_cls/<i>`` and ``<prefix>/roi_reg/<i>`` (the box head on those proposals) and ``<prefix>/dets/<i>``."""
    import torch
    from mmdet.core import bbox2roi
    out = {}
    with torch.no_grad():
        for i, x in enumerate(xs):
            feats = model.backbone(x)
            for k, f in enumerate(feats):
                out[f"{prefix}/backbone/{i}/{k}"] = f
            neck = model.neck(feats)
            proposals = model.rpn_head.simple_test_rpn(neck, batches[i]["img_metas"].data[0])
            out[f"{prefix}/proposals/{i}"] = proposals[0]
            roi = model.roi_head._bbox_forward(neck, bbox2roi([p[:, :4] for p in proposals]))
            out[f"{prefix}/roi_cls/{i}"], out[f"{prefix}/roi_reg/{i}"] = roi["cls_score"], roi["bbox_pred"]
    for i, d in enumerate(detections(model, batches)):
        out[f"{prefix}/dets/{i}"] = d
    return out


def quantizer_arrays(model, prefix: str, weights: bool) -> dict:
    import torch
    out = {}
    for name, m in model.named_modules():
        for q in ("w_quantizer", "a_quantizer", "A_quantizer", "B_quantizer"):
            quant = getattr(m, q, None)
            if quant is None or not getattr(quant, "inited", False):
                continue
            out[f"{prefix}/{name}/{q[0]}_scale"] = torch.as_tensor(quant.scale).detach().clone()
            if getattr(quant, "zero_point", None) is not None:
                out[f"{prefix}/{name}/{q[0]}_zp"] = torch.as_tensor(quant.zero_point).detach().clone()
        if isinstance(m, torch.nn.LayerNorm) or hasattr(m, "w_quantizer"):
            if weights or isinstance(m, torch.nn.LayerNorm):
                out[f"{prefix}/{name}/weight"] = m.weight.detach().clone()
            if m.bias is not None:
                out[f"{prefix}/{name}/bias"] = m.bias.detach().clone()
    return out


def run(a: argparse.Namespace) -> dict:
    import copy

    import numpy as np
    import torch
    from torch import nn
    C = setup(a.memory_mib, a.threads)
    import quant_utils.mlp_recon as mlp_recon
    from quant_utils.calibrator import QuantCalibrator
    from quant_utils.wrap_net import wrap_modules_in_net
    sys.path.insert(0, str(FORK / "tools" / "quant_configs"))
    from importlib import import_module
    quant_cfg = import_module("4bit").Config()
    quant_cfg.optim_size = len(a.sizes)
    quant_cfg.optim_metric = a.optim_metric

    model = build_model(a.seed)
    if a.state:
        a.state.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"meta": {"mmdet_version": "2.11.0", "seed": a.seed}, "state_dict": model.state_dict()}, a.state)
    xs, batches = images(a.seed, a.sizes)
    out: dict = {f"state/{k}": v for k, v in model.state_dict().items()}
    import hashlib
    images_sha256 = hashlib.sha256(b"".join(x.numpy().tobytes() for x in xs)).hexdigest()
    out.update(detector_outputs(model, xs, batches, "fp"))

    full_model = copy.deepcopy(model).eval()
    if "mlp" in a.stages:
        for name, module in model.named_modules():
            if name.split('.')[-1] == 'mlp':
                module.act = nn.ReLU()
        ubs = []
        percentile = mlp_recon.positive_percentile
        mlp_recon.positive_percentile = lambda t, pct: ubs.append(percentile(t, pct)) or ubs[-1]
        defaults = list(mlp_recon.MLPReconstructor.reconstruct_single_block.__defaults__)
        defaults[1] = a.mlp_iters  # (batch_size, iters, lr, p)
        mlp_recon.MLPReconstructor.reconstruct_single_block.__defaults__ = tuple(defaults)
        train = mlp_recon.MLPReconstructor.reconstruct_single_block

        def recorded(self, name, block, device, ub, *args, **kwargs):
            for i, h in enumerate(block.mlp.raw_grad):  # the Hessians it trains with (one per image)
                out[f"mlp/{name}/h/{i}"] = h.clone()
            if a.mlp_data:  # and its inputs and FP outputs
                for i, (x, y) in enumerate(zip(block.mlp.raw_input, block.mlp.raw_out)):
                    out.update({f"mlp/{name}/x/{i}": x.clone(), f"mlp/{name}/y/{i}": y.clone()})
            return train(self, name, block, device, ub, *args, **kwargs)

        mlp_recon.MLPReconstructor.reconstruct_single_block = recorded
        torch.manual_seed(a.seed)
        dtype = getattr(torch, a.mlp_dtype)
        model.to(dtype), full_model.to(dtype)
        rec = mlp_recon.MLPReconstructor(model, full_model, as_dtype(batches, dtype), quant_cfg.optim_size,
                                         metric=quant_cfg.optim_metric)
        rec.reconstruct_model(pct=quant_cfg.pct)
        for (name, block), ub in zip(rec.blocks.items(), ubs):
            for fc in ("fc1", "fc2"):  # written as float32 (the fixture's size; the float64 runs agree far closer)
                out[f"mlp/{name}/{fc}_weight"] = getattr(block.mlp, fc).weight.detach().float()
                out[f"mlp/{name}/{fc}_bias"] = getattr(block.mlp, fc).bias.detach().float()
            out[f"mlp/{name}/ub"] = np.float64(ub)
        model.float(), full_model.float()
        for i, d in enumerate(detections(model, batches)):
            out[f"mlp/dets/{i}"] = d
    if "calib" in a.stages:
        real_available = torch.cuda.is_available
        C.fake_cuda_device(a.memory_mib / 1024)  # only for the searches: Adam asks the device once it says "available"
        wrap_modules_in_net(model, quant_cfg, reparam=True, recon="mlp" in a.stages)
        model.eval()
        if a.calib_inputs:  # each searched layer's inputs and outputs, as the calibrator hands them over
            names = {id(m): n for n, m in model.named_modules()}
            for cls in {type(m) for m in model.modules() if hasattr(m, "hyperparameter_searching")}:
                def searching(self, _search=cls.hyperparameter_searching):
                    name = names[id(self)]
                    if any(name.endswith(x) for x in a.calib_inputs) and f"calib_in/{name}/0" not in out:
                        # (the first call: a subclass's search calls its parent's, on tensors it has changed)
                        xs = self.raw_input if isinstance(self.raw_input, list) else [self.raw_input]
                        for k, x in enumerate(xs):
                            out[f"calib_in/{name}/{k}"] = (x if isinstance(x, torch.Tensor) else x[0]).clone()
                    return _search(self)
                cls.hyperparameter_searching = searching
        QuantCalibrator(model, batches, quant_cfg.calib_size // quant_cfg.calib_batch_size).batching_quant_calib()
        torch.cuda.is_available = real_available
        out.update(quantizer_arrays(model, "calib", a.calib_weights))
    if "recon" in a.stages:
        import quant_utils.block_recon as block_recon
        from quant_layers import MinMaxQuantLinear
        rec_defaults = list(block_recon.BlockReconstructor.reconstruct_single_block.__defaults__)
        rec_defaults[1] = a.recon_iters  # (batch_size, iters, weight, b_range, warmup, lr, p, ...)
        block_recon.BlockReconstructor.reconstruct_single_block.__defaults__ = tuple(rec_defaults)
        grads = block_recon.BlockReconstructor.init_block_raw_grad

        def recorded_grads(self, block, full_block, name, device):
            grads(self, block, full_block, name, device)
            for i, h in enumerate(block.raw_grad):
                out[f"recon/{name}/h/{i}"] = h.clone()

        block_recon.BlockReconstructor.init_block_raw_grad = recorded_grads
        if a.clamp_inclusive:
            from _inclusive_clamp import inclusive_clamp
            inclusive_clamp()
        torch.manual_seed(a.seed)
        rec = block_recon.BlockReconstructor(model, full_model, loader(batches), quant_cfg.optim_size,
                                             metric=quant_cfg.optim_metric, keep_gpu=False)
        rec.wrap_quantizers_in_net()
        rec.reconstruct_model(quant_act=True, mode=quant_cfg.optim_mode, drop_prob=a.drop_prob, quant_ratio=a.quant_ratio)
        for name, m in model.named_modules():
            if not hasattr(m, "w_quantizer") or not any(name.startswith(b) for b in rec.blocks):
                continue
            w = m.weight.detach()
            view = w.view(m.n_V, m.crb_rows, m.in_features) if isinstance(m, MinMaxQuantLinear) else w.view(w.shape[0], -1)
            out[f"recon/{name}/codes"] = (view / m.w_quantizer.scale).round().to(torch.int8).view(w.shape)
            for q in ("a_quantizer", "A_quantizer", "B_quantizer"):
                quant = getattr(m, q, None)
                if quant is not None and getattr(quant, "inited", False):
                    out[f"recon/{name}/{q[0]}_scale"] = quant.scale.detach().clone()
        for name, m in model.named_modules():
            for q in ("A_quantizer", "B_quantizer"):
                quant = getattr(m, q, None)
                if quant is not None and any(name.startswith(b) for b in rec.blocks):
                    out[f"recon/{name}/{q[0]}_scale"] = quant.scale.detach().clone()
    bundle = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in out.items()}
    argv, skip = [], False
    for arg in sys.argv[1:]:  # the command without its output paths
        if skip:
            skip = False
        elif arg in ("--out", "--state"):
            skip = True
        else:
            argv.append(arg)
    meta = {"oracle": " ".join(["oracles/aphq_detection_pipeline.py", *argv]),
            "source": f"GoatWu/APHQ-ViT @ {SOURCE_COMMIT} Object-Detection (mmdet 2.11.0 + tools/), "
                      "mmcv 1.3.17 without ops, via oracles/aphq_detection_pipeline.py",
            "seed": a.seed, "sizes": a.sizes, "images_sha256": images_sha256, "tiny": TINY, "stages": a.stages, "mlp_iters": a.mlp_iters, "recon_iters": a.recon_iters, "drop_prob": a.drop_prob,
            "quant_ratio": a.quant_ratio, "mlp_dtype": a.mlp_dtype,
            "memory_mib": a.memory_mib, "quant_config": {k: v for k, v in vars(quant_cfg).items()},
            "threads": a.threads}
    bundle["meta"] = np.array(json.dumps(meta))
    return bundle


def reexec_under_det2() -> None:
    """Run under $PEER_ROOT/det2-venv when the interpreter has no mmcv 1.x (oracles/check_fixtures.py starts every
    oracle with the peers' venv)."""
    try:
        import mmcv
        if mmcv.__version__.startswith("1."):
            return
    except ImportError:
        pass
    if DET2_PYTHON.exists() and Path(sys.executable) != DET2_PYTHON:
        os.execv(str(DET2_PYTHON), [str(DET2_PYTHON), *sys.argv])
    raise SystemExit(f"mmcv 1.x is needed: set up {DET2_PYTHON} (oracles/README.md)")


def image_sizes(text: str) -> list[tuple[int, int]]:
    """``HxW,HxW,...`` as a list of (H, W)."""
    return [tuple(int(v) for v in hw.split("x")) for hw in text.split(",")]


def write_bundle(out: Path, bundle: dict) -> None:
    import numpy as np
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **bundle)
    print(f"wrote {out}: {len(bundle) - 1} arrays")


def main() -> None:
    reexec_under_det2()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--state", type=Path, help="also save the tiny detector's mmdet-2 state dict (a checkpoint) here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=image_sizes, default=[(64, 64), (64, 128)], help="HxW,HxW,... (multiples of 32)")
    p.add_argument("--stages", type=lambda s: s.split(","), default=["mlp", "calib", "recon"])
    p.add_argument("--mlp-iters", type=int, default=4)
    p.add_argument("--optim-metric", default="hessian_perturb", choices=["hessian_perturb", "mse"],
                   help="4bit.py's hessian_perturb (APHQ-ViT), or mse (QDrop, with --stages calib,recon)")
    p.add_argument("--recon-iters", type=int, default=4, help="block reconstruction steps per unit (the fork: 20000)")
    p.add_argument("--clamp-inclusive", action="store_true",
                   help="block reconstruction with torch <= 2.13's clamp gradient (the README's torch 1.10)")
    p.add_argument("--drop-prob", type=float, default=0.5, help="4bit.py's 0.5 (1: no activation dropped)")
    p.add_argument("--quant-ratio", type=float, default=0.5, help="4bit.py's 0.5 (1: the quantized unit input only)")
    p.add_argument("--mlp-data", action="store_true", help="also write each FFN's training inputs and targets")
    p.add_argument("--calib-weights", action="store_true", help="also write every quantized layer's weight matrix")
    p.add_argument("--calib-inputs", type=lambda s: s.split(","), default=[],
                   help="layers (name suffixes) whose search inputs are written too (calib_in/<layer>/<k>)")
    p.add_argument("--mlp-dtype", default="float64", choices=["float32", "float64"],
                   help="the MLP reconstruction's dtype (its Hessian is float32 rounding noise on a tiny random model)")
    p.add_argument("--memory-mib", type=float, default=256)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    write_bundle(a.out, run(a))


if __name__ == "__main__":
    main()
