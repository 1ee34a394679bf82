"""End to end through tools/: toy data, train, resume, test from a checkpoint, and 2-process gloo training."""
import json
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(ROOT, 'tools'))

import generate_toy_coco  # noqa: E402
import test as test_tool  # noqa: E402
import train as train_tool  # noqa: E402

from ..models.common import same_windows  # noqa: E402

TOY = osp.join(ROOT, 'configs/toy/faster-rcnn_r18-cbn-heads_fpn_toy.py')


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp('toy') / 'toy_coco'
    generate_toy_coco.main(['--out-dir', str(out), '--num-train', '24', '--num-val', '8'])
    return str(out) + '/'


def options(data, iters, burnin=2, interval=None, extra=()):
    return [f'train_dataloader.dataset.data_root={data}', f'val_dataloader.dataset.data_root={data}',
            f'test_dataloader.dataset.data_root={data}',
            f'val_evaluator.ann_file={data}annotations/instances_val.json',
            f'test_evaluator.ann_file={data}annotations/instances_val.json', f'train_cfg.max_iters={iters}',
            f'train_cfg.val_interval={iters}', f'default_hooks.checkpoint.interval={interval or iters}',
            'default_hooks.checkpoint.max_keep_ckpts=3', f'custom_hooks.0.burnin_iters={burnin}',
            'param_scheduler.0.end=2', *extra]


def test_generator_is_deterministic(tmp_path):
    for name in ('a', 'b'):
        generate_toy_coco.main(['--out-dir', str(tmp_path / name), '--num-train', '3', '--num-val', '2',
                                '--seed', '5'])
    for split in ('train', 'val'):
        a = json.load(open(tmp_path / 'a' / 'annotations' / f'instances_{split}.json'))
        b = json.load(open(tmp_path / 'b' / 'annotations' / f'instances_{split}.json'))
        assert a == b and a['annotations'] and a['annotations'][0]['segmentation']
    assert (tmp_path / 'a' / 'train' / '000000.png').read_bytes() == (tmp_path / 'b' / 'train' /
                                                                       '000000.png').read_bytes()


def test_train_resume_and_test_from_checkpoint(toy_data, tmp_path, capsys):
    work = str(tmp_path / 'run')
    runner = train_tool.main([TOY, '--work-dir', work, '--cfg-options', *options(toy_data, 8, interval=4)])
    assert runner.iter == 8 and osp.isfile(osp.join(work, 'iter_4.pth'))
    windows = {n: l.window_length for n, l in runner.model.named_modules() if hasattr(l, 'window_length')}
    assert windows and all(v == 3 for v in windows.values())

    # resume from iteration 4 (windows saved full, burn-in 2 already over): continues with full windows
    resumed = train_tool.main([TOY, '--work-dir', work, '--resume', osp.join(work, 'iter_4.pth'), '--cfg-options',
                               *options(toy_data, 6)])
    assert resumed.iter == 6
    hook = next(h for h in resumed.hooks if type(h).__name__ == 'CBNBurnInHook')
    assert hook._burnin == 2 and hook._opened_logged
    ckpt4 = torch.load(osp.join(work, 'iter_4.pth'), weights_only=False)
    assert all(state['count'] == 3 for state in ckpt4['cbn_windows'].values())

    metrics = test_tool.main([TOY, osp.join(work, 'iter_8.pth'), '--work-dir', work, '--cfg-options',
                              *options(toy_data, 8, extra=['model.test_cfg.rcnn.score_thr=0.0'])])
    assert 'coco/bbox_mAP' in metrics and 0 <= metrics['coco/bbox_mAP'] <= 1
    out = capsys.readouterr().out
    assert 'Average Precision' in out or 'bbox_mAP' in out


@pytest.mark.skipif(not hasattr(torch.distributed, 'is_gloo_available') or not torch.distributed.is_gloo_available(),
                    reason='gloo backend missing')
