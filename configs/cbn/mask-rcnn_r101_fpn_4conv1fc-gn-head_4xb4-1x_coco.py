# Paper Table 5, row "R101+FPN Mask R-CNN gn" (gn in the neck, box and mask heads). The row is not legible in our
# text copy of the paper; see the paper's Table 5 for its numbers.
_base_ = './mask-rcnn_r50_fpn_4conv1fc-gn-head_4xb4-1x_coco.py'
model = dict(backbone=dict(depth=101, init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet101')))
