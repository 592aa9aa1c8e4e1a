"""COCO detection through mmdet 3 (task=coco): a tiny COCO-format dataset written here, a randomly initialised
Mask R-CNN with a shrunken mmdet Swin backbone, end to end through run.py (fp, repq_vit, dopq_vit and qdrop with a
tiny reconstruction), APHQ-ViT's detection pipeline (RPN Hessian, MLP and unit reconstruction), the mmdet Swin
adapter (FP function with quantizers off, mmdet's padding, RepQ-ViT fold keeps real tokens, block capture with hw_shape), and the conversion
of the Swin repository's mmdet-2.x checkpoint keys. Skipped without the detection extra."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, run_cli

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from mmdet.datasets import CocoDataset  # noqa: E402

from ptq_bench.calibration import CalibrationData  # noqa: E402
from ptq_bench.errors import DataError  # noqa: E402
from ptq_bench.methods import BitWidth, build_method  # noqa: E402
from ptq_bench.models.prepare import quantizers_off  # noqa: E402
from ptq_bench.models import calibrating, layernorm_linear_pairs, named_quantizers, prepare_, set_quantizers_enabled  # noqa: E402
from ptq_bench.quant import UniformQuantizer  # noqa: E402
from ptq_bench.results.store import RecordStore  # noqa: E402
from ptq_bench.transforms import mean_target, reparameterize_layernorm_  # noqa: E402
from ptq_bench.transforms.block_capture import BlockInputs, block_outputs, capture_block_inputs  # noqa: E402
from ptq_bench.transforms.block_losses import evaluate_losses  # noqa: E402

QUIET = ["logger=none", "task.progress=false", "data.workers=0"]
#: The 80 COCO category names (CocoDataset and CocoMetric match categories by name); the images hold two of them.
CATEGORIES = [{"id": i + 1, "name": name} for i, name in enumerate(CocoDataset.METAINFO["classes"])]
ANNOTATED = CATEGORIES[0], CATEGORIES[2]
#: Image sizes chosen so that stage resolutions are not multiples of the window (padded windows are exercised).
SIZES = {"train2017": [(60, 84), (76, 52), (64, 64), (52, 92)], "val2017": [(68, 88), (56, 72), (80, 60)]}

TINY_CONFIG = """
_base_ = '{base}'
model = dict(
    backbone=dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7, drop_path_rate=0.0),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32)),
    test_cfg=dict(
        rpn=dict(nms_pre=60, max_per_img=30),
        rcnn=dict(score_thr=0.0, max_per_img=8)))  # random weights: keep detections so the mask head runs
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(100, 72), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


def write_split(root: Path, split: str, rng: np.random.Generator, first_id: int) -> None:
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for i, (h, w) in enumerate(SIZES[split]):
        image_id = first_id + i
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / split / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for k, category in enumerate(ANNOTATED):
            x, y, bw, bh = 4.0 + 10 * k, 6.0 + 5 * k, w / 2, h / 2
            polygon = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            annotations.append({"id": len(annotations) + 100 * image_id, "image_id": image_id, "category_id": category["id"],
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0, "segmentation": [polygon]})
    ann = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    write_split(root, "train2017", rng, 1)
    write_split(root, "val2017", rng, 101)
    return root


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mmdet") / "tiny_mask_rcnn_swin.py"
    path.write_text(TINY_CONFIG.format(base=REPO / "conf" / "mmdet" / "mask_rcnn_swin_t.py"))
    return path


def task_for(coco_root: Path, tiny_config: Path, method: str = "fp", data: dict | None = None, **extra: object):
    from tasks.coco import Coco

    cfg = OmegaConf.create({
        "seed": 0,
        "task": {"name": "coco", "batch_size": 1, "metrics": ["bbox", "segm"], "progress": False, "launcher": "none"},
        "data": {**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / "coco.yaml")),
                 "root": str(coco_root), "workers": 0, **(data or {})},
        "model": {"name": "tiny", "display": "Tiny", "checkpoint": None, "mmdet_config": str(tiny_config), "cfg_options": {}},
        "method": {"name": method, "calib_size": 2},
        **extra,
    })
    return Coco(cfg, progress=False)


