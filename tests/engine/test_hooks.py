"""CBNBurnInHook: bad settings first, then burn-in, auto window, checkpoints and resume on a tiny Runner."""
import copy
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from torch.utils.data import Dataset

import cbn_mmdet  # noqa: F401
from cbn_mmdet import CBNBurnInHook, CrossIterationBatchNorm2d
from cbn_mmdet.engine import config_uses_cbn


@pytest.mark.parametrize('kwargs, match', [
    (dict(), 'exactly one of burnin_epochs and burnin_iters'),
    (dict(burnin_epochs=1, burnin_iters=5), 'exactly one of burnin_epochs and burnin_iters'),
    (dict(burnin_epochs=-1), 'burnin_epochs must be an int >= 0, got -1'),
    (dict(burnin_iters=-3), 'burnin_iters must be an int >= 0, got -3'),
    (dict(burnin_iters=2.5), 'burnin_iters must be an int >= 0, got 2.5'),
    (dict(burnin_iters=1, window_size=0), "window_size must be an int >= 1 or 'auto', got 0"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBNBurnInHook(**kwargs)


def test_registered_in_root_hooks():
    assert HOOKS.get('CBNBurnInHook') is CBNBurnInHook
    hook = HOOKS.build(dict(type='CBNBurnInHook', burnin_epochs=3))
    assert hook.burnin_epochs == 3


class TinyNet(BaseModel):

    def __init__(self, k=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = CrossIterationBatchNorm2d(8, window_size=k)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = CrossIterationBatchNorm2d(8, window_size=k)

    def forward(self, inputs, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, list) else inputs
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if mode == 'loss':
            return dict(loss=(y - 0.5).square().mean())
        return y


class Noise(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(i)))


class Spy:
    """Records, per iteration, what the layers were told."""

    def __init__(self):
        self.seen = []


def make_runner(work_dir, hook, k=3, max_iters=10, batch_size=2, resume=False, model=None, extra=None):
    cfg = dict(
        model=model or TinyNet(k),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=Noise(), sampler=dict(type='InfiniteSampler', shuffle=True),
                              batch_size=batch_size, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        custom_hooks=[hook],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters)),
        default_scope='mmengine',
        resume=resume,
        experiment_name=f'{osp.basename(str(work_dir))}_{max_iters}_{resume}')
    cfg.update(extra or {})
    return Runner(**cfg)


def test_burnin_schedule(tmp_path):
    k, burnin = 3, 5
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=burnin), k=k, max_iters=9)
    layer = runner.model.bn1
    log = []
    original = layer.begin_iteration

    def spy(mark, use_window=True, collect=True):
        log.append((mark, use_window, collect, layer.window_length))
        original(mark, use_window, collect)

    layer.begin_iteration = spy
    runner.train()
    # window_length is read before the iteration runs
    assert log == [(0, False, False, 0), (1, False, False, 0), (2, False, False, 0), (3, False, True, 0),
                   (4, False, True, 1), (5, True, True, 2), (6, True, True, 2), (7, True, True, 2),
                   (8, True, True, 2)]
    assert layer.module_path == 'bn1'


def test_burnin_epochs_counts_iterations_of_the_loader(tmp_path):
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_epochs=2), max_iters=1)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, CBNBurnInHook))
    assert hook._burnin == 2 * len(runner.train_dataloader)


@pytest.mark.parametrize('batch_size, expected', [(2, 8), (4, 4), (16, 1)])
def test_auto_window_from_batch_size(tmp_path, batch_size, expected):
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=0, window_size='auto'),
                         max_iters=1, batch_size=batch_size)
    runner.train()
    assert runner.model.bn1.window_size == expected and runner.model.bn2.window_size == expected


def test_auto_window_in_norm_cfg_resolved(tmp_path):
    model = TinyNet()
    model.bn1.window_size = 'auto'
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=0), max_iters=2, model=model)
    runner.train()
    assert model.bn1.window_size == 8 and model.bn2.window_size == 3


