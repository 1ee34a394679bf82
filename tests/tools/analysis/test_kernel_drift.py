"""tools/analysis/kernel_drift.py: the kernels' angle per step and across a window, in a loop and in an mmdet run
(through the detection study's --drift-interval)."""
import argparse
import json
import math
import os.path as osp
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
sys.path.insert(0, osp.join(ROOT, 'tools'))

import detection_study  # noqa: E402
from kernel_drift import KernelDrift, KernelDriftHook  # noqa: E402


def test_kernel_drift_measures_a_known_rotation():
    """A kernel turned by theta each step in a fixed plane, its norm growing: KernelDrift reads theta per step,
    (k - 1) theta across the window, and the mean norm, from the steps it is told to measure only."""
    conv = torch.nn.Conv2d(1, 2, 1, bias=False)
    theta, k = 0.03, 4
    drift = KernelDrift([conv], k)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    norms = []
    for t in range(12):
        norm = 1.0 + 0.1 * t
        conv.weight.data.copy_((norm * (math.cos(t * theta) * e1 + math.sin(t * theta) * e2)).view(2, 1, 1, 1))
        measure = t >= 6 and t % 2 == 0  # t = 6, 8, 10: each with k - 1 earlier kernels stored
        drift.step(measure)
        norms += [norm] if measure else []
    out = drift.summary()
    # the kernels are fp32: rounding each component by at most 2^-24 relative turns a direction by at most ~1e-7 rad;
    # cos and acos in fp64 add about 1e-16 / sin(angle) < 1e-14 at these angles (0.03-0.09 rad). 1e-5 bounds both
    assert out['kernel_angle_step'] == pytest.approx(theta, abs=1e-5)
    assert out['kernel_angle_window'] == pytest.approx((k - 1) * theta, abs=1e-5)
    assert out['kernel_norm_mean'] == pytest.approx(sum(norms) / len(norms), rel=1e-6)  # fp32 norms of 2-vectors
    assert out['kernel_window_span'] == k - 1
    assert KernelDrift([conv], k).summary()['kernel_angle_step'] is None


def test_detection_runs_record_the_neck_and_head_kernels(tmp_path):
    """--drift-interval adds KernelDriftHook to each run: every ConvModule with a norm in the FPN neck and the box
    head is measured after burn-in, and the run's metrics and the summary carry the angles."""
    out = tmp_path / 'drift'
    result = detection_study.main(['--methods', 'cbn', '--seeds', '0', '--iters', '12', '--drift-interval', '2',
                                   '--out', str(out), '--data-root', str(tmp_path / 'data')])
    (run, ) = result['runs']
    with open(out / 'runs' / 'cbn_seed0' / 'kernel_drift.json') as f:
        saved = json.load(f)
    # the toy FPN: 4 lateral and 4 output ConvModules; the 4conv1fc head: 4 convs
    assert len(saved['convs']) == 12 and sum(c.startswith('roi_head.bbox_head.') for c in saved['convs']) == 4
    # burn-in is iters // 6 = 2; measured at 2, 4, ..., 10 where k - 1 = 3 earlier kernels are stored (the hook keeps
    # one per iteration from iteration 0, so from iteration 3 on): 4, 6, 8, 10
    assert saved['begin'] == 2 and saved['kernel_measured_steps'] == 4 and run['kernel_window_span'] == 3
    assert 0 < run['kernel_angle_step'] < run['kernel_angle_window'] < math.pi / 2
    assert result['summary']['cbn']['kernel_angle_window'] == run['kernel_angle_window']
    assert len(run['kernel_drift_per_conv']['step']) == 12
    # a run on disk is reused when it has the measurement, and run again when it lacks it
    args = argparse.Namespace(**result['settings'])
    work_dir = str(out / 'runs' / 'cbn_seed0')
    assert detection_study._finished(work_dir, args, 'cbn')['kernel_angle_step'] == run['kernel_angle_step']
    with open(osp.join(work_dir, 'metrics.json'), 'w') as f:
        json.dump({k: v for k, v in run.items() if not k.startswith('kernel_')}, f)
    assert detection_study._finished(work_dir, args, 'cbn') is None
    args.drift_interval = 0
    assert detection_study._finished(work_dir, args, 'cbn') is not None


@pytest.mark.parametrize('kwargs, match', [(dict(window_size=1), 'window_size must be an int >= 2, got 1'),
                                           (dict(interval=0), 'interval must be an int >= 1, got 0'),
                                           (dict(begin=-1), 'begin must be an int >= 0, got -1'),
                                           (dict(interval=2.5), 'interval must be an int >= 1, got 2.5')])
def test_hook_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelDriftHook(**kwargs)
