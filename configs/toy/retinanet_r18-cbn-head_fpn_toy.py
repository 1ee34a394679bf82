# RetinaNet on the generated toy COCO, with CBN (k=4) in its head: the head's 4 cls and 4 reg convs run on all 5
# FPN levels (P2-P6 here: strides 4-64 for the 128x128 images), so each head norm layer is called 5 times per
# iteration and keeps one window per level. The narrow ResNet-18 (BN) and the data, schedule and runtime are the toy
# Faster R-CNN's (faster-rcnn_r18-cbn-heads_fpn_toy.py); the FPN has no norm, as in MMDetection's RetinaNet.
_base_ = './faster-rcnn_r18-cbn-heads_fpn_toy.py'

head_norm = dict(type='CBN', window_size=4)
width = 64
model = dict(
    _delete_=True,
    type='RetinaNet',
    data_preprocessor={{_base_.model.data_preprocessor}},
    backbone={{_base_.model.backbone}},  # the toy Faster R-CNN's narrow ResNet-18
    neck=dict(
        type='FPN', in_channels=[32, 64, 128, 256], out_channels=width, start_level=0, add_extra_convs='on_input',
        num_outs=5),
    bbox_head=dict(
        type='RetinaHead',
        num_classes=3,
        in_channels=width,
        stacked_convs=4,
        feat_channels=width,
        norm_cfg=head_norm,
        anchor_generator=dict(
            type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0], target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
                  max_per_img=20))
optim_wrapper = dict(optimizer=dict(lr=0.01))
