# Paper Table 4, row "syncBN / syncBN": SyncBN everywhere but conv1 and stage 1 (frozen). Paper: 37.9 box AP.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(frozen_stages=1, norm_cfg=norm_cfg, norm_eval=False),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
