# Paper Table 5, row "R101+FPN Faster R-CNN gn": gn in the FPN neck and 4conv1fc head. Paper: 39.3 box AP.
_base_ = './faster-rcnn_r50_fpn_4conv1fc-gn-head_4xb4-1x_coco.py'
model = dict(backbone=dict(depth=101, init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet101')))
