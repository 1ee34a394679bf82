"""tools/analysis/classification_study.py on a tiny budget: per-run JSON, resume, summary with paired differences,
plot, and clear errors for bad arguments."""
import json
import os
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))

import classification_study as study  # noqa: E402

TINY = ['--dataset', 'digits', '--batch-sizes', '16', '32', '--epochs', '1', '--seeds', '0', '1', '--jobs', '1']


def test_tiny_study_resumes_and_summarizes(tmp_path):
    out = str(tmp_path)
    summary = study.main(TINY + ['--variants', 'bn', 'cbn_exact', '--out', out])
    runs = sorted(os.listdir(tmp_path / 'runs'))
    assert runs == sorted(f'digits_{v}_bs{bs}_seed{s}.json' for v in ('bn', 'cbn_exact') for bs in (16, 32)
                          for s in (0, 1))
    with open(tmp_path / 'runs' / 'digits_cbn_exact_bs16_seed1.json') as f:
        record = json.load(f)
    assert record['window'] == 1 and record['iterations'] == 1397 // 16  # k = min(ceil(16/16), 8)
    assert 10 < record['test_top1'] <= 100 and 0 <= record['abs_cos_grad_kernel'] <= 1
    assert 0 <= record['test_top1_precise'] <= 100 and 0 <= record['test_top1_batch_ema'] <= 100
    # KernelDrift: measured at iteration 50 (log_every, after burn-in at 21); k = 1 has no window angle
    assert 0 < record['kernel_angle_step'] < 0.5 and record['kernel_angle_window'] is None
    assert record['kernel_measured_steps'] == 1 and record['kernel_norm_mean'] > 0
    # the paired difference is computed from the runs on disk
    with open(tmp_path / 'runs' / 'digits_bn_bs32_seed0.json') as f:
        bn0 = json.load(f)['test_top1']
    with open(tmp_path / 'runs' / 'digits_cbn_exact_bs32_seed0.json') as f:
        cbn0 = json.load(f)['test_top1']
    pair = summary['paired']['cbn_exact@32 - bn@32']
    assert pair['seeds'] == [0, 1] and pair['ci95'] >= 0
    assert (tmp_path / 'top1_vs_batch.png').stat().st_size > 1000
    # resume: a finished run is not trained again; a removed one is
    marker = tmp_path / 'runs' / 'digits_bn_bs32_seed0.json'
    os.remove(tmp_path / 'runs' / 'digits_bn_bs16_seed1.json')
    mtime = marker.stat().st_mtime_ns
    again = study.main(TINY + ['--variants', 'bn', 'cbn_exact', '--out', out])
    assert marker.stat().st_mtime_ns == mtime and (tmp_path / 'runs' / 'digits_bn_bs16_seed1.json').exists()
    assert again['table']['bn@32']['mean'] == summary['table']['bn@32']['mean']
    assert summary['table']['cbn_exact@32']['seeds'] == [0, 1] and bn0 > 0 and cbn0 > 0
    # --summarize trains nothing: a missing combination is left out, the table holds what is on disk
    only = study.main(TINY + ['--variants', 'bn', 'gn', '--out', out, '--summarize'])
    assert 'gn@16' not in only['table'] and only['table']['bn@16']['mean'] == again['table']['bn@16']['mean']
    assert not any(name.startswith('digits_gn') for name in os.listdir(tmp_path / 'runs'))
    # another schedule in the same folder is refused instead of mixed in
    with pytest.raises(ValueError, match='--epochs/--model/--lr-base'):
        study.main(TINY + ['--variants', 'bn', '--out', out, '--lr-base', '0.2'])


