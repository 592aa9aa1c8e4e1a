"""Our ``repq_vit`` on a Swin detector against RepQ-ViT's detection fork (zkkli/RepQ-ViT ``detection/``
tools/test.py ~195-270), through oracles/repq_detection_pipeline.py's fixture repq_det_pipeline_w4a4: the tiny seeded
Swin Mask R-CNN, calibrated on the first image (96x160: the last stage's windows padded) as our COCO protocol does.

Compared: every quantizer (280 arrays), the folded weights and the quantized detector's outputs (backbone features, RPN
proposals, the box head on them, the detections). The folded LayerNorm
and next-layer weights are compared after mmdet's own mmdet-2 -> mmdet-3 conversion
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
    return model, arrays, data


def test_folded_weights_match_the_fork(calibrated) -> None:
    from tasks.coco import convert_mmdet2_swin

    model, arrays, _ = calibrated
    fold = {k[len("fold/"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("fold/")}
    # the fork gives reduction a bias (mmdet's converter knows only its weight; a bias is not permuted)
    biases = {k.replace("backbone.layers.", "backbone.stages."): v for k, v in fold.items() if k.endswith("reduction.bias")}
    want = {**convert_mmdet2_swin({k: v for k, v in fold.items() if k not in biases and "reduction.bias" not in k}), **biases}
    ours = model.state_dict()
    rel = {k: T.relative(ours[k].numpy(), v.numpy()) for k, v in want.items()}
    assert len(rel) == 76
    assert all(rel[k] == 0.0 for k in rel if ".stages.0.blocks." in k)
    assert max(rel.values()) < 1e-5, max(rel.items(), key=lambda kv: kv[1])


def test_every_quantizer_matches_the_fork(calibrated) -> None:
    """All 280 quantizer arrays of the detector after the re-calibration (Linear and conv inputs and weights of the
    backbone, FPN, RPN and RoI heads, and the four attention matmul operands, the post-Softmax log2 grid on the padded
    windows included): every zero point equal, every delta within 1e-5 relative (made: 235 bit for bit, 1.0e-6)."""
    from ptq_bench.models import named_quantizers

    model, arrays, _ = calibrated
    ours = dict(named_quantizers(model))
    compared, equal, worst = 0, 0, 0.0
    for key, want in arrays.items():
        if not key.startswith("quant/"):
            continue
        module, field = key[len("quant/"):].rsplit("/", 1)
        layer, slot = module.rsplit(".", 1)
        quantizer = ours[f"{T.ours_name(layer)}.{slot.replace('quantizer_A', 'quantizer_a').replace('quantizer_B', 'quantizer_b')}"]
        got = (quantizer.scale if field == "delta" else quantizer.zero_point).detach().reshape(-1).numpy()
        want = want.reshape(-1)
        compared += 1
        equal += bool(np.array_equal(got, want))
        if field == "zero_point":
            assert np.array_equal(got, want), key
        else:
            worst = max(worst, T.relative(got, want))
    assert compared == 280 and equal >= 200 and worst < 1e-5, (compared, equal, worst)


def test_quantized_backbone_features_match_the_fork(calibrated) -> None:
    """The quantized backbone's four feature maps on both images (the second one not calibrated on) against the fork's
    (made: stage 0 bit for bit, the others within 5.8e-7 relative: the float order of the two Swins, no grid step
    apart)."""
    model, arrays, data = calibrated
    errors = []
    with torch.no_grad():
        for i in range(len(data)):
            inputs = model.data_preprocessor(data.batch(i, i + 1), False)["inputs"]
            for k, feature in enumerate(model.backbone(inputs)):
                errors.append(T.relative(feature.numpy(), arrays[f"q/backbone/{i}/{k}"]))
    assert len(errors) == 8 and errors[0] == errors[4] == 0.0 and max(errors) < 1e-5, errors


def test_quantized_detector_outputs_match_the_fork(calibrated) -> None:
    """The quantized detector end to end on both images against the fork's: RPN proposals (boxes and scores), the
    quantized box head's class scores and box deltas on them, and the final detections with their classes (made:
    proposals bit for bit, box head within 4.1e-7 relative, detections within 7.7e-8, every class equal)."""
    from mmdet.structures.bbox import bbox2roi

    model, arrays, data = calibrated
    with torch.no_grad():
        for i in range(len(data)):
            batch = model.data_preprocessor(data.batch(i, i + 1), False)
            neck = model.neck(model.backbone(batch["inputs"]))
            proposals = model.rpn_head.predict(neck, batch["data_samples"], rescale=False)[0]
            got = torch.cat([proposals.bboxes, proposals.scores[:, None]], 1).numpy()
            assert np.array_equal(got, arrays[f"q/proposals/{i}"]), i
            roi = model.roi_head._bbox_forward(neck, bbox2roi([proposals.bboxes]))
            assert T.relative(roi["cls_score"].numpy(), arrays[f"q/roi_cls/{i}"]) < 1e-5
            assert T.relative(roi["bbox_pred"].numpy(), arrays[f"q/roi_reg/{i}"]) < 1e-5
            out = data.forward(model, data.batch(i, i + 1))[0].pred_instances
            want = arrays[f"q/dets/{i}"]  # the fork lists them by class
            want = want[np.argsort(-want[:, 4], kind="stable")]
            assert len(want) and np.array_equal(out.labels.numpy(), want[:, 5].astype(np.int64)), i
            got = torch.cat([out.bboxes, out.scores[:, None]], 1).numpy()
            assert T.relative(got, want[:, :5]) < 1e-5, i
