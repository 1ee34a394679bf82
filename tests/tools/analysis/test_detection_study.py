"""tools/analysis/detection_study.py and detection_stats_error.py run on a tiny budget; well-formed output."""
import json
import math
import os.path as osp
import sys

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.runner import CheckpointLoader

import cbn_mmdet  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
sys.path.insert(0, osp.join(ROOT, 'tools'))

import detection_stats_error  # noqa: E402
import detection_study  # noqa: E402
import head_stats_study  # noqa: E402


def test_study_tiny_run(tmp_path):
    out = tmp_path / 'study'
    argv = ['--methods', 'bn-small', 'cbn-authors', 'bn-large', '--seeds', '0', '1', '--iters', '6',
            '--large-batch', '3', '--pretrain-iters', '4', '--out', str(out), '--data-root', str(tmp_path / 'data')]
    result = detection_study.main(argv)
    with open(out / 'detection_study.json') as f:
        saved = json.load(f)
    assert saved['summary'] == json.loads(json.dumps(result['summary']))
    assert sorted(saved['summary']) == ['bn-large', 'bn-small', 'cbn-authors']
    for method, row in saved['summary'].items():
        assert row['n'] == 2 and row['images_per_iter'] == (3 if method == 'bn-large' else 2)
        for key in detection_study.METRICS:
            mean, std = row[key]
            assert 0 <= mean <= 1 and std >= 0
    assert {(r['method'], r['seed']) for r in saved['runs']} == {
        (m, s) for m in ('bn-small', 'cbn-authors', 'bn-large') for s in (0, 1)}
    # paired differences, per seed, from the runs
    by = {(r['method'], r['seed']): r for r in saved['runs']}
    assert set(saved['paired']) == {'cbn-authors - bn-small', 'bn-large - bn-small'}
    for a, b in (('cbn-authors', 'bn-small'), ('bn-large', 'bn-small')):
        pair = saved['paired'][f'{a} - {b}']
        assert pair['n'] == 2 and pair['seeds'] == [0, 1]
        assert math.isclose(pair['bbox_mAP']['mean'], sum(by[(a, s)]['bbox_mAP'] - by[(b, s)]['bbox_mAP']
                                                          for s in (0, 1)) / 2, abs_tol=1e-12)
    assert all(r['iters'] == 6 and r['train_cpu_s'] > 0 for r in saved['runs'])
    assert (out / 'detection_study.png').stat().st_size > 1000
    # each run's config normalizes the neck and the box head with its method, and nothing else is left over
    for method, norm in (('bn-small', dict(type='BN', requires_grad=True)),
                         ('cbn-authors', dict(type='CBN', window_size=4, backward='authors', requires_grad=True))):
        cfg = Config.fromfile(str(out / 'runs' / f'{method}_seed1' / 'config.py'))
        assert cfg.model.neck.norm_cfg == norm and cfg.model.roi_head.bbox_head.norm_cfg == norm
        assert cfg.randomness.seed == 1 and cfg.train_dataloader.batch_size == 2
        assert [h['type'] for h in cfg.custom_hooks] == (['CBNBurnInHook'] if 'cbn' in method else [])
    # the pretrained backbone: loaded from the pretraining run's checkpoint, and frozen
    checkpoint = saved['pretrain']['checkpoint']
    assert saved['pretrain']['iters'] == 4 and osp.exists(checkpoint)
    assert all(r['backbone_checkpoint'] == checkpoint for r in saved['runs'])
    assert cfg.model.backbone.frozen_stages == 4 and cfg.model.backbone.norm_eval
    register_all_modules()
    model = MODELS.build(cfg.model)
    model.init_weights()
    state = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')['state_dict']  # weights_only loader
    backbone = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    assert backbone and all(torch.equal(model.backbone.state_dict()[k], v) for k, v in backbone.items())
    # resume: the runs on disk are not run again (the pretraining run included); other settings are refused
    metrics = out / 'runs' / 'bn-small_seed0' / 'metrics.json'
    stamp = metrics.stat().st_mtime_ns, (out / 'pretrain' / 'runs' / 'bn-small_seed100' / 'metrics.json').stat(
    ).st_mtime_ns
    again = detection_study.main(argv)
    assert again['summary'] == result['summary']
    assert stamp == (metrics.stat().st_mtime_ns, (out / 'pretrain' / 'runs' / 'bn-small_seed100' / 'metrics.json'
                                                   ).stat().st_mtime_ns)
    # --summarize trains nothing and keeps to the requested runs on disk
    only = detection_study.main(argv[:1] + ['bn-small', 'gn'] + argv[4:] + ['--summarize'])
    assert sorted(only['summary']) == ['bn-small'] and only['summary']['bn-small'] == result['summary']['bn-small']
    assert not (out / 'runs' / 'gn_seed0').exists()
    with pytest.raises(ValueError, match="use another --out"):
        detection_study.main(argv[:-4] + ['--lr', '0.01', '--out', str(out), '--data-root', str(tmp_path / 'data')])


