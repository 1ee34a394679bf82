"""tools/analysis/stats_error.py runs on a tiny budget and writes well-formed JSON and plots."""
import json
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))

import stats_error  # noqa: E402


def test_tiny_run(tmp_path):
    result = stats_error.main(['--ks', '2', '3', '--lrs', '0.05', '--seeds', '0', '--steps', '12', '--every', '5',
                               '--big', '64', '--out', str(tmp_path)])
    with open(tmp_path / 'stats_error.json') as f:
        saved = json.load(f)
    assert saved['runs'] == json.loads(json.dumps(result['runs']))
    for run in saved['runs']:
        for layer in (1, 2, 3):
            for name in stats_error.ESTIMATORS:
                err_mu, err_sd = run['error'][f'layer{layer}/{name}']
                assert 0 <= err_mu < 10 and 0 <= err_sd < 10
        assert run['truncation']['layer3/r=l-2/mu'] > 0 and run['truncation']['layer2/r=l-1/drift'] >= 0
        assert all(v >= 0 for v in run['nu_bias'].values())  # d theta' S d theta >= 0
    for png in ('error_vs_k.png', 'error_over_training.png', 'truncation.png'):
        assert (tmp_path / png).stat().st_size > 1000


def test_subsampled_run_and_bad_argument(tmp_path):
    argv = ['--ks', '3', '--lrs', '0.05', '--seeds', '0', '--steps', '8', '--every', '4', '--big', '32']
    exact = stats_error.main(argv + ['--out', str(tmp_path / 'exact')])
    approx = stats_error.main(argv + ['--stat-grad-subsample', '2', '--out', str(tmp_path / 'approx')])
    assert approx['settings']['stat_grad_subsample'] == 2
    e, a = exact['runs'][0]['error'], approx['runs'][0]['error']
    assert set(e) == set(a) and all(0 <= v < 10 for errs in a.values() for v in errs)
    assert e['layer1/CBN'] != a['layer1/CBN']  # the layers were built with the approximation
    with pytest.raises(ValueError, match='--stat-grad-subsample must be >= 1, got 0'):
        stats_error.main(argv + ['--stat-grad-subsample', '0', '--out', str(tmp_path / 'bad')])
    assert not (tmp_path / 'bad').exists()
