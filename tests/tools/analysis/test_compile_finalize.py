"""tools/analysis/compile_finalize.py: the eager finalize stand-in runs and writes its timing; bad arguments fail."""
import json
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))

import compile_finalize  # noqa: E402


def test_the_eager_stand_in_is_timed_and_written(tmp_path):
    out = tmp_path / 'cf.json'
    result = compile_finalize.main(['--no-compile', '--calls', '3', '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved['eager_us'] == result['eager_us'] > 0 and 'compiled_us' not in saved
    mean, var, var_kernel, mean_patch, run = compile_finalize.finalize(**compile_finalize.inputs(3, 8, 72))
    assert mean.shape == var.shape == (8, ) and var_kernel.shape == (8, 72) and run.shape == (2, 8)


@pytest.mark.parametrize('argv, said', [(['--calls', '0'], '--calls must be >= 1, got 0'),
                                        (['--cpp-wrapper', '--no-compile'], 'cannot go with --no-compile')])
def test_bad_arguments_are_refused(capsys, argv, said):
    with pytest.raises(SystemExit):
        compile_finalize.main(argv)
    assert said in capsys.readouterr().err