@pytest.fixture(scope="module")
def built(coco_root, tiny_config):
    torch.manual_seed(0)
    task = task_for(coco_root, tiny_config)
    model, _ = task.build_model()
    task.check_data(3)
    return task, model, task.calibration(3, seed=0, device=torch.device("cpu"))


def detections(task, model, data: CalibrationData) -> list[torch.Tensor]:
    with torch.no_grad():
        outputs = task.forward(model, data.batch(0, len(data)))
    return [torch.cat([o.pred_instances.bboxes, o.pred_instances.scores[:, None]], 1) for o in outputs]


def backbone_features(model, data: CalibrationData) -> list[torch.Tensor]:
    with torch.no_grad():
        inputs = model.data_preprocessor(data.batch(0, len(data)), False)["inputs"]
        return list(model.backbone(inputs))


def factory(site):
    if site.is_weight:
        return UniformQuantizer(4, granularity="channel", channel_dim=0)
    if site.role == "post_layernorm":
        return UniformQuantizer(4, granularity="channel", channel_dim=-1)
    return UniformQuantizer(4)


def test_quantizers_off_reproduce_the_fp_detector(built):
    task, model, data = built
    prepared = copy.deepcopy(model)
    prepare_(prepared, factory)
    roles = {q.role for _, q in named_quantizers(prepared)}
    assert {"patch_embed", "post_layernorm", "attn_proj", "post_gelu", "query", "key", "post_softmax", "value", "conv", "linear"} <= roles
    set_quantizers_enabled(prepared, False)
    for fp, wrapped in zip(backbone_features(model, data), backbone_features(prepared, data)):
        assert torch.allclose(fp, wrapped, atol=1e-5, rtol=1e-5)
    for fp, wrapped in zip(detections(task, model, data), detections(task, prepared, data)):
        assert fp.shape == wrapped.shape and torch.allclose(fp, wrapped, atol=1e-4, rtol=1e-4)


