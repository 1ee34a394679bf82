# Ablation (paper Sec. 4.3, Fig. 3b): Naive CBN (no Taylor compensation), k=4, in the neck and head. The paper plots it below CBN (37.7) at k=4; no exact number is given in the text.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'
norm_cfg = dict(type='CBN', window_size=4, compensate=False, requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=3)]
