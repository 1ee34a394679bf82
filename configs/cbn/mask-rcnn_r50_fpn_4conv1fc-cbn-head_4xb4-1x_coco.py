# Paper Table 5, row "R50+FPN Mask R-CNN cbn": cbn in the neck, the 4conv1fc box head and the 4conv mask head. Paper: 38.5 box AP, 34.6 mask AP.
_base_ = './_base_/mask-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'
norm_cfg = dict(type='CBN', window_size=4, requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=3)]
