"""tools/gpu_trajectory.py on the CPU: a short trajectory passes, its JSON says what it compared, and it can fail."""
import json
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(ROOT, 'tools'))

import gpu_trajectory  # noqa: E402

QUANTITIES = ('output', 'input_grad', 'kernel_grad', 'running_mean', 'running_var')


@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('trajectory') / 'trajectory.json'
    rc = gpu_trajectory.main(['--device', 'cpu', '--iters', '6', '--out', str(out)])
    return rc, json.loads(out.read_text())


def test_short_cpu_trajectory_passes_and_reports_every_quantity(short_run):
    rc, result = short_run
    assert rc == 0 and result['passed'] is True
    assert result['device'] == 'cpu' and result['setup']['iters'] == 6 and result['setup']['window_size'] == 4
    assert result['tf32']['matmul_allow_tf32'] is False and result['tf32']['cudnn_allow_tf32'] is False
    assert set(result['checks']) == {'fp32', 'fp16'}
    for name, check in result['checks'].items():
        assert check['passed'] is True and check['failed'] == []
        assert check['window_length'] == 3 and check['window_dtype'] == 'torch.float32'
        for q in QUANTITIES:
            steps = check['per_step'][q]
            assert len(steps) == 6
            # fp32/fp16 against fp64 rounds somewhere: an error of exactly 0 would mean nothing was compared
            assert 0 < check['worst'][q] == max(steps) <= check['tolerance'][q], (name, q)
    assert all(t == 1e-4 for t in result['checks']['fp32']['tolerance'].values())
    fp16 = result['checks']['fp16']
    a_norm = result['reference']['amplification']['norm']
    assert fp16['tolerance']['output'] == pytest.approx(2 * 4 * a_norm * 2**-11)
    assert fp16['grad_scaler']['overflow_steps'] == []
    # fp16 is measurably coarser than fp32, and a broken compensation would show far above both tolerances
    assert fp16['worst']['output'] > 100 * result['checks']['fp32']['worst']['output']
    assert result['reference']['compensation_effect']['max'] > 3 * max(fp16['tolerance'].values())


def test_check_fails_when_the_tolerance_is_below_the_measured_error(tmp_path):
    out = tmp_path / 'strict.json'
    rc = gpu_trajectory.main(['--device', 'cpu', '--iters', '2', '--no-fp16', '--fp32-tol', '1e-12',
                              '--out', str(out)])
    result = json.loads(out.read_text())
    assert rc == 1 and result['passed'] is False and set(result['checks']) == {'fp32'}
    assert set(result['checks']['fp32']['failed']) == set(QUANTITIES)