def test_head_stats_study_and_precise_bn_tool(tmp_path):
    """tools/precise_bn.py and the head-statistics study on a tiny trained BN model (the pretraining run)."""
    out = tmp_path / 'study'
    detection_study.main(['--methods', 'bn-small', '--seeds', '0', '--iters', '4', '--save-checkpoint',
                          '--out', str(out), '--data-root', str(tmp_path / 'data')])
    summary = head_stats_study.main(['--study', str(out), '--methods', 'bn-small', '--seeds', '0', '--num-images',
                                     '4', '--conditions', 'head-test', 'head-train'])
    assert {(r['condition'], len(r['layers'])) for r in summary['runs']} == {('head-test', 4), ('head-train', 4)}
    for r in summary['runs']:
        assert all(name.startswith('roi_head.') for name in r['layers'])
        assert 0 <= r['bbox_mAP'] <= 1 and r['trained']['bbox_mAP'] >= 0
    assert set(summary['paired']) == {'bn-small: head-test - trained', 'bn-small: head-train - trained'}
    # the tool: only the head's statistics change, to those it measured
    import precise_bn
    run = out / 'runs' / 'bn-small_seed0'
    result = precise_bn.main([str(run / 'config.py'), str(run / 'iter_4.pth'), '--num-images', '4', '--out',
                              str(tmp_path / 'precise.pth'), '--work-dir', str(tmp_path / 'work')])
    before = CheckpointLoader.load_checkpoint(str(run / 'iter_4.pth'), map_location='cpu')['state_dict']
    saved = CheckpointLoader.load_checkpoint(str(tmp_path / 'precise.pth'), map_location='cpu')
    assert saved['meta']['precise_bn']['source'] == 'test' and len(result['layers']) == 4
    changed = {k for k, v in saved['state_dict'].items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith('roi_head.') and k.endswith(('running_mean', 'running_var'))
                           for k in changed)
    with pytest.raises(ValueError, match='no BN/CBN layer'):
        precise_bn.main([str(run / 'config.py'), str(run / 'iter_4.pth'), '--modules', 'nothing', '--work-dir',
                         str(tmp_path / 'work')])


def test_stats_error_tiny_run(tmp_path):
    out = tmp_path / 'stats'
    result = detection_stats_error.main(['--ks', '3', '--lrs', '0.02', '--subsamples', '1', '2', '--iters', '12',
                                         '--interval', '4', '--out', str(out), '--data-root', str(tmp_path / 'data')])
    with open(out / 'detection_stats_error.json') as f:
        saved = json.load(f)
    assert saved['runs'] == json.loads(json.dumps(result['runs']))
    assert [(run['k'], run['subsample']) for run in saved['runs']] == [(3, 1), (3, 2)]
    for run in saved['runs']:
        assert run['measurements'] == 3 * 12  # iterations 4, 8, 12 (windows open at 2), 12 layers
        for group in ('neck', 'roi_head', 'all'):
            for est in detection_stats_error.ESTIMATORS:
                err_mu, err_sd = run['error'][group][est]
                assert math.isfinite(err_mu) and math.isfinite(err_sd) and err_mu > 0 and err_sd > 0
    # the approximation is in the r=2 run's norm (neck and head), and only there
    exact = Config.fromfile(str(out / 'k3_lr0.02' / 'runs' / 'cbn_seed0' / 'config.py'))
    approx = Config.fromfile(str(out / 'k3_lr0.02_sub2' / 'runs' / 'cbn_seed0' / 'config.py'))
    assert 'stat_grad_subsample' not in exact.model.neck.norm_cfg
    assert approx.model.neck.norm_cfg.stat_grad_subsample == 2
    assert approx.model.roi_head.bbox_head.norm_cfg.stat_grad_subsample == 2
    assert (out / 'detection_stats_error.png').stat().st_size > 1000
    # the JSON says which layer options the figures come from, the defaults included (k is each setting's)
    assert saved['layer'] == dict(backward='exact', second_order=0)
    assert saved['settings']['method'] == 'cbn' and saved['norm_cfg'] == dict(type='CBN')


def test_stats_error_with_the_second_order_term(tmp_path):
    out = tmp_path / 'stats2'
    detection_stats_error.main(['--ks', '3', '--lrs', '0.02', '--iters', '8', '--interval', '4', '--method',
                                'cbn-second', '--subsamples', '1', '2', '--out', str(out), '--data-root',
                                str(tmp_path / 'data')])
    with open(out / 'detection_stats_error.json') as f:
        saved = json.load(f)
    assert saved['layer'] == dict(backward='exact', second_order=16)
    assert saved['norm_cfg'] == dict(type='CBN', second_order=16)
    assert saved['runs'][0]['measurements'] == 2 * 12  # iterations 4, 8
    cfg = Config.fromfile(str(out / 'k3_lr0.02' / 'runs' / 'cbn-second_seed0' / 'config.py'))
    assert cfg.model.neck.norm_cfg.second_order == 16 and cfg.model.roi_head.bbox_head.norm_cfg.second_order == 16
    # the subsampled setting is subsampled with the second-order term too
    cfg = Config.fromfile(str(out / 'k3_lr0.02_sub2' / 'runs' / 'cbn-second_seed0' / 'config.py'))
    assert cfg.model.neck.norm_cfg.stat_grad_subsample == 2 and cfg.model.neck.norm_cfg.second_order == 16


