"""CBNStatsErrorHook: bad settings, training left unchanged, and its errors against an independent computation."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

import cbn_mmdet  # noqa: F401
from cbn_mmdet import CrossIterationBatchNorm2d
from cbn_mmdet.engine import CBNStatsErrorHook
from cbn_mmdet.ops import batch_moments, relative_stat_errors


@pytest.mark.parametrize('kwargs, match', [
    (dict(interval=0), 'interval must be an int >= 1, got 0'),
    (dict(num_images=2.0), 'num_images must be an int >= 1, got 2.0'),
    (dict(chunk=True), 'chunk must be an int >= 1, got True'),
    (dict(layers='bn1'), "layers must be a list of module names, got 'bn1'"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBNStatsErrorHook(**kwargs)


def test_registered_in_root_hooks():
    assert HOOKS.get('CBNStatsErrorHook') is CBNStatsErrorHook


class Net(BaseModel):
    """BN (plain, batch statistics) -> conv -> CBN -> ReLU -> conv -> CBN -> dropout: RNG is used in training."""

    def __init__(self, k=4, compensate=True, with_cp=False):
        super().__init__()
        self.with_cp = with_cp
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = CrossIterationBatchNorm2d(8, window_size=k, compensate=compensate)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, stride=2)
        self.bn2 = CrossIterationBatchNorm2d(8, window_size=k, compensate=compensate)
        self.drop = nn.Dropout(0.3)

    def forward(self, inputs, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, list) else inputs
        h = torch.relu(self.bn1(self.conv1(self.bn0(x))))
        if self.with_cp and torch.is_grad_enabled():  # recomputed during backward, after the window's push
            y = checkpoint(lambda t: self.bn2(self.conv2(t)), h, use_reentrant=False)
        else:
            y = self.bn2(self.conv2(h))
        y = self.drop(y)
        return dict(loss=(y - 0.5).square().mean() + y.mean((0, 2, 3)).square().sum()) if mode == 'loss' else y


class Images(Dataset):

    def __len__(self):
        return 24

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 8, 8, generator=g) * (1 + i % 3) + i % 5)


class Spy(Hook):
    """Independently records, at one iteration, the pre-step weights and what each layer normalized with: per
    layer (batch moments, replay), or with ``every_call`` a list of them, one per call."""
    priority = 'VERY_HIGH'

    def __init__(self, at, names=('bn0', 'bn1', 'bn2'), every_call=False):
        self.at, self.seen, self.handles = at, {}, []
        self.names, self.every_call = names, every_call

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter != self.at:
            return
        model = runner.model
        self.seen['params'] = {n: p.detach().clone() for n, p in model.named_parameters()}

        def grab(name):
            def hook(module, args, out):
                seen = (batch_moments(args[0].detach()), getattr(module, 'last_call', None))
                if self.every_call:
                    self.seen.setdefault(name, []).append(seen)
                else:
                    self.seen[name] = seen
            return hook

        for name in self.names:
            self.handles.append(getattr(model, name).register_forward_hook(grab(name)))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        for h in self.handles:
            h.remove()
        self.handles = []


class SharedNet(BaseModel):
    """BN -> conv -> CBN -> ReLU, then a head shared across two levels (the map and its 2x average pool):
    conv -> CBN, the same modules called once per level, as mmdet's heads are across FPN levels."""

    def __init__(self, k=4, compensate=True, with_cp=False):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = CrossIterationBatchNorm2d(8, window_size=k, compensate=compensate)
        self.head_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head_bn = CrossIterationBatchNorm2d(8, window_size=k, compensate=compensate)

    def levels(self, x):
        h = torch.relu(self.bn1(self.conv1(self.bn0(x))))
        return [h, F.avg_pool2d(h, 2)]

    def forward(self, inputs, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, list) else inputs
        ys = [self.head_bn(self.head_conv(h)) for h in self.levels(x)]
        if mode != 'loss':
            return ys
        return dict(loss=sum((y - 0.5 * i).square().mean() + y.mean((0, 2, 3)).square().sum()
                             for i, y in enumerate(ys)))


def make_runner(work_dir, hooks, max_iters, k=4, compensate=True, lr=0.05, with_cp=False, model=Net):
    torch.manual_seed(0)  # the model is built before the Runner seeds
    return Runner(
        model=model(k, compensate, with_cp),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=Images(), sampler=dict(type='InfiniteSampler', shuffle=True), batch_size=2,
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=lr, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        custom_hooks=[dict(type='CBNBurnInHook', burnin_iters=3)] + hooks,
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters + 1)),
        visualizer=dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')]),
        randomness=dict(seed=0),
        default_scope='mmengine',
        experiment_name=f'{osp.basename(str(work_dir))}')


