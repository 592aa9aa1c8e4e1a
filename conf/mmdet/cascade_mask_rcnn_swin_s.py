# Cascade Mask R-CNN with a Swin-S backbone (Swin repository:
# cascade_mask_rcnn_swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py; FP 51.9 / 45.0).
_base_ = './cascade_mask_rcnn_swin_t.py'
model = dict(backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.3))
