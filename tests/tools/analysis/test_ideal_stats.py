"""tools/analysis/ideal_stats.py: the detection study's ``ideal`` control (statistics over extra images)."""
import json
import os.path as osp
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
sys.path.insert(0, osp.join(ROOT, 'tools'))

import detection_study  # noqa: E402
from ideal_stats import IdealStatsBN, IdealStatsHook  # noqa: E402

# float64 throughout: the layer (Chan's pooled formula) and the references (BN over the concatenation, or the
# pooled-sums formula) differ only in the order of summation. Each statistic is a sum of N <= 8*4*5*5 = 800 terms
# of size O(1), so its rounding error is at most about N * u = 800 * 1.1e-16 ~ 1e-13 (a loose bound: pairwise
# summation does better); dividing by sigma ~ 1 and multiplying by |y| <= ~5 keeps it below 1e-12. 1e-10 leaves a
# margin of 100, while any wrong statistic (e.g. the batch's own, or a count off by one) is off by >= 1e-3.
TOL = 1e-10


def _layer(channels=4, **kwargs):
    torch.manual_seed(0)
    layer = IdealStatsBN(channels, **kwargs).double()
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return layer


def _inputs(extra=6, batch=2, channels=4, size=5):
    gen = torch.Generator().manual_seed(1)
    x_extra = torch.randn(extra, channels, size, size, generator=gen, dtype=torch.float64) * 2 + 0.7
    x = torch.randn(batch, channels, size, size, generator=gen, dtype=torch.float64) * 1.5 - 0.3
    return x_extra, x


def test_use_phase_is_bn_over_the_concatenation_and_its_gradient_treats_the_records_as_constants():
    layer = _layer()
    x_extra, x = _inputs()
    layer.set_phase('record')
    out_extra = layer(x_extra)
    # the record pass normalizes with its own statistics and leaves the running statistics alone
    assert torch.allclose(out_extra, F.batch_norm(x_extra, None, None, layer.weight, layer.bias, True, 0.0,
                                                  layer.eps), atol=TOL, rtol=0)
    assert torch.equal(layer.running_mean, torch.zeros(4, dtype=torch.float64)) and layer.num_batches_tracked == 0
    layer.set_phase('use')
    x = x.requires_grad_()
    y = layer(x)
    both = torch.cat([x_extra, x.detach()])
    ref = F.batch_norm(both, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)[-2:]
    assert torch.allclose(y, ref, atol=TOL, rtol=0)
    # running statistics: BN's single update with the 8 images' mean and unbiased variance
    bn = torch.nn.BatchNorm2d(4).double()
    bn(both)
    assert torch.allclose(layer.running_mean, bn.running_mean, atol=TOL, rtol=0)
    assert torch.allclose(layer.running_var, bn.running_var, atol=TOL, rtol=0)
    assert layer.num_batches_tracked == 1 and layer.use_calls == 1 and layer.fallback_calls == 0
    # the gradient: autograd of the pooled-sums formula, the extra images' sums detached (constants)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((y * g).sum(), (x, layer.weight, layer.bias))
    xr = x.detach().clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    dims = (0, 2, 3)
    n = x_extra[:, 0].numel() + xr[:, 0].numel()
    mean = (x_extra.sum(dims) + xr.sum(dims)) / n
    var = ((x_extra**2).sum(dims) + (xr**2).sum(dims)) / n - mean**2
    yr = (xr - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps) * w.view(1, -1, 1, 1) \
        + b.view(1, -1, 1, 1)
    refs = torch.autograd.grad((yr * g).sum(), (xr, w, b))
    for got, want in zip(grads, refs):
        assert torch.allclose(got, want, atol=TOL, rtol=0)
    # not BN's gradient over the batch alone, nor over the concatenation's batch part with the extras differentiated
    alone = torch.autograd.grad((F.batch_norm(xr, None, None, w, b, True, 0.0, layer.eps) * g).sum(), xr)[0]
    assert (grads[0] - alone).abs().max() > 1e-3


