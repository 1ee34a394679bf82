# Paper Table 4/5, row "fixed BN / CBN" (Faster R50): CBN k=4, 3-epoch burn-in, in the neck and head. Paper: 37.7 box AP.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'
norm_cfg = dict(type='CBN', window_size=4, requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=3)]
