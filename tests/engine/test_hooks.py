"""CBNBurnInHook: bad settings first, then burn-in, auto window, checkpoints and resume on a tiny Runner."""
import copy
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from mmengine.hooks import CheckpointHook
from mmengine.model import BaseModel
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from torch.utils.data import Dataset

import cbn_mmdet  # noqa: F401
from cbn_mmdet import CBNBurnInHook, CrossIterationBatchNorm2d
from cbn_mmdet.engine import cbn_layers, compiles, config_uses_cbn, eval_mode_layers, ohem_heads_with_cbn
from cbn_mmdet.engine import hooks as hooks_module

from ..models.common import same_windows


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


@pytest.mark.parametrize('option, refused', [(True, True), (dict(mode='default'), True), (dict(), True),
                                               (dict(backend='aot_eager'), True), (dict(backend='eager'), False),
                                               (dict(disable=True), False), (False, False)])
def test_compile_with_cbn_raises(tmp_path, option, refused):
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=0), max_iters=1)
    runner.cfg['compile'] = option
    assert compiles(runner.cfg) == refused
    if refused:  # mmengine would compile train_step into graphs: the CBN layers would act as BN
        with pytest.raises(ValueError, match=r'compile=.* and the model has 2 CBN layers'):
            runner.call_hook('before_run')
    else:
        runner.call_hook('before_run')


class NormEvalNet(TinyNet):
    """Keeps bn1 in eval mode in training, as mmdet's ResNet does with norm_eval=True."""

    def train(self, mode=True):
        super().train(mode)
        self.bn1.eval()
        return self


class FrozenStageNet(TinyNet):
    """bn1 in eval mode with frozen parameters, as mmdet's frozen_stages leaves a stage: deliberate, not reported."""

    def __init__(self):
        super().__init__()
        for p in [*self.conv1.parameters(), *self.bn1.parameters()]:
            p.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.bn1.eval()
        return self


@pytest.mark.parametrize('model, frozen', [(NormEvalNet, ['bn1']), (TinyNet, []), (FrozenStageNet, [])])
def test_layers_left_in_eval_mode_in_training_are_reported_once(tmp_path, monkeypatch, model, frozen):
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=1), max_iters=4, model=model())
    warned = []
    monkeypatch.setattr(runner.logger, 'warning', lambda msg, *args, **kwargs: warned.append(msg))
    runner.train()  # the real loop: it calls model.train() before every iteration's hooks
    warned = [msg for msg in warned if 'eval mode' in msg]
    if frozen:
        assert len(warned) == 1 and '1 of 2 CBN layers stay in eval mode' in warned[0] and 'bn1' in warned[0]
        assert 'norm_eval=False' in warned[0]
        assert runner.model.bn1.window_at(0) is None and runner.model.bn2.window_at(0) is not None
    else:
        assert warned == []
        assert (runner.model.bn1.window_at(0) is None) == (model is FrozenStageNet)


@pytest.mark.parametrize('norm_eval', [False, True])
def test_eval_mode_layers_of_mmdet_resnet(norm_eval):
    from mmdet.models.backbones import ResNet  # mmdet's own frozen_stages and norm_eval
    net = ResNet(depth=18, frozen_stages=1, norm_eval=norm_eval, norm_cfg=dict(type='CBN', window_size=2))
    net.train()  # mmdet's train() freezes the stages and, with norm_eval, every norm (it returns None)
    layers = list(cbn_layers(net))
    found = eval_mode_layers(layers)
    stage_1 = [name for name, _ in layers if name == 'bn1' or name.startswith('layer1.')]
    assert stage_1 and all(not layer.training for name, layer in layers if name in stage_1)  # frozen: not listed
    assert found == ([name for name, _ in layers if name not in stage_1] if norm_eval else [])


def _detector(rcnn_sampler, roi_norm, rpn_sampler='RandomSampler', stages=1):
    rcnn = dict(sampler=dict(type=rcnn_sampler, num=512))
    return dict(type='FasterRCNN', rpn_head=dict(type='RPNHead'),
                roi_head=dict(type='StandardRoIHead', bbox_head=dict(type='Shared4Conv1FCBBoxHead',
                                                                       norm_cfg=dict(type=roi_norm))),
                train_cfg=dict(rpn=dict(sampler=dict(type=rpn_sampler)), rcnn=[rcnn] * stages if stages > 1 else rcnn))


@pytest.mark.parametrize('model, mined', [
    (_detector('OHEMSampler', 'CBN'), ['roi_head']), (_detector('mmdet.OHEMSampler', 'CBN', stages=3), ['roi_head']),
    (_detector('OHEMSampler', 'BN'), []), (_detector('RandomSampler', 'CBN'), []),
    (_detector('RandomSampler', 'CBN', rpn_sampler='OHEMSampler'), [])])  # the RPN head has no CBN here
