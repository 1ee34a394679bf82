# Paper Table 4, row "fixed BN / -": backbone fixed BN, no norm in the (2fc) box head. Paper: 36.9 box AP.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)
train_dataloader = dict(batch_size=4, num_workers=4)
optim_wrapper = dict(optimizer=dict(lr=0.02))
auto_scale_lr = dict(enable=True, base_batch_size=16)