def _pop(x):
    x = x.double()
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def test_errors_match_an_independent_computation(tmp_path):
    at = 9  # measured: (iter + 1) % interval == 0
    spy = Spy(at)
    hook = CBNStatsErrorHook(interval=10, num_images=12, chunk=5)
    runner = make_runner(tmp_path, [spy, hook], max_iters=at + 1)
    runner.train()
    records = {r['layer']: r for r in hook.records}
    assert sorted(records) == ['bn1', 'bn2'] and all(r['iter'] == at + 1 for r in records.values())

    # population: the hook's fixed images through the pre-step weights, every norm frozen to its training stats
    p = spy.seen['params']
    images = torch.cat([torch.stack(b['inputs']) for b in hook._batches]).double()
    assert images.shape[0] == 12
    (mu0, s0), _ = spy.seen['bn0']
    h = F.batch_norm(images, mu0.double(), s0.double(), p['bn0.weight'].double(), p['bn0.bias'].double(), False,
                     0.0, 1e-5)
    x1 = F.conv2d(h, p['conv1.weight'].double(), p['conv1.bias'].double(), padding=1)
    batch1, replay1 = spy.seen['bn1']
    h = torch.relu(F.batch_norm(x1, replay1.stats.mu_bar.double(), replay1.stats.var_bar.double(),
                                p['bn1.weight'].double(), p['bn1.bias'].double(), False, 0.0, 1e-5))
    x2 = F.conv2d(h, p['conv2.weight'].double(), None, padding=1, stride=2)
    batch2, replay2 = spy.seen['bn2']
    for name, x, batch, replay in (('bn1', x1, batch1, replay1), ('bn2', x2, batch2, replay2)):
        pop = _pop(x)
        errors = records[name]['errors']
        assert records[name]['n_iters'] == 4
        np.testing.assert_allclose(errors['BN'], relative_stat_errors(*batch, *pop), rtol=1e-5)
        np.testing.assert_allclose(errors['CBN'], relative_stat_errors(replay.stats.mu_bar, replay.stats.var_bar, *pop),
                                   rtol=1e-5)
        assert abs(errors['CBN'][0] - errors['Naive'][0]) > 1e-4  # compensation moved the window
        assert all(e > 0 for est in errors.values() for e in est)

    # the outputs: json, visualizer scalars, message hub
    with open(osp.join(runner.work_dir, 'cbn_stats_error.json')) as f:
        assert len(json.load(f)['records']) == 2
    with open(osp.join(runner.log_dir, 'vis_data', 'scalars.json')) as f:
        logged = [json.loads(line) for line in f]
    assert any('cbn_stats/bn2/Naive_sd' in row for row in logged)
    assert 'train/cbn_err_mu_CBN' in runner.message_hub.log_scalars


def test_training_is_unchanged(tmp_path):
    """Same seed with and without the hook: bit-identical weights (the hook restores parameters and RNG)."""
    plain = make_runner(tmp_path / 'plain', [], max_iters=12)
    plain.train()
    hook = CBNStatsErrorHook(interval=4, num_images=6, chunk=4)
    measured = make_runner(tmp_path / 'measured', [hook], max_iters=12)
    measured.train()
    assert [r['iter'] for r in hook.records] == [4, 4, 8, 8, 12, 12]  # windows open from iteration 3 (0-based)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), measured.model.named_parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(plain.model.buffers(), measured.model.buffers()):
        assert torch.equal(a, b)


def test_gradient_checkpointing_measures_the_first_forward(tmp_path):
    """A recomputation during backward (after the push) must not replace what the training forward used."""
    hooks = [CBNStatsErrorHook(interval=4, num_images=6), CBNStatsErrorHook(interval=4, num_images=6)]
    make_runner(tmp_path / 'plain', [hooks[0]], max_iters=8).train()
    make_runner(tmp_path / 'cp', [hooks[1]], max_iters=8, with_cp=True).train()
    assert len(hooks[0].records) == len(hooks[1].records) == 4
    for a, b in zip(*(h.records for h in hooks)):
        assert a['layer'] == b['layer'] and a['iter'] == b['iter']
        for est in a['errors']:
            np.testing.assert_allclose(a['errors'][est], b['errors'][est], rtol=1e-5)


