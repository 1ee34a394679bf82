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
])
def test_bad_arguments(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        study.main(argv + ['--out', str(tmp_path)])
    assert __import__('re').search(match, capsys.readouterr().err)
    assert not (tmp_path / 'runs').exists()