@pytest.mark.parametrize('argv, match', [
    (['--variants', 'bn', 'nope'], "unknown \\['nope'\\]"),
    (['--batch-sizes', '0'], '--batch-sizes must be >= 1, got \\[0\\]'),
    (['--epochs', '0'], '--epochs must be >= 1, got 0'),
    (['--lr-base', '-1'], '--lr-base must be > 0, got -1.0'),
    (['--window-size', '0'], '--window-size must be >= 1, got 0'),
])
def test_bad_arguments(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        study.main(argv + ['--out', str(tmp_path)])
    assert __import__('re').search(match, capsys.readouterr().err)
    assert not (tmp_path / 'runs').exists()


def test_oracle_equals_exact_cbn_when_the_kernel_does_not_move():
    """The Taylor-free oracle and CBN with the exact backward are the same function of the current kernel when the
    kernel has not moved: the compensation is then zero, and both are the window's exact statistics. So their
    outputs and their gradients (kernel, conv bias, input) agree; the oracle is plain autograd, so this also checks
    the exact backward through an independent route. fp64 (u = 1.1e-16): the two sum the same 3x2x4x5 values per
    channel in different orders, and the gradients chain a few such sums, so they agree to ~1e-13; 1e-10 leaves room
    and still fails for any missing term (the authors' backward differs by ~1e-2 here)."""
    import torch
    from torch import nn

    from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d

    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 4, 3, padding=1).double() for _ in range(3)]
    for c in convs[1:]:
        c.load_state_dict(convs[0].state_dict())
    norms = [study.OracleNorm(4, 3).double(), CrossIterationBatchNorm2d(4, window_size=3).double(),
             CrossIterationBatchNorm2d(4, window_size=3, backward='authors').double()]
    norms[0].attach(convs[0])
    xs = [torch.randn(2, 3, 4, 5, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    proj = torch.randn(2, 4, 4, 5, dtype=torch.float64)
    for it, x in enumerate(xs):
        outs = []
        for conv, norm in zip(convs, norms):
            norm.begin_iteration(it, use_window=True, collect=True)
            conv.zero_grad()
            xi = x.clone().requires_grad_()
            y = norm(conv(xi))
            (y * proj).sum().backward()
            outs.append((y.detach(), conv.weight.grad.clone(), conv.bias.grad.clone(), xi.grad))
    oracle, exact, authors = outs
    for a, b in zip(oracle, exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(oracle[0], authors[0], rtol=1e-10, atol=1e-10)  # the same forward...
    assert (oracle[1] - authors[1]).abs().max() > 1e-4  # ...but not the same kernel gradient
    assert len(norms[0]._inputs) == 2  # the window's k - 1 earlier inputs


def test_time_budget_starts_no_run_after_it(tmp_path):
    """--time-budget 0: every run is left for a later call; the summary holds what is on disk (nothing)."""
    summary = study.main(TINY + ['--variants', 'bn', '--out', str(tmp_path), '--time-budget', '0'])
    assert os.listdir(tmp_path / 'runs') == [] and summary['table'] == {}


def test_window_size_overrides_k_and_is_checked_on_resume(tmp_path):
    """--window-size sets k of the window variants at every batch size (the window-length study); a folder trained
    with another k is refused, while BN runs, which have no window, may be shared between such folders."""
    out = str(tmp_path)
    argv = ['--dataset', 'digits', '--batch-sizes', '32', '--epochs', '1', '--seeds', '0', '--jobs', '1']
    study.main(argv + ['--variants', 'bn', 'cbn_exact', '--window-size', '3', '--out', out])
    with open(tmp_path / 'runs' / 'digits_cbn_exact_bs32_seed0.json') as f:
        assert json.load(f)['window'] == 3  # not min(ceil(16/32), 8) = 1
    with pytest.raises(ValueError, match='window 3, not with this command\'s 2'):
        study.main(argv + ['--variants', 'bn', 'cbn_exact', '--window-size', '2', '--out', out, '--summarize'])
    only_bn = study.main(argv + ['--variants', 'bn', '--window-size', '2', '--out', out, '--summarize'])
    assert only_bn['table']['bn@32']['seeds'] == [0]