def test_fallback_positions_and_modes():
    x_extra, x = _inputs()
    # use without records: plain BN (output and running statistics), counted as a fallback
    layer, bn = _layer(), _layer()
    bn.__class__ = torch.nn.BatchNorm2d
    layer.set_phase('use')
    assert torch.allclose(layer(x), bn(x), atol=TOL, rtol=0)
    assert torch.allclose(layer.running_var, bn.running_var, atol=TOL, rtol=0)
    assert layer.fallback_calls == 1 and layer.use_calls == 1
    # the off phase and eval mode are BN
    layer.set_phase('off')
    assert torch.allclose(layer(x), bn(x), atol=TOL, rtol=0)
    layer.eval(), bn.eval()
    layer.set_phase('use')
    assert torch.allclose(layer(x), bn(x), atol=TOL, rtol=0) and layer.use_calls == 0
    # two calls per iteration: each use pairs with the record at its position; a third use has none: BN
    layer = _layer()
    other_extra, other = x_extra[:, :, :3, :3] * 3, x[:, :, :3, :3] - 1
    layer.set_phase('record')
    layer(x_extra), layer(other_extra)
    layer.set_phase('use')
    for e, b in ((x_extra, x), (other_extra, other)):
        ref = F.batch_norm(torch.cat([e, b]), None, None, layer.weight, layer.bias, True, 0.0, layer.eps)[-2:]
        assert torch.allclose(layer(b), ref, atol=TOL, rtol=0)
    layer(other)
    assert (layer.use_calls, layer.num_records, layer.fallback_calls) == (3, 2, 1)
    # positions out of order: the input's shape differs from its record's, an error
    layer.set_phase('record')
    layer(x_extra), layer(other_extra)
    layer.set_phase('use')
    with pytest.raises(RuntimeError, match='not call this norm in the same order'):
        layer(other)
    with pytest.raises(ValueError, match='phase must be one of'):
        layer.set_phase('window')


def test_ideal_in_the_study_and_the_hook_on_the_toy_detector(tmp_path):
    """Three iterations through the study (its subprocess imports ideal_stats through the config), then one in this
    process: the box head's norms record the sampled RoIs of the 6 extra images, the neck's their feature maps, and
    the extra pass leaves the global random streams where it found them."""
    out = tmp_path / 'study'
    result = detection_study.main(['--methods', 'ideal', '--seeds', '0', '--iters', '3', '--out', str(out),
                                   '--data-root', str(tmp_path / 'data')])
    (run, ) = result['runs']
    assert run['method'] == 'ideal' and run['iters'] == 3 and run['finite_loss'] and 0 <= run['bbox_mAP'] <= 1
    assert 'ideal' in detection_study.CONTROLS and 'ideal' in detection_study.WINDOWED  # not by default; k counts
    path = out / 'runs' / 'ideal_seed0' / 'config.py'
    cfg = Config.fromfile(str(path))
    assert cfg.model.neck.norm_cfg == dict(type='IdealStatsBN', requires_grad=True)
    assert cfg.model.roi_head.bbox_head.norm_cfg == cfg.model.neck.norm_cfg
    assert cfg.custom_hooks == [dict(type='IdealStatsHook', num_images=6)]
    with open(out / 'runs' / 'ideal_seed0' / 'metrics.json') as f:
        assert json.load(f)['window_size'] == 4

    from mmengine.runner import Runner
    cfg.work_dir = str(tmp_path / 'inproc')
    cfg.train_cfg.max_iters = 1
    seen = {}
    before, after = IdealStatsHook.before_train_iter, IdealStatsHook.after_train_iter

    def spy_before(self, runner, batch_idx, data_batch=None):
        states = torch.get_rng_state(), np.random.get_state()[1].copy()
        before(self, runner, batch_idx, data_batch)
        seen['rng'] = (torch.equal(states[0], torch.get_rng_state()), np.array_equal(states[1],
                                                                                     np.random.get_state()[1]))
        seen['records'] = {name: [r[0] for r in layer._records] for name, layer in self._layers}

    def spy_after(self, runner, batch_idx, data_batch=None, outputs=None):
        seen['uses'] = {name: (layer.use_calls, layer.fallback_calls) for name, layer in self._layers}
        after(self, runner, batch_idx, data_batch, outputs)

    IdealStatsHook.before_train_iter, IdealStatsHook.after_train_iter = spy_before, spy_after
    try:
        Runner.from_cfg(cfg).train()
    finally:
        IdealStatsHook.before_train_iter, IdealStatsHook.after_train_iter = before, after
    assert seen['rng'] == (True, True)
    records = seen['records']
    assert len(records) == 4 + 4 + 4  # FPN: 4 lateral and 4 output convs; the box head's 4 shared convs
    assert all(len(r) == 1 for r in records.values())
    head = {name: r[0] for name, r in records.items() if name.startswith('roi_head.')}
    assert len(head) == 4 and set(head.values()) == {6 * 128 * 7 * 7}  # 128 sampled RoIs per image, 7x7
    assert records['neck.lateral_convs.0.bn'] == [6 * 32 * 32]  # stride 4 of the 128x128 images
    assert seen['uses'] == {name: (1, 0) for name in records}