def test_ohem_mining_a_cbn_head_is_refused(tmp_path, model, mined):
    assert ohem_heads_with_cbn(model) == mined
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=0), max_iters=1)
    runner.cfg['model'] = model
    if mined:
        with pytest.raises(ValueError, match="OHEMSampler mines roi_head, which use CBN"):
            runner.call_hook('before_run')
    else:
        runner.call_hook('before_run')


def test_config_uses_cbn():
    assert config_uses_cbn(dict(a=[dict(norm_cfg=dict(type='CBN'))]))
    assert not config_uses_cbn(dict(a=[dict(norm_cfg=dict(type='BN'))]))


def test_checkpoint_holds_windows_and_resume_restores_them(tmp_path, monkeypatch):
    k = 4
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=2), k=k, max_iters=6)
    monkeypatch.setattr(hooks_module, 'all_gather_object', None)  # a 1-process run gathers nothing
    runner.train()
    ckpt = torch.load(osp.join(tmp_path, 'iter_6.pth'), weights_only=False)
    assert set(ckpt['cbn_windows']) == {'bn1', 'bn2'} and ckpt['cbn_windows']['bn1']['count'] == k - 1
    assert 'cbn_windows_per_rank' not in ckpt
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


# ---------------------------------------------------------------------- every rank's windows (a faked world)
class Log:
    """A runner.logger that keeps its lines."""

    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(('info', msg))

    def warning(self, msg):
        self.lines.append(('warning', msg))


def fake_world(monkeypatch, world, rank, others=None):
    """get_world_size/get_rank of the hook's module faked; all_gather_object returns this rank's states at
    ``rank`` and ``others(states, r)`` at every other rank r. Returns the list of gathers."""
    gathers = []

    def gather(states):
        gathers.append(states)
        return [states if r == rank else others(states, r) for r in range(world)]

    monkeypatch.setattr(hooks_module, 'get_world_size', lambda: world)
    monkeypatch.setattr(hooks_module, 'get_rank', lambda: rank)
    monkeypatch.setattr(hooks_module, 'all_gather_object', gather)
    return gathers


def shifted(states, r):
    """Another rank's windows: a tensor that a window keeps as it is (the kernel gradient of s of a compensating
    layer, else the mean) shifted by r."""
    out = copy.deepcopy(states)
    for state in out.values():
        for sub in [state, *(state.get('later_calls') or ())]:
            key = 'g_s' if 'g_s' in sub['tensors'] else 'mu'
            if key in sub['tensors']:
                sub['tensors'][key] = sub['tensors'][key] + r
    return out


def windows_of(model):
    return {name: layer.get_window_state() for name, layer in cbn_layers(model)}


@pytest.mark.parametrize('by_epoch', [False, True])
def test_distributed_run_gathers_every_ranks_windows_only_when_a_checkpoint_is_due(tmp_path, monkeypatch,
                                                                                    by_epoch):
    gathers = fake_world(monkeypatch, 2, 0, shifted)
    seen = []
    if by_epoch:  # 4 iterations an epoch; saves after epoch 2 (interval) and 3 (the last)
        extra = dict(train_cfg=dict(by_epoch=True, max_epochs=3),
                     train_dataloader=dict(dataset=Noise(), sampler=dict(type='DefaultSampler', shuffle=True),
                                           batch_size=2, collate_fn=dict(type='default_collate')),
                     default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=True, interval=2)))
        saves, name = [8, 12], 'epoch_2.pth'  # runner.iter at each save
    else:  # saves after iterations 2 and 5 (interval 3 from save_begin 2) and 7 (the last)
        extra = dict(default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=3, save_begin=2)))
        saves, name = [1, 4, 6], 'iter_2.pth'
    runner = make_runner(tmp_path, dict(type='CBNBurnInHook', burnin_iters=2), k=3, max_iters=7, extra=extra)
    original = runner.save_checkpoint

    def save(*args, **kwargs):
        seen.append((runner.iter, copy.deepcopy(windows_of(runner.model))))
        return original(*args, **kwargs)

    runner.save_checkpoint = save
    runner.train()
    assert [it for it, _ in seen] == saves and len(gathers) == len(saves)  # once for each save, never between
    hook = next(h for h in runner.hooks if isinstance(h, CBNBurnInHook))
    assert hook._per_rank is None  # not kept past the run
    ckpt = torch.load(osp.join(tmp_path, name), weights_only=False)
    per_rank = ckpt['cbn_windows_per_rank']
    assert per_rank['world_size'] == 2 and ckpt['cbn_windows'] is per_rank['ranks'][0]  # stored once
    mine = seen[0][1]
    assert same_windows(per_rank['ranks'][0], mine) and mine['bn1']['count'] == 2
    assert same_windows(per_rank['ranks'][1], shifted(mine, 1))


