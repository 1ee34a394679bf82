# Paper Table 4/5, row "fixed BN / syncBN" (Faster R50). Paper: 37.7 box AP.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
