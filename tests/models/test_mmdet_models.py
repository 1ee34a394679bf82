"""With cbn_mmdet imported, MMDetection's own R50-FPN detectors (and our CBN versions) train and infer on a CPU."""
import copy

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules
from mmengine.hub import get_config
from mmengine.registry import DefaultScope

import cbn_mmdet  # noqa: F401
from cbn_mmdet import CrossIterationBatchNorm2d

register_all_modules()

MMDET_CONFIGS = {
    'faster': ('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', False),
    'mask': ('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', True),
}
CBN = dict(type='CBN', window_size=2, requires_grad=True)


def build(config, cbn_heads=False):
    cfg = copy.deepcopy(get_config(config).model)
    cfg.backbone.init_cfg = None  # no pretrained weights offline
    if cbn_heads:
        cfg.neck.norm_cfg = CBN
        cfg.roi_head.bbox_head.update(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=CBN)
        if 'mask_head' in cfg.roi_head:
            cfg.roi_head.mask_head.norm_cfg = CBN
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg)
    model.init_weights()
    return model


def one_step_and_inference(model, with_mask, steps=1):
    torch.manual_seed(0)
    packed = demo_mm_inputs(2, [[3, 96, 96], [3, 96, 96]], num_items=[3, 2], num_classes=80, with_mask=with_mask)
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    for _ in range(steps):
        data = model.data_preprocessor(packed, True)
        losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        assert torch.isfinite(loss)
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    with torch.no_grad():
        results = model.test_step(packed)
    assert len(results) == 2
    assert all(r.pred_instances.bboxes.shape[-1] == 4 for r in results)
    if with_mask:
        assert all(r.pred_instances.masks.dim() == 3 for r in results)
    return losses


@pytest.mark.parametrize('name', list(MMDET_CONFIGS))
def test_mmdet_r50_fpn_trains_and_infers_with_plugin(name):
    config, with_mask = MMDET_CONFIGS[name]
    losses = one_step_and_inference(build(config), with_mask)
    assert 'loss_cls' in losses and ('loss_mask' in losses) == with_mask


@pytest.mark.parametrize('name', list(MMDET_CONFIGS))
def test_cbn_heads_train_and_fill_windows(name):
    config, with_mask = MMDET_CONFIGS[name]
    model = build(config, cbn_heads=True)
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(layers) == 8 + 4 + (4 if with_mask else 0)  # FPN lateral+output convs, 4 box convs, 4 mask convs
    one_step_and_inference(model, with_mask, steps=2)
    assert all(layer.window_length == 1 for layer in layers)


def resnet_with_cbn(with_cp, k=3):
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    return ResNet(depth=18, base_channels=16, norm_cfg=dict(type='CBN', window_size=k, requires_grad=True),
                  norm_eval=False, with_cp=with_cp)


def test_resnet_siblings_downsample_and_convmodule_find_their_convs():
    import warnings

    from mmcv.cnn import ConvModule
    model = resnet_with_cbn(False)
    block = ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type='CBN', window_size=3))
    optim = torch.optim.SGD([*model.parameters(), *block.parameters()], lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no layer may fall back to BN
        for _ in range(3):
            out = model(torch.randn(2, 3, 32, 32))
            loss = sum(o.square().mean() for o in out) + block(torch.randn(2, 8, 6, 6)).square().mean()
            loss.backward()
            optim.step()
            optim.zero_grad()
    layers = [m for m in [*model.modules(), *block.modules()] if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(layers) == 1 + 8 * 2 + 3 + 1  # stem, 8 blocks x 2, 3 downsamples, ConvModule
    assert all(layer.window_length == 2 for layer in layers)


def test_resnet_with_cp_matches_without():
    a, b = resnet_with_cbn(True).double(), resnet_with_cbn(False).double()
    b.load_state_dict(a.state_dict())
    oa = torch.optim.SGD(a.parameters(), lr=0.05)
    ob = torch.optim.SGD(b.parameters(), lr=0.05)
    for it in range(4):
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(it), dtype=torch.float64)
        x.requires_grad_()
        outs = []
        for model, optim in ((a, oa), (b, ob)):
            out = model(x)
            sum(o.square().mean() for o in out).backward()
            outs.append(out)
            optim.step()
            optim.zero_grad()
        for u, v in zip(*outs):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9, msg=name)
    wa = [m.window_length for m in a.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert wa == [m.window_length for m in b.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert all(w == 2 for w in wa)
