"""MMDetection's one-stage detectors whose head is shared across the FPN levels P3-P7 (RetinaNet, FCOS), with every
norm layer CBN: each head norm layer is called 5 times per iteration and keeps 5 windows, one per level."""
import copy
import warnings

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules
from mmengine.hub import get_config
from mmengine.registry import DefaultScope

import cbn_mmdet  # noqa: F401
from cbn_mmdet.ops.fused import FIELDS
from cbn_mmdet import CrossIterationBatchNorm2d

register_all_modules()

K = 3
CBN = dict(type='CBN', window_size=K, requires_grad=True)
CONFIGS = {
    'retinanet': 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
    'fcos': 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
}


def build(config):
    cfg = copy.deepcopy(get_config(config).model)
    cfg.backbone.update(init_cfg=None, norm_cfg=CBN, norm_eval=False)  # no pretrained weights offline
    cfg.bbox_head.norm_cfg = CBN  # RetinaHead has none by default, FCOSHead GN
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg)
    model.init_weights()
    return model


def train(model, iters=4, burnin=2, size=128):
    """``iters`` SGD steps on generated data, with CBNBurnInHook's schedule: BN and collecting for ``burnin``
    iterations, then the windows open."""
    torch.manual_seed(0)
    packed = demo_mm_inputs(2, [[3, size, size]] * 2, num_items=[3, 2], num_classes=80)
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    optim = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*plain BatchNorm')  # every CBN layer finds its conv
        for it in range(iters):
            step(model, packed, layers, optim, it, burnin)
    return packed


def step(model, packed, layers, optim, it, burnin):
    for layer in layers:
        layer.begin_iteration(it, use_window=it >= burnin, collect=it >= burnin - (K - 1))
    data = model.data_preprocessor(packed, True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    assert torch.isfinite(loss)
    loss.backward()
    optim.step()
    optim.zero_grad()


@pytest.mark.parametrize('name', list(CONFIGS))
def test_shared_head_keeps_one_window_per_fpn_level(name):
    model = build(CONFIGS[name])
    head = [(n, m) for n, m in model.bbox_head.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
    backbone = [m for m in model.backbone.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(head) == 8 and len(backbone) == 53  # 4 cls + 4 reg convs; R50's stem, 16 blocks x 3, 4 downsamples
    packed = train(model)
    # per stored iteration and level: ds/dW (256 x 256 x 3 x 3), dmu/dW (256 x 3 x 3) and the bank's FIELDS
    # per-channel fields, in fp32; memory grows with the 5 calls (tools/analysis/shared_head_memory.py prints it)
    per_level = (K - 1) * 4 * (256 * 256 * 9 + 256 * 9 + FIELDS * 256)
    for layer_name, layer in head:
        assert layer.window_lengths == [K - 1] * 5 and layer.calls_per_iteration == 5, layer_name
        assert layer.window_nbytes == 5 * per_level
    trained = [m for m in backbone if m.training]  # frozen_stages=1 keeps the stem and stage 1 in eval mode
    assert len(trained) >= 40 and all(m.window_lengths == [K - 1] for m in trained)
    model.eval()
    with torch.no_grad():
        results = model.test_step(packed)
    assert len(results) == 2 and all(r.pred_instances.bboxes.shape[-1] == 4 for r in results)