def test_naive_layers_report_naive_equal_to_cbn(tmp_path):
    hook = CBNStatsErrorHook(interval=5, num_images=4, layers=['bn2'])
    make_runner(tmp_path, [hook], max_iters=10, compensate=False).train()
    assert [r['layer'] for r in hook.records] == ['bn2', 'bn2']
    for r in hook.records:
        # the same window average by two formulas: the layer's fused shifted two-pass form (around mu_t) and the
        # hook's reference two-pass form (around mu_bar). Each rounds a few fp32 ops (u = 6e-8) on O(1) values,
        # and the errors are differences of O(0.1-1) relative to the population's spread: 1e-5 is > 100 u
        np.testing.assert_allclose(r['errors']['CBN'], r['errors']['Naive'], rtol=1e-5, atol=1e-7)
        assert r['errors']['CBN'] != r['errors']['BN']


def test_unknown_layer_names_raise(tmp_path):
    runner = make_runner(tmp_path, [CBNStatsErrorHook(layers=['bn1', 'head.bn'])], max_iters=1)
    with pytest.raises(ValueError, match=r"layers \['head.bn'\] are not CBN layers of the model; its CBN layers "
                                         r"are \['bn1', 'bn2'\]"):
        runner.train()


def test_shared_head_is_measured_per_call(tmp_path):
    """A layer called once per level: one record per call position, each against that level's own population and
    the statistics that call normalized with; the measurement forwards take no call position (the next iterations
    run on, and training is bit-identical with and without the hook)."""
    at = 9
    spy = Spy(at, names=('bn0', 'bn1', 'head_bn'), every_call=True)
    hook = CBNStatsErrorHook(interval=10, num_images=8, chunk=3)
    runner = make_runner(tmp_path / 'shared_measured', [spy, hook], max_iters=at + 3, model=SharedNet)
    runner.train()
    records = {(r['layer'], r['call']): r for r in hook.records}
    assert sorted(records) == [('bn1', 0), ('head_bn', 0), ('head_bn', 1)]
    assert all(r['n_iters'] == 4 for r in records.values())
    model = runner.model
    assert model.head_bn.window_lengths == [3, 3] and model.head_bn.calls_per_iteration == 2

    p = spy.seen['params']
    images = torch.cat([torch.stack(b['inputs']) for b in hook._batches]).double()
    [((mu0, s0), _)] = spy.seen['bn0']
    h = F.batch_norm(images, mu0.double(), s0.double(), p['bn0.weight'].double(), p['bn0.bias'].double(), False,
                     0.0, 1e-5)
    [(_, replay1)] = spy.seen['bn1']
    x1 = F.conv2d(h, p['conv1.weight'].double(), p['conv1.bias'].double(), padding=1)
    h = torch.relu(F.batch_norm(x1, replay1.stats.mu_bar.double(), replay1.stats.var_bar.double(),
                                p['bn1.weight'].double(), p['bn1.bias'].double(), False, 0.0, 1e-5))
    for call, level in enumerate([h, F.avg_pool2d(h, 2)]):
        x = F.conv2d(level, p['head_conv.weight'].double(), p['head_conv.bias'].double(), padding=1)
        batch, replay = spy.seen['head_bn'][call]
        errors = records[('head_bn', call)]['errors']
        np.testing.assert_allclose(errors['BN'], relative_stat_errors(*batch, *_pop(x)), rtol=1e-5)
        np.testing.assert_allclose(errors['CBN'], relative_stat_errors(replay.stats.mu_bar, replay.stats.var_bar,
                                                                       *_pop(x)), rtol=1e-5)
    assert records[('head_bn', 0)]['errors'] != records[('head_bn', 1)]['errors']
    with open(osp.join(runner.log_dir, 'vis_data', 'scalars.json')) as f:
        logged = [json.loads(line) for line in f]
    assert any('cbn_stats/head_bn/call1/CBN_mu' in row for row in logged)
    assert any('cbn_stats/bn1/CBN_mu' in row for row in logged)

    plain = make_runner(tmp_path / 'shared_plain', [], max_iters=at + 3, model=SharedNet)
    plain.train()
    for (name, a), (_, b) in zip(plain.model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(plain.model.buffers(), model.buffers()):
        assert torch.equal(a, b)


def test_a_record_of_another_batch_is_left_out_with_a_warning(tmp_path, monkeypatch):
    """If the layer's record of what it normalized with is not of the batch the hook sees, the hook must not
    report BN's error as CBN's: it warns and measures nothing for that layer."""
    import cbn_mmdet.engine.stats_hook as stats_hook
    monkeypatch.setattr(stats_hook, 'same_batch', lambda a, b: torch.tensor(False))
    hook = CBNStatsErrorHook(interval=5, num_images=4, layers=['bn2'])
    with pytest.warns(UserWarning, match='this measurement is left out'):
        make_runner(tmp_path, [hook], max_iters=10).train()
    assert hook.records == []