def test_window_attention_is_mmdets_forward_bit_for_bit_on_padded_windows(built):
    """The adapter's ShiftWindowMSA runs mmdet's own operations: zeros padded after the LayerNorm reach qkv."""
    from mmdet.models.backbones.swin import ShiftWindowMSA

    _, model, _ = built
    prepared = copy.deepcopy(model)
    prepare_(prepared, factory)
    set_quantizers_enabled(prepared, False)
    shifted = [m for m in prepared.modules() if isinstance(m, ShiftWindowMSA) and m.shift_size > 0][0]
    x = torch.randn(2, 5 * 7, shifted.w_msa.embed_dims, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(shifted(x, (5, 7)), ShiftWindowMSA.forward(shifted, x, (5, 7)))


def test_repq_fold_keeps_every_real_token_and_moves_padded_ones_as_the_official_code(built):
    """Held at their pre-fold projection, padded positions leave the folded backbone equal to the FP one (the fold
    is right on every real token); unheld, they take the folded qkv(0) as in RepQ-ViT's fork, which moves the
    features of every image here (their stage sizes are padded)."""
    from contextlib import ExitStack

    _, model, data = built
    prepared = copy.deepcopy(model)
    reference = backbone_features(model, data)
    prepare_(prepared, factory)
    pairs = layernorm_linear_pairs(prepared)
    assert len(pairs) == 2 * 8 + 3  # norm1→qkv and norm2→fc1 in 8 blocks, norm→reduction in 3 patch mergings
    holders = [m for m in prepared.modules() if hasattr(m, "padding_held")]
    assert len(holders) == 8
    with quantizers_off(prepared):
        projections = [m.zero_token_projection() for m in holders]
    with torch.no_grad(), calibrating(prepared):
        data.run(prepared)
        edited = reparameterize_layernorm_(prepared, mean_target)
    assert edited
    set_quantizers_enabled(prepared, False)
    with ExitStack() as stack:
        for module, projection in zip(holders, projections):
            stack.enter_context(module.padding_held(projection))
        for fp, folded in zip(reference, backbone_features(prepared, data)):
            assert torch.allclose(fp, folded, atol=1e-4, rtol=1e-4)
    moved = [((folded - fp).norm() / fp.norm()).item() for fp, folded in zip(reference, backbone_features(prepared, data))]
    assert max(moved) > 1e-3


def test_block_capture_keeps_each_images_shape_and_hw_shape(built):
    _, model, data = built
    from ptq_bench.models import find_blocks

    name, block = find_blocks(model)[0]
    inputs = capture_block_inputs(model, block, data, batch_size=1)
    assert isinstance(inputs, BlockInputs) and len(inputs) == 3
    assert all(len(extra) == 1 and len(extra[0]) == 2 for extra in inputs.extras)  # (hw_shape,)
    assert len({t.shape for t in inputs.tensors}) > 1  # images of different sizes stay apart
    targets = block_outputs(block, inputs, batch_size=2)
    losses = evaluate_losses(block, inputs, targets, torch.arange(3), batch_size=3, loss="mse")
    assert losses.shape == (3,) and torch.all(losses == 0)


def synthetic_mmdet2_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Swin repository's (mmdet 2.x) names and patch-merging channel order for ``model``'s weights."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone.stages."):
            key = key.replace("backbone.stages.", "backbone.layers.", 1)
            key = key.replace("attn.w_msa.", "attn.").replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
            if ".downsample.reduction." in key and value.ndim == 2:  # nn.Unfold order → Swin's x0,x1,x2,x3 concat
                out, inp = value.shape
                value = value.reshape(out, inp // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(out, inp)
            elif ".downsample.norm." in key:
                value = value.reshape(-1, 4).transpose(0, 1)[[0, 2, 1, 3], :].reshape(-1)
        key = key.replace("backbone.patch_embed.projection.", "backbone.patch_embed.proj.")
        state[key] = value.clone()
    return state


def test_mmdet2_swin_checkpoint_keys_are_converted(built, tmp_path, caplog):
    from tasks.coco import is_mmdet2_swin, load_detector_checkpoint_

    task, model, data = built
    state = synthetic_mmdet2_state(model)
    assert is_mmdet2_swin(state) and not is_mmdet2_swin(model.state_dict())
    path = tmp_path / "mask_rcnn_swin_tiny_mmdet2.pth"
    torch.save({"meta": {"mmdet_version": "2.11.0", "CLASSES": ("person", "car")}, "state_dict": state}, path)
    torch.manual_seed(1)
    fresh, _ = task_for(path.parent, Path(task.cfg.model.mmdet_config)).build_model()
    with caplog.at_level("INFO", logger="tasks.coco"):
        converted, sha256 = load_detector_checkpoint_(fresh, path)
    assert converted and sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "mmdet-2.x" in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    for fp, loaded in zip(detections(task, model, data), detections(task, fresh.eval(), data)):
        assert torch.equal(fp, loaded)


def coco_with_unkept_val_images(coco_root: Path, tmp_path: Path) -> Path:
    """coco_root with two images put first in val2017's annotation file that mmdet's training filter drops: one
    without a box, one 28 px high."""
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    ann_file = root / "annotations" / "instances_val2017.json"
    ann = json.loads(ann_file.read_text())
    rng = np.random.default_rng(1)
    for image_id, (h, w) in ((201, (64, 64)), (202, (28, 64))):
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / "val2017" / name)
        ann["images"].insert(0, {"id": image_id, "file_name": name, "height": h, "width": w})
    ann["annotations"].append({"id": 99999, "image_id": 202, "category_id": ANNOTATED[0]["id"], "bbox": [2.0, 2.0, 20.0, 10.0],
                               "area": 200.0, "iscrowd": 0, "segmentation": [[2.0, 2.0, 22.0, 2.0, 22.0, 12.0, 2.0, 12.0]]})
    ann_file.write_text(json.dumps(ann))
    return root


