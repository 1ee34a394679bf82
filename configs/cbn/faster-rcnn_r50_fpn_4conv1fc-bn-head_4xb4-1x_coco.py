# Paper Table 4, row "fixed BN / BN": BN in the FPN neck and 4conv1fc head. Paper: 36.3 box AP.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_4xb4-1x_coco.py'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