def test_two_process_gloo_training_and_resume_keep_per_rank_windows(toy_data, tmp_path):
    work = str(tmp_path / 'dist')
    env = dict(os.environ, PORT='29517', PYTHONPATH=f"{ROOT}:{osp.join(ROOT, 'tests', 'tools')}",
               OMP_NUM_THREADS='1', PYTHON=sys.executable)
    config = tmp_path / 'toy_dump.py'
    config.write_text(f"_base_ = '{TOY}'\n"
                      "custom_imports = dict(imports=['cbn_mmdet', 'rank_dump_hook'], allow_failed_imports=False)\n"
                      "custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=2),\n"
                      "                dict(type='RankDumpHook', windows_at=[3])]\n")
    extra = []
    cmd = ['bash', osp.join(ROOT, 'tools/dist_train.sh'), str(config), '2', '--work-dir', work, '--cfg-options',
           *options(toy_data, 6, interval=3, extra=extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(osp.join(work, f'rank{r}.pt'), weights_only=False) for r in (0, 1)]
    assert all(r['wrapper'] == 'CPUCompatibleDDP' and r['iter'] == 6 for r in ranks)
    assert all('SyncBatchNorm' not in r['norm_types'] and 'CrossIterationBatchNorm2d' in r['norm_types']
               for r in ranks)
    for name, p in ranks[0]['params'].items():
        torch.testing.assert_close(p, ranks[1]['params'][name], rtol=0, atol=1e-6)
    w0, w1 = ranks[0]['windows'], ranks[1]['windows']
    assert set(w0) == set(w1) and all(w0[n]['count'] == 3 for n in w0)
    assert any(not torch.equal(w0[n]['tensors']['mu'], w1[n]['tensors']['mu']) for n in w0)  # no sync

    # the checkpoint (written by rank 0 alone) holds each rank's windows at iteration 3, rank 0's also as before
    ckpt = torch.load(osp.join(work, 'iter_3.pth'), weights_only=False)
    assert all(s['count'] == 3 for s in ckpt['cbn_windows'].values())
    saved = [torch.load(osp.join(work, f'rank{r}_iter3.pt'), weights_only=False) for r in (0, 1)]
    per_rank = ckpt['cbn_windows_per_rank']
    assert per_rank['world_size'] == 2 and len(per_rank['ranks']) == 2
    assert same_windows(per_rank['ranks'][0], saved[0]) and same_windows(per_rank['ranks'][1], saved[1])
    assert same_windows(ckpt['cbn_windows'], saved[0]) and not same_windows(saved[0], saved[1])

    # resume the 2-process run from its checkpoint: each rank restores its own windows, and training goes on
    cmd = ['bash', osp.join(ROOT, 'tools/dist_train.sh'), str(config), '2', '--work-dir', work, '--resume',
           osp.join(work, 'iter_3.pth'), '--cfg-options', *options(toy_data, 4, extra=extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert 'restored the windows of 12 CBN layers from the checkpoint (each rank its own, 2 ranks)' in log
    assert torch.load(osp.join(work, 'rank0.pt'), weights_only=False)['iter'] == 4
    restored = [torch.load(osp.join(work, f'rank{r}_start3.pt'), weights_only=False) for r in (0, 1)]
    assert same_windows(restored[0], saved[0]) and same_windows(restored[1], saved[1])


@pytest.fixture
def launcher_env(monkeypatch):
    """The environment torchrun gives a 1-process run; a process group a test leaves behind is destroyed after it."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_tools_destroy_the_process_group_they_create(toy_data, tmp_path, launcher_env):
    # a group left to interpreter shutdown was seen to abort a finished run ('terminate called without an active
    # exception', exit code 1), so train.py and test.py destroy the group they create, also when they fail
    work = str(tmp_path / 'pg')
    opts = ['--work-dir', work, '--launcher', 'pytorch', '--cfg-options', *options(toy_data, 2)]
    runner = train_tool.main([TOY, *opts])
    assert runner.distributed and runner.iter == 2 and not torch.distributed.is_initialized()
    assert 'coco/bbox_mAP' in test_tool.main([TOY, osp.join(work, 'iter_2.pth'), *opts])
    assert not torch.distributed.is_initialized()
    with pytest.raises(FileNotFoundError):
        test_tool.main([TOY, osp.join(work, 'missing.pth'), *opts])
    assert not torch.distributed.is_initialized()


def test_toy_mask_rcnn_trains_and_reports_segm(toy_data, tmp_path):
    config = osp.join(ROOT, 'configs/toy/mask-rcnn_r18-cbn-heads_fpn_toy.py')
    work = str(tmp_path / 'mask')
    opts = options(toy_data, 4, extra=['model.test_cfg.rcnn.score_thr=0.0'])
    runner = train_tool.main([config, '--work-dir', work, '--cfg-options', *opts])
    layers = [m for m in runner.model.modules() if type(m).__name__ == 'CrossIterationBatchNorm2d']
    assert len(layers) == 8 + 4 + 4 and all(layer.window_length == 3 for layer in layers)
    metrics = test_tool.main([config, osp.join(work, 'iter_4.pth'), '--work-dir', work, '--cfg-options', *opts])
    assert 'coco/segm_mAP' in metrics and 'coco/bbox_mAP' in metrics