def test_calibration_images_first_of_val_as_the_detection_fork_reads_them(coco_root, tiny_config, tmp_path):
    """data.calib_draw=first takes the first images mmdet's training filter keeps, in file order (the unannotated and
    the 28-px image put in front are skipped); the run key names the choice only when it is not the default seeded
    train2017 draw and the run calibrates, so earlier records keep their keys."""
    from ptq_bench.errors import ConfigError

    root = coco_with_unkept_val_images(coco_root, tmp_path)
    task = task_for(root, tiny_config, data={"calib_split": "val", "calib_draw": "first"})
    task.build_model()
    task.check_data(2)
    data = task.calibration(2, seed=5, device=torch.device("cpu"))
    assert data.identity["image_ids"] == [101, 102] and data.identity["indices"] == [0, 1]
    assert data.identity["split"] == "val" and data.identity["draw"] == "first"
    assert task.identity()["data"]["calibration_images"] == "val/first"
    with pytest.raises(ConfigError, match="only 3 images kept by mmdet's training filter"):
        task.check_data(4)

    seeded = task_for(root, tiny_config, data={"calib_split": "val"})
    seeded.build_model()
    seeded.check_data(5)  # every image of the split, the two unkept ones included
    ids = seeded.calibration(5, seed=5, device=torch.device("cpu")).identity["image_ids"]
    assert sorted(ids) == [101, 102, 103, 201, 202]

    default = task_for(root, tiny_config)
    default.build_model()
    default.check_data(2)
    assert "calibration_images" not in default.identity()["data"] and "calib_split" not in default.identity()["data"]
    assert default.identity()["revision"] == 1  # padded windows as the official forks: calibrated runs re-keyed
    task.check_data(0)  # no calibration: where its images would come from is no part of the key, nor the revision
    assert "calibration_images" not in task.identity()["data"] and "revision" not in task.identity()
    with pytest.raises(ConfigError, match="data.calib_draw=last: expected one of seeded, first"):
        task_for(root, tiny_config, data={"calib_draw": "last"}).validate()


