# Mask R-CNN R50-FPN with CBN k=4 (3-epoch burn-in) in all layers but conv1 and stage 1 (frozen), box and mask heads. Not a paper row (Table 4 has Faster R-CNN only).
_base_ = './_base_/mask-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'
norm_cfg = dict(type='CBN', window_size=4, requires_grad=True)
model = dict(
    backbone=dict(frozen_stages=1, norm_cfg=norm_cfg, norm_eval=False),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=3)]