@pytest.mark.parametrize('tool, argv, match', [
    (detection_study, ['--iters', '0'], '--iters must be >= 1, got 0'),
    (detection_study, ['--large-batch', '0'], '--large-batch must be >= 1, got 0'),
    (detection_study, ['--lr', '-0.1'], '--lr must be > 0, got -0.1'),
    (detection_study, ['--pretrain-iters', '-1'], '--pretrain-iters must be >= 0, got -1'),
    (detection_stats_error, ['--ks', '2', '0'], r'--ks must all be >= 1, got \[2, 0\]'),
    (detection_stats_error, ['--lrs', '0'], r'--lrs must all be > 0, got \[0.0\]'),
    (detection_stats_error, ['--interval', '0'], '--interval must be >= 1, got 0'),
    (detection_stats_error, ['--subsamples', '1', '0'], r'--subsamples must all be >= 1, got \[1, 0\]'),
    (detection_study, ['--stat-grad-subsample', '0'], '--stat-grad-subsample must be >= 1, got 0'),
])
def test_bad_arguments_raise_before_any_run(tmp_path, tool, argv, match):
    with pytest.raises(ValueError, match=match):
        tool.main(argv + ['--out', str(tmp_path), '--data-root', str(tmp_path / 'data')])
    assert not (tmp_path / 'data').exists() and not (tmp_path / 'runs').exists()


def test_retinanet_study_and_head_stats(tmp_path):
    """--detector retinanet: CBN in the head shared by the 5 FPN levels trains and evaluates; the head-statistics
    study recomputes that head's layers (bbox_head) over every level."""
    out = tmp_path / 'retina'
    result = detection_study.main(['--detector', 'retinanet', '--methods', 'cbn', '--seeds', '0', '--iters', '6',
                                   '--lr', '0.01', '--save-checkpoint', '--out', str(out), '--data-root',
                                   str(tmp_path / 'data')])
    (run, ) = result['runs']
    assert run['detector'] == 'retinanet' and run['iters'] == 6 and 0 <= run['bbox_mAP'] <= 1
    cfg = Config.fromfile(str(out / 'runs' / 'cbn_seed0' / 'config.py'))
    assert cfg.model.type == 'RetinaNet' and cfg.model.bbox_head.norm_cfg == dict(type='CBN', window_size=4,
                                                                                 requires_grad=True)
    summary = head_stats_study.main(['--study', str(out), '--methods', 'cbn', '--seeds', '0', '--num-images', '2',
                                     '--conditions', 'head-test'])
    (row, ) = summary['runs']
    assert len(row['layers']) == 8 and all(name.startswith('bbox_head.') for name in row['layers'])


def test_split_controls_need_a_norm_in_the_neck(tmp_path):
    with pytest.raises(ValueError, match=r"--methods \['gn-neck'\] .* only with --detector faster-rcnn"):
        detection_study.main(['--detector', 'retinanet', '--methods', 'bn-small', 'gn-neck', '--out', str(tmp_path)])
    assert not (tmp_path / 'runs').exists()


def test_a_window_study_shares_bn_runs_but_not_cbn_runs(tmp_path):
    """A run on disk is reused only with this command's settings; the window's options (--window-size,
    --stat-grad-subsample) do not change BN or GN, so a window-length study may share their runs, not CBN's."""
    import argparse
    args = argparse.Namespace(iters=300, lr=0.02, window_size=4, detector='faster-rcnn', stat_grad_subsample=1,
                              backbone_checkpoint='/x/backbone.pth', images_per_iter=2, large_batch=8)
    for method in ('bn-small', 'cbn'):
        (tmp_path / method).mkdir()
        record = dict(vars(args), images_per_iter=2, method=method, bbox_mAP=0.25)
        (tmp_path / method / 'metrics.json').write_text(json.dumps(record))
    shorter = argparse.Namespace(**dict(vars(args), window_size=2))
    assert detection_study.finished_run(str(tmp_path / 'bn-small'), shorter, 'bn-small')['bbox_mAP'] == 0.25
    assert detection_study.finished_run(str(tmp_path / 'cbn'), args, 'cbn')['bbox_mAP'] == 0.25
    with pytest.raises(ValueError, match="'window_size': 4.*'window_size': 2.*use another --out"):
        detection_study.finished_run(str(tmp_path / 'cbn'), shorter, 'cbn')
    other_lr = argparse.Namespace(**dict(vars(shorter), lr=0.01))
    with pytest.raises(ValueError, match='use another --out'):  # a setting every method depends on still counts
        detection_study.finished_run(str(tmp_path / 'bn-small'), other_lr, 'bn-small')