def records(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


@pytest.mark.slow
def test_run_py_task_coco_fp_repq_and_reconstruction(tmp_path, coco_root, tiny_config):
    runs = tmp_path / "runs"
    common = ["model=mask_rcnn_swin_t", f"model.mmdet_config={tiny_config}", f"data.root={coco_root}",
              f"results_dir={runs}", f"hydra.run.dir={tmp_path / 'out'}", *QUIET]
    for method in (["method=fp"], ["method=repq_vit", "bits=w4a4", "method.calib_size=2"],
                   ["method=dopq_vit", "bits=w4a4", "method.calib_size=2", "method.init_calib_size=2", "method.iters=2",
                    "method.batch_size=1"],
                   ["method=qdrop", "bits=w4a4", "method.calib_size=2", "method.search_size=1", "method.batch_size=1",
                    "method.iters=2"]):
        result = run_cli(*common, *method)
        assert result.returncode == 0, result.stderr[-3000:]
    by_method = {r["method"]["name"]: r for r in records(runs)}
    assert set(by_method) == {"fp", "repq_vit", "dopq_vit", "qdrop"}
    for record in by_method.values():
        metrics = record["metrics"]
        assert record["task"] == "coco" and record["primary_metric"] == "bbox_mAP"
        assert record["model"]["display"] == "MaskRCNN-Swin-T"
        assert {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_l"} <= set(metrics)
        assert 0 <= metrics["bbox_mAP"] <= 100 and 0 <= metrics["segm_mAP"] <= 100
        assert metrics["num_images"] == 3 and metrics["detections"] > 0
    quantized = {row["module"] for row in by_method["repq_vit"]["quantized"]}
    assert "backbone.patch_embed.projection" in quantized and "roi_head.bbox_head.fc_cls" in quantized
    assert by_method["repq_vit"]["calibration"]["num_images"] == 2
    assert len(by_method["repq_vit"]["calibration"]["image_ids"]) == 2
    fold = by_method["repq_vit"]["transforms"][0]  # real tokens kept; padded ones moved, as in RepQ-ViT's fork
    assert fold["fp_relative_error"] < 1e-3 < fold["padded_fp_relative_error"] and "zeros through qkv" in fold["padding"]


def test_run_py_task_coco_subset_and_one_line_errors(tmp_path, coco_root, tiny_config):
    common = ["model=mask_rcnn_swin_t", f"model.mmdet_config={tiny_config}", f"results_dir={tmp_path / 'runs'}",
              f"hydra.run.dir={tmp_path / 'out'}", *QUIET]
    missing = run_cli(*common, f"data.root={tmp_path / 'nowhere'}", "method=fp")
    assert missing.returncode == 2 and "COCO root not found" in missing.stderr
    no_ann = tmp_path / "coco_without_ann"
    (no_ann / "val2017").mkdir(parents=True)
    result = run_cli(*common, f"data.root={no_ann}", "method=fp")
    assert result.returncode == 2 and "annotation file not found" in result.stderr
    ptq4vit = run_cli(*common, f"data.root={coco_root}", "method=ptq4vit", "method.metric=cosine", "method.calib_size=1")
    assert ptq4vit.returncode == 2 and "inputs of several shapes" in ptq4vit.stderr
    subset = run_cli(*common, f"data.root={coco_root}", "method=fp", "data.max_eval_images=2")
    assert subset.returncode == 0, subset.stderr[-3000:]
    (record,) = records(tmp_path / "runs")
    assert record["metrics"]["num_images"] == 2 and record["config"]["data"]["max_eval_images"] == 2
    assert RecordStore(tmp_path / "runs").load_valid(record["run_key"]) is not None  # every metric a number: resumable


def test_a_mask_head_without_detections_is_refused_with_the_threshold_to_lower(tmp_path, coco_root, tiny_config):
    """Every score under score_thr on the calibration images: the mask head's quantizers never observe data, and the
    one-line refusal (no record) names the option to lower."""
    result = run_cli("model=mask_rcnn_swin_t", f"model.mmdet_config={tiny_config}", f"data.root={coco_root}",
                     f"results_dir={tmp_path / 'runs'}", f"hydra.run.dir={tmp_path / 'out'}", *QUIET, "method=minmax",
                     "bits=w8a8", "method.calib_size=1", "+model.cfg_options.model.test_cfg.rcnn.score_thr=1.01")
    assert result.returncode == 2 and "never observed data during calibration" in result.stderr
    assert "mask_head" in result.stderr and "test_cfg.rcnn.score_thr=0.0" in result.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*.json"))


@pytest.mark.parametrize("name, detector, depth, head", [
    ("mask_rcnn_swin_t", "MaskRCNN", 6, "Shared2FCBBoxHead"),
    ("mask_rcnn_swin_s", "MaskRCNN", 18, "Shared2FCBBoxHead"),
    ("cascade_mask_rcnn_swin_t", "CascadeRCNN", 6, "ConvFCBBoxHead"),
    ("cascade_mask_rcnn_swin_s", "CascadeRCNN", 18, "ConvFCBBoxHead"),
])
def test_shipped_mmdet_configs_are_the_swin_repository_architectures(name, detector, depth, head):
    from tasks.mm import mmdet_config, require_mmdet

    require_mmdet()
    cfg = mmdet_config(OmegaConf.create({"mmdet_config": f"{name}.py", "cfg_options": {}}))
    model = cfg.model
    assert model.type == detector and model.backbone.type == "SwinTransformer" and model.backbone.init_cfg is None
    assert model.backbone.depths[2] == depth and model.neck.in_channels == [96, 192, 384, 768]
    heads = model.roi_head.bbox_head if isinstance(model.roi_head.bbox_head, list) else [model.roi_head.bbox_head]
    assert all(h.type == head and h.num_classes == 80 for h in heads)
    if detector == "CascadeRCNN":  # the Swin repository's GIoU 4conv1fc heads
        assert len(heads) == 3 and all(h.num_shared_convs == 4 and h.num_shared_fcs == 1 and h.reg_decoded_bbox for h in heads)
    assert cfg.test_dataloader.dataset.pipeline[1].scale == (1333, 800)


def perfect_predictions(ann_file: Path, image_ids: list[int]) -> list:
    """DetDataSamples predicting every ground-truth box and mask of ``image_ids`` exactly (score 1)."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    from pycocotools.coco import COCO

    coco = COCO(str(ann_file))
    label_of = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    samples = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        sample = DetDataSample(metainfo={"img_id": image_id, "ori_shape": (info["height"], info["width"])})
        sample.pred_instances = InstanceData(
            bboxes=torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]),
            scores=torch.ones(len(anns)),
            labels=torch.tensor([label_of[a["category_id"]] for a in anns]),
            masks=torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool(),
        )
        samples.append(sample)
    return samples


@pytest.mark.parametrize("limit", [None, 2])
def test_coco_metric_of_perfect_predictions_is_100_percent(coco_root, tiny_config, limit):
    task = task_for(coco_root, tiny_config)
    task.cfg.data.max_eval_images = limit
    task.check_data(0)
    evaluator = task.evaluator()
    ids = [int(task.val.get_data_info(i)["img_id"]) for i in range(len(task.val))]
    evaluator.process(data_samples=perfect_predictions(coco_root / "annotations" / "instances_val2017.json", ids))
    metrics = task.record_metrics(evaluator.evaluate(len(task.val)))
    assert metrics["bbox_mAP"] == 100.0 and metrics["segm_mAP"] == 100.0 and metrics["bbox_mAP_50"] == 100.0
    assert metrics["num_images"] == len(ids) == (limit or 3)


def test_no_detections_is_an_ap_of_zero_not_a_data_error(coco_root, tiny_config, caplog):
    """Every score under the threshold (random weights): mmdet's metric returns nothing; the run records AP 0."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    task = task_for(coco_root, tiny_config)
    task.check_data(0)
    evaluator = task.evaluator()
    empty = []
    for i in range(len(task.val)):
        sample = DetDataSample(metainfo={"img_id": int(task.val.get_data_info(i)["img_id"]), "ori_shape": (64, 64)})
        sample.pred_instances = InstanceData(bboxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long),
                                             masks=torch.zeros(0, 64, 64, dtype=torch.bool))
        empty.append(sample)
    evaluator.process(data_samples=empty)
    with caplog.at_level("WARNING"):
        metrics = task.record_metrics(evaluator.evaluate(len(task.val)), detections=0)
    assert metrics["bbox_mAP"] == 0.0 and metrics["segm_mAP"] == 0.0 and metrics["detections"] == 0
    assert "score_thr" in caplog.text


def test_annotation_categories_must_be_the_detectors_classes(tmp_path, coco_root, tiny_config):
    """A category list trimmed to the two classes present would silently relabel every prediction: refused."""
    import shutil

    trimmed = tmp_path / "coco"
    shutil.copytree(coco_root, trimmed)
    ann = trimmed / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    used = {a["category_id"] for a in data["annotations"]}
    data["categories"] = [c for c in data["categories"] if c["id"] in used]
    ann.write_text(json.dumps(data))
    task = task_for(trimmed, tiny_config)
    with pytest.raises(DataError, match=r"categories are not the detector's 80 classes \(missing 78"):
        task.check_data(0)


def test_erq_reduces_a_head_shared_by_the_fpn_levels_on_the_rows_of_every_level(built):
    """ERQ's Aqer/Wqer of a layer use its FP input rows (the official code: its first call, the only one in a ViT).
    The RPN head runs once per FPN level: it is reduced once, after the pass, on the rows of all five levels; a
    window attention's qkv on its padded windows' rows."""
    from ptq_bench.methods.erq import ERQ

    _, model, data = built
    quantized = copy.deepcopy(model)
    method = build_method("erq", BitWidth(4, 4), act_calib_size=2)
    reduced: list[tuple[str, int]] = []
    names = {id(m): n for n, m in quantized.named_modules()}
    original = ERQ._reduce_errors_

    def record(self, layer, x_rows, y_rows, two_d):
        reduced.append((names[id(layer)], x_rows.shape[0]))
        original(self, layer, x_rows, y_rows, two_d)

    with torch.no_grad():
        inputs = quantized.data_preprocessor(data.batch(0, len(data)), False)["inputs"]
        levels = quantized.neck(quantized.backbone(inputs))
    ERQ._reduce_errors_ = record
    try:
        with torch.no_grad():
            method.quantize(quantized, data)
    finally:
        ERQ._reduce_errors_ = original
    counts = dict(reduced)
    assert len(counts) == len(reduced)  # every layer reduced exactly once
    assert counts["rpn_head.rpn_conv"] == sum(level.shape[0] * level.shape[2] * level.shape[3] for level in levels)
    window = quantized.backbone.stages[0].blocks[0].attn.window_size  # qkv sees the zero-padded windows, as mmdet runs it
    padded = [-(-side // 4 // window) * window for side in inputs.shape[2:]]
    assert counts["backbone.stages.0.blocks.0.attn.w_msa.qkv"] == inputs.shape[0] * padded[0] * padded[1]


def confident_rpn(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose RPN objectness exceeds 0.7 everywhere (random weights score about 0.5: the detection Hessian's
    box term would be 0/0)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.rpn_head.rpn_cls.bias.fill_(1.0)
    return model


def test_rpn_loss_is_the_forks_two_self_normalized_terms():
    """L = L_cls/sg(L_cls) + L_box/sg(L_box): value 2, gradient each term's gradient over its value; the box term
    counts only the four deltas of anchors whose FP score exceeds 0.7."""
    from ptq_bench.transforms.aph_detection import rpn_loss

    g = torch.Generator().manual_seed(0)
    cls = [torch.randn(1, 3, 4, 5, generator=g, requires_grad=True)]
    box = [torch.randn(1, 12, 4, 5, generator=g, requires_grad=True)]
    prob = [torch.rand(1, 3, 4, 5, generator=g)]
    box_fp = [torch.randn(1, 12, 4, 5, generator=g)]
    loss = rpn_loss((cls, box), (prob, box_fp))
    loss.backward()
    assert loss.item() == pytest.approx(2.0)

    p, t = torch.sigmoid(cls[0].detach()).requires_grad_(True), prob[0]
    kl = (t * (t.log() - p.log()) + (1 - t) * ((1 - t).log() - (1 - p).log())).mean()
    keep = (t > 0.7).repeat_interleave(4, dim=1)  # anchor a's mask on channels 4a .. 4a + 3
    b = box[0].detach().requires_grad_(True)
    smooth = torch.nn.functional.smooth_l1_loss(b[keep], box_fp[0][keep], reduction="sum") / b.numel()
    (kl / kl.item()).backward()
    (smooth / smooth.item()).backward()
    expected_cls = p.grad * p.detach() * (1 - p.detach())  # through the sigmoid
    assert torch.allclose(cls[0].grad, expected_cls, atol=1e-7)
    assert torch.allclose(box[0].grad, b.grad, atol=1e-7)
    assert (box[0].grad[~keep] == 0).all()


def test_detection_hessian_needs_confident_rpn_anchors_and_is_per_image_with_mean_one(built):
    from ptq_bench.errors import ConfigError
    from ptq_bench.methods.qdrop import fp_copy
    from ptq_bench.transforms.aph_detection import perturbation_hessians, rpn_targets

    _, model, data = built
    with pytest.raises(ConfigError, match="no RPN objectness above 0.7"):
        rpn_targets(fp_copy(copy.deepcopy(model)), data)
    fp = fp_copy(confident_rpn(model))
    targets = rpn_targets(fp, data)
    blocks = capture_block_inputs(fp, fp.backbone.stages[0].blocks[1], data, 1)
    hessians = perturbation_hessians(fp, fp.backbone.stages[0].blocks[1], data, targets)
    assert [h.shape for h in hessians] == [x.shape for x in blocks.tensors]  # one per image, the block output's shape
    for h in hessians:
        assert (h >= 0).all() and h.mean().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("method", ["qdrop", "aphq_vit"])
def test_aphq_family_on_a_detector_follows_the_detection_fork(built, method):
    """The detection fork's pipeline (docs/methods/aphq_vit.md "Detectors"): every conv but the patch embedding's
    takes a per-tensor input grid, every quantizer is searched on one image, units train one image per step and
    bake their rounding, APHQ-ViT's FFNs are ReLU; the quantized detector still detects."""
    from ptq_bench.quant.layers import QuantConv2d

    task, model, data = built
    options = {"batch_size": 1, "search_size": 1, "iters": 3}
    if method == "aphq_vit":
        options |= {"mlp_iters": 2, "mlp_pct": 0.999}
    quantized = build_method(method, BitWidth(4, 4), **options).quantize(confident_rpn(model), data)
    quantizers = dict(named_quantizers(quantized))
    assert quantizers and all(q.calibrated for q in quantizers.values())
    convs = {name: m for name, m in quantized.named_modules() if isinstance(m, QuantConv2d)}
    assert convs["backbone.patch_embed.projection"].input_quantizer is None
    for name in ("neck.fpn_convs.0.conv", "rpn_head.rpn_conv", "roi_head.mask_head.convs.0.conv"):
        grid = convs[name].input_quantizer
        assert isinstance(grid, UniformQuantizer) and grid.scale.numel() == 1
    for name in ("backbone.stages.0.blocks.0.ffn.layers.1", "neck.fpn_convs.0.conv"):  # reconstructed: rounding baked
        layer = dict(quantized.named_modules())[name]
        steps = layer.weight / layer.weight_quantizer.scale
        assert torch.allclose(steps, steps.round(), atol=1e-3)
    acts = [type(b.ffn.layers[0][1]).__name__ for _, b in quantized.named_modules() if type(b).__name__ == "SwinBlock"]
    assert set(acts) == ({"ReLU"} if method == "aphq_vit" else {"GELU"})
    boxes = detections(task, quantized, data)
    assert all(torch.isfinite(b).all() and len(b) for b in boxes)


def test_mlp_reconstruction_alone_on_a_detector_is_the_aphq_vit_stage_and_quantizes_nothing(built):
    """aphq_vit_mlp (the detection README's "MLP Recon." column): the fork's MLP stage, as aphq_vit runs it before its
    calibration, on an FP detector with ReLU FFNs and no quantizer; more than one image per step is refused."""
    from ptq_bench.errors import ConfigError
    from ptq_bench.methods.qdrop import fp_copy

    task, model, data = built
    options = {"batch_size": 1, "mlp_iters": 2, "mlp_pct": 0.999}
    method = build_method("aphq_vit_mlp", BitWidth(4, 4), **options)
    alone = method.quantize(confident_rpn(model), data)
    assert not list(named_quantizers(alone)) and method.transforms[0]["mlps"] == 8
    staged = confident_rpn(model)
    build_method("aphq_vit", BitWidth(4, 4), **options).prepare_fp_detector_(staged, fp_copy(staged), data)
    for key, value in staged.state_dict().items():
        assert torch.equal(alone.state_dict()[key], value), key
    acts = {type(b.ffn.layers[0][1]).__name__ for _, b in alone.named_modules() if type(b).__name__ == "SwinBlock"}
    assert acts == {"ReLU"} and all(torch.isfinite(b).all() for b in detections(task, alone, data))
    with pytest.raises(ConfigError, match="set method.batch_size=1"):
        build_method("aphq_vit_mlp", BitWidth(4, 4), mlp_iters=1).quantize(confident_rpn(model), data)


@pytest.mark.parametrize("method, options, message", [
    ("qdrop", {}, "set method.batch_size=1 method.search_size=1"),
    ("fima_q", {}, "differentiates a KL of class logits"),
    ("fima_q", {"iters": 0}, "fima_q on a detector is not built"),
])
def test_aphq_family_on_a_detector_is_refused_before_any_work_where_it_cannot_run(built, method, options, message):
    """One image at a time, as the detection fork; FIMA-Q has no detection code."""
    from ptq_bench.errors import ConfigError

    _, model, data = built
    target = copy.deepcopy(model)
    with pytest.raises(ConfigError, match=message):
        build_method(method, BitWidth(4, 4), **options).quantize(target, data)
    assert not list(named_quantizers(target))


def test_detection_mlp_reconstruction_leaves_the_fp_ffns_shifted_as_the_fork_does(built):
    """The fork resets its perturbation flags on the block, not on the MLP: each FP FFN keeps its -1e-3 shift."""
    from ptq_bench.methods.aphq_vit_detection import reconstruct_detector_mlps_, swin_ffns
    from ptq_bench.methods.qdrop import fp_copy

    _, model, data = built
    model = confident_rpn(model)
    fp = fp_copy(model)
    reference = dict(swin_ffns(fp_copy(model)))
    reconstruct_detector_mlps_(copy.deepcopy(model), fp, data, iters=1, lr=1e-4, quant_weight=2.0, pct=0.999)
    x = torch.randn(1, 5, 16)
    for name, ffn in swin_ffns(fp)[:2]:
        with torch.no_grad():
            assert torch.allclose(ffn(x), reference[name](x) - 1e-3, atol=1e-6)
