# Mask R-CNN with a Swin-T backbone, on mmdet 3.3's bases: the architecture of the Swin repository's 3x multi-scale
# checkpoint (SwinTransformer/Swin-Transformer-Object-Detection, configs/swin/
# mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.py; FP 46.0 box AP / 41.6 mask AP).
# Inference only: the test pipeline (1333x800 keep-ratio resize, padding to 32) and test_cfg of mmdet's bases.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
]
model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=None),  # weights come from model.checkpoint (ptq-bench), never from a download
    neck=dict(in_channels=[96, 192, 384, 768]))
