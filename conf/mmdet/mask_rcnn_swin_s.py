# Mask R-CNN with a Swin-S backbone (Swin repository: mask_rcnn_swin_small_patch4_window7_mstrain_480-800_adamw_3x_coco.py;
# FP 48.5 box AP / 43.3 mask AP): Swin-T's config with 18 blocks in stage 3.
_base_ = './mask_rcnn_swin_t.py'
model = dict(backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.3))