def test_gather_for_the_best_checkpoint_and_warning_for_an_unforeseen_save(monkeypatch):
    gathers = fake_world(monkeypatch, 2, 1, shifted)
    model, log = TinyNet(), Log()
    runner = SimpleNamespace(model=model, logger=log, hooks=[CheckpointHook(interval=5, save_best='acc')])
    hook = CBNBurnInHook(burnin_iters=0)
    hook.after_val_epoch(runner, {})
    assert not gathers
    hook.after_val_epoch(runner, {'acc': 0.5})
    hook.after_val_epoch(runner, {'acc': 0.5})  # nothing trained since: no second gather
    assert len(gathers) == 1 and hook._per_rank is None  # rank 1 keeps nothing

    runner.hooks = []  # no CheckpointHook, nothing foreseen: rank 0's windows alone, said so
    checkpoint = {}
    fake_world(monkeypatch, 2, 0)
    hook.before_save_checkpoint(runner, checkpoint)
    assert set(checkpoint) == {'cbn_windows'}
    assert log.lines[-1][0] == 'warning' and "only rank 0's CBN windows" in log.lines[-1][1]


@pytest.fixture(scope='module')
def window_states(tmp_path_factory):
    """Windows of a k=4 TinyNet after 5 iterations (3 iterations each)."""
    runner = make_runner(tmp_path_factory.mktemp('states'), dict(type='CBNBurnInHook', burnin_iters=2), k=4,
                         max_iters=5)
    runner.train()
    states = windows_of(runner.model)
    assert all(state['count'] == 3 for state in states.values())
    return states


def load(states_checkpoint, k=4):
    model, log = TinyNet(k), Log()
    CBNBurnInHook(burnin_iters=0).after_load_checkpoint(SimpleNamespace(model=model, logger=log),
                                                         states_checkpoint)
    return windows_of(model), log.lines


def per_rank_checkpoint(states, world):
    ranks = [shifted(states, r) for r in range(world)]
    return {'cbn_windows': ranks[0], 'cbn_windows_per_rank': dict(world_size=world, ranks=ranks)}


@pytest.mark.parametrize('rank', [0, 1])
def test_resume_on_the_same_world_size_restores_each_ranks_own_windows(window_states, monkeypatch, rank):
    fake_world(monkeypatch, 2, rank)
    restored, lines = load(per_rank_checkpoint(window_states, 2))
    assert same_windows(restored, shifted(window_states, rank))
    assert lines == [('info', 'CBNBurnInHook: restored the windows of 2 CBN layers from the checkpoint '
                              '(each rank its own, 2 ranks)')]


@pytest.mark.parametrize('world, rank', [(3, 2), (1, 0)])
def test_resume_on_another_world_size_restores_rank_0s_windows_on_every_rank(window_states, monkeypatch, world,
                                                                               rank):
    fake_world(monkeypatch, world, rank)
    restored, lines = load(per_rank_checkpoint(window_states, 2))
    assert same_windows(restored, window_states)  # rank 0's (shifted by 0)
    assert lines[0] == ('warning', f'CBNBurnInHook: the checkpoint holds the CBN windows of 2 ranks, this run has '
                                   f"{world}: every rank restores rank 0's windows")
    assert lines[1][1].endswith(f"(rank 0's of 2 ranks on each of {world})")


@pytest.mark.parametrize('world, rank', [(1, 0), (2, 1)])
def test_old_checkpoint_restores_its_one_set_of_windows_on_every_rank(window_states, monkeypatch, world, rank):
    fake_world(monkeypatch, world, rank)
    restored, lines = load({'cbn_windows': window_states})
    assert same_windows(restored, window_states)
    source = '' if world == 1 else ' (one set of windows, without per-rank windows, on each of 2 ranks)'
    assert lines == [('info', f'CBNBurnInHook: restored the windows of 2 CBN layers from the checkpoint{source}')]


def test_windows_of_another_size_are_logged_in_one_line(window_states):
    restored, lines = load({'cbn_windows': window_states}, k=3)
    assert all(state['count'] == 2 and state['window_size'] == 3 for state in restored.values())
    notes = [msg for level, msg in lines if level == 'warning']
    assert len(notes) == 1 and notes[0].startswith('CBNBurnInHook: 2 CBN layers were configured with another '
                                                   "window size than the checkpoint holds, e.g. ")
    assert 'k=4' in notes[0] and 'k=3' in notes[0] and "'bn1'" in notes[0]