def test_sync_bn_with_cbn_raises(tmp_path):
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=0), max_iters=1)
    runner.cfg['sync_bn'] = 'torch'
    runner.cfg['model'] = dict(type='X', norm_cfg=dict(type='CBN'))
    with pytest.raises(ValueError, match="sync_bn='torch' and uses CBN"):
        runner.train()


def test_config_uses_cbn():
    assert config_uses_cbn(dict(a=[dict(norm_cfg=dict(type='CBN'))]))
    assert not config_uses_cbn(dict(a=[dict(norm_cfg=dict(type='BN'))]))


def test_checkpoint_holds_windows_and_resume_restores_them(tmp_path):
    k = 4
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=2), k=k, max_iters=6)
    runner.train()
    ckpt = torch.load(osp.join(tmp_path, 'iter_6.pth'), weights_only=False)
    assert set(ckpt['cbn_windows']) == {'bn1', 'bn2'} and ckpt['cbn_windows']['bn1']['count'] == k - 1
    assert set(ckpt['state_dict']) == set(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).state_dict()) \
        or 'bn1.running_mean' in ckpt['state_dict']
    saved = copy.deepcopy(runner.model.bn1.get_window_state())

    resumed = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=2), k=k, max_iters=8, resume=True)
    log = []
    layer = resumed.model.bn1
    original = layer.begin_iteration

    def spy(mark, use_window=True, collect=True):
        log.append((mark, use_window, layer.window_length))
        original(mark, use_window, collect)

    layer.begin_iteration = spy
    resumed.train()
    # the run continued at iteration 6 with the windows open and full: no fresh burn-in
    assert log[0] == (6, True, k - 1)
    assert all(torch.equal(saved['tensors'][key], ckpt['cbn_windows']['bn1']['tensors'][key])
               for key in saved['tensors'])


class SharedTinyNet(TinyNet):
    """bn2 is a head shared across two levels (the map and its 2x average pool): called twice per iteration."""

    def forward(self, inputs, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, list) else inputs
        h = torch.relu(self.bn1(self.conv1(x)))
        ys = [self.bn2(self.conv2(level)) for level in (h, torch.nn.functional.avg_pool2d(h, 2))]
        if mode == 'loss':
            return dict(loss=sum((y - 0.5).square().mean() for y in ys))
        return ys


def test_checkpoint_holds_per_call_windows_and_resume_restores_them(tmp_path):
    k = 3
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=2), k=k, max_iters=5,
                         model=SharedTinyNet(k))
    runner.train()
    saved = runner.model.bn2.get_window_state()
    ckpt = torch.load(osp.join(tmp_path, 'iter_5.pth'), weights_only=False)
    state = ckpt['cbn_windows']['bn2']
    assert state['calls'] == 2 and state['count'] == k - 1 and [s['count'] for s in state['later_calls']] == [k - 1]
    assert 'later_calls' not in ckpt['cbn_windows']['bn1']

    model = SharedTinyNet(k)
    resumed = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=2), k=k, max_iters=6, resume=True,
                          model=model)
    log = []
    original = model.bn2.begin_iteration

    def spy(mark, use_window=True, collect=True):
        log.append((mark, model.bn2.window_lengths, model.bn2.calls_per_iteration))
        restored = model.bn2.get_window_state()
        log.append(all(torch.equal(a['tensors'][key], b['tensors'][key])
                       for a, b in zip([saved] + saved['later_calls'], [restored] + restored['later_calls'])
                       for key in a['tensors']))
        original(mark, use_window, collect)

    model.bn2.begin_iteration = spy
    resumed.train()
    assert log[:2] == [(5, [k - 1, k - 1], 2), True]  # resumed with both positions' windows, unchanged
    assert model.bn2.window_lengths == [k - 1, k - 1]
