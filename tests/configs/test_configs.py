"""Every config under configs/ loads, inherits MMDetection's own, imports the plugin, and builds its model."""
import glob
import os.path as osp
import re

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope

import cbn_mmdet  # noqa: F401
from cbn_mmdet import CrossIterationBatchNorm2d

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(p for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
                 if '_base_' not in p)


def strip_pretrained(cfg):
    if isinstance(cfg, dict):
        if cfg.get('type') == 'Pretrained':
            return None
        return type(cfg)({k: strip_pretrained(v) for k, v in cfg.items()})
    if isinstance(cfg, list):
        return [strip_pretrained(v) for v in cfg]
    return cfg


def test_configs_found():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.relpath(p, ROOT) for p in CONFIGS])
def test_config_builds(path):
    cfg = Config.fromfile(path)
    assert cfg.custom_imports == dict(imports=['cbn_mmdet'], allow_failed_imports=False)
    name = osp.basename(path)
    uses_cbn = re.search(r'[-_]cbn[-_]', name) is not None
    if uses_cbn:
        assert cfg.custom_hooks[0]['type'] == 'CBNBurnInHook'
    if osp.dirname(path).endswith('cbn'):
        assert '4xb4' in name and cfg.train_dataloader.batch_size == 4
        assert cfg.optim_wrapper.optimizer.lr == 0.02
        assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
        with open(path) as f:
            assert f.readline().startswith('# '), 'header comment with the paper row'
    from mmdet.registry import MODELS
    init_default_scope('mmdet')
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(strip_pretrained(cfg.model))
    n_cbn = sum(isinstance(m, CrossIterationBatchNorm2d) for m in model.modules())
    assert (n_cbn > 0) == uses_cbn
    if 'cbn-all' in name:
        assert model.backbone.norm_eval is False and model.backbone.frozen_stages == 1
    if 'naive' in name:
        assert all(not m.compensate for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d))
