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
        # t = 6, 8, 10 have k - 1 earlier kernels stored; t = 1 asks too early and is ignored
        measure = (t >= 6 and t % 2 == 0) or t == 1
        drift.step(measure)
        norms += [norm] if measure and t >= k - 1 else []
    out = drift.summary()
    # the kernels are built in fp32: cos and sin rounded (2^-24 relative each), times the norm and summed (two more
    # roundings), then stored: at most ~5 roundings of 2^-24 = 6e-8 per component, which turn a direction by at most
    # 5 * 6e-8 * sqrt(2) = 4.2e-7 rad per kernel, so 8.4e-7 for an angle between two; cos and acos in fp64 add about
    # 1e-16 / sin(angle) < 1e-14 at these angles (0.03-0.09 rad). 1e-6 bounds the sum
    assert out['kernel_angle_step'] == pytest.approx(theta, abs=1e-6)
    assert out['kernel_angle_window'] == pytest.approx((k - 1) * theta, abs=1e-6)
    assert out['kernel_measured_steps'] == 3
    assert out['kernel_norm_mean'] == pytest.approx(sum(norms) / len(norms), rel=1e-6)  # fp32 norms of 2-vectors:
    # the components' ~5 roundings of 2^-24 (above) and the norm's own few ulps give under 5e-7 relative
    assert out['kernel_window_span'] == k - 1
    assert KernelDrift([conv], k).summary()['kernel_angle_step'] is None
    # k = 1: no window; the step angle is still measured
    single = KernelDrift([conv], 1)
    for t in range(3):
        conv.weight.data.copy_((math.cos(t * theta) * e1 + math.sin(t * theta) * e2).view(2, 1, 1, 1))
        single.step(measure=t == 2)
    out = single.summary()
    assert out['kernel_angle_step'] == pytest.approx(theta, abs=1e-6) and out['kernel_angle_window'] is None
    assert 'window' not in out['kernel_drift_per_conv']


@pytest.mark.parametrize('k', [0, -2, 2.5, True, '4'])
def test_kernel_drift_refuses_a_bad_window(k):
    with pytest.raises(ValueError, match=f'KernelDrift: k must be an int >= 1, got {k!r}'):
        KernelDrift([torch.nn.Conv2d(1, 1, 1)], k)


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
    assert detection_study.finished_run(work_dir, args, 'cbn')['kernel_angle_step'] == run['kernel_angle_step']
    with open(osp.join(work_dir, 'metrics.json'), 'w') as f:
        json.dump({k: v for k, v in run.items() if not k.startswith('kernel_')}, f)
    assert detection_study.finished_run(work_dir, args, 'cbn') is None
    args.drift_interval = 0
    assert detection_study.finished_run(work_dir, args, 'cbn') is not None
    # measured at another interval, or over another window: run again
    with open(osp.join(work_dir, 'metrics.json'), 'w') as f:
        json.dump(run, f)
    args.drift_interval = 2
    assert detection_study.finished_run(work_dir, args, 'cbn') is not None
    args.drift_interval = 4
    assert detection_study.finished_run(work_dir, args, 'cbn') is None
    args.drift_interval, args.window_size = 2, 3
    with pytest.raises(ValueError, match='use another --out'):  # a CBN run of another k is refused, as before
        detection_study.finished_run(work_dir, args, 'cbn')
    # a BN run is shared across window lengths, but its window angle spans k - 1 = 3 steps, not 2: run again
    assert detection_study.finished_run(work_dir, args, 'bn-small') is None


@pytest.mark.parametrize('argv, match', [
    (['--drift-interval', '-1'], '--drift-interval must be >= 0, got -1'),
    (['--drift-interval', '5', '--window-size', '1'], '--drift-interval 5 .* needs --window-size >= 2, got 1'),
    (['--drift-interval', '50', '--iters', '12'], r'--drift-interval 50: no iteration in \[2, 12\) is measured'),
])
def test_detection_study_refuses_a_drift_it_cannot_measure(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        detection_study.main(argv + ['--out', str(tmp_path)])
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('kwargs, match', [(dict(window_size=1), 'window_size must be an int >= 2, got 1'),
                                           (dict(interval=0), 'interval must be an int >= 1, got 0'),
                                           (dict(begin=-1), 'begin must be an int >= 0, got -1'),
                                           (dict(interval=2.5), 'interval must be an int >= 1, got 2.5'),
                                           (dict(parts='neck'), "parts must be a sequence of .* got 'neck'"),
                                           (dict(parts=('neck', '')), r"parts must be .* got \('neck', ''\)")])
def test_hook_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelDriftHook(**kwargs)
