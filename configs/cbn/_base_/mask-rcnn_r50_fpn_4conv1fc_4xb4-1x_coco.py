# Mask R-CNN R50-FPN in the paper's setting (Sec. 4.2): 4conv1fc box head, the 4conv FCN mask head, fixed-BN
# pretrained backbone, 4 GPUs x 4 images, lr 0.02 for 16 images, 12 epochs (mmdet's 1x).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)

model = dict(roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256)))
train_dataloader = dict(batch_size=4, num_workers=4)
optim_wrapper = dict(optimizer=dict(lr=0.02))
auto_scale_lr = dict(enable=True, base_batch_size=16)
