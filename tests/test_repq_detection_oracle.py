"""Our ``repq_vit`` on a Swin detector against RepQ-ViT's detection fork (zkkli/RepQ-ViT ``detection/``
tools/test.py ~195-270), through oracles/repq_detection_pipeline.py's fixture repq_det_pipeline_w4a4: the tiny seeded
Swin Mask R-CNN, calibrated on the first image (96x160: the last stage's windows padded) as our COCO protocol does.

The folded LayerNorm and next-layer weights are compared after mmdet's own mmdet-2 -> mmdet-3 conversion
(``tasks.coco.convert_mmdet2_swin``: patch merging's channel order). Stage 0 is bit-exact; later stages differ by
float rounding (~1e-6 relative) because the two Swin implementations order float operations differently (mmdet 3's
nn.Unfold patch merging and attention vs the fork's), which moves the calibrated deltas by an ulp.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

import test_aphq_detection_oracle as T  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "repq_det_pipeline_w4a4.npz"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from ptq_bench.methods import BitWidth, build_method

    with np.load(FIXTURE) as z:
        arrays = dict(z)
    meta = json.loads(str(arrays.pop("meta")))
    meta["sizes"] = [tuple(int(v) for v in s.split("x")) for s in meta["sizes"].split(",")]
    model = T.fork_model(arrays, tmp_path_factory.mktemp("repq_det"))
    data = T.calibration_data(T.oracle_images(meta))
    model = build_method("repq_vit", BitWidth(4, 4)).quantize(model, data.__class__(
        data.samples[:1], data.forward, collate=data.collate, identity=data.identity, uniform_shapes=False))
    return model, arrays


def test_folded_weights_match_the_fork(calibrated) -> None:
    from tasks.coco import convert_mmdet2_swin

    model, arrays = calibrated
    fold = {k[len("fold/"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("fold/")}
    # the fork gives reduction a bias (mmdet's converter knows only its weight; a bias is not permuted)
    biases = {k.replace("backbone.layers.", "backbone.stages."): v for k, v in fold.items() if k.endswith("reduction.bias")}
    want = {**convert_mmdet2_swin({k: v for k, v in fold.items() if k not in biases and "reduction.bias" not in k}), **biases}
    ours = model.state_dict()
    rel = {k: T.relative(ours[k].numpy(), v.numpy()) for k, v in want.items()}
    assert len(rel) == 76
    assert all(rel[k] == 0.0 for k in rel if ".stages.0.blocks." in k)
    assert max(rel.values()) < 1e-5, max(rel.items(), key=lambda kv: kv[1])
