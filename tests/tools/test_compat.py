"""`make compat` without downloading anything: the pytest plugin that skips for want of mmcv ops or a newer torch,
and the range check.

The compatibility run itself (tools/compat_check.sh: a venv per torch, several GB) is kept out of `make test`; its
results are in docs/compat.md.
"""
import os
import os.path as osp
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from cbn_mmdet.utils.stack import SUPPORTED

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TESTS = '''
import importlib
import pytest


def test_needs_ops():
    raise ModuleNotFoundError("No module named 'mmcv._ext'")


def test_fails_otherwise():
    raise ModuleNotFoundError("No module named 'mmcv._other'")


def test_passes():
    pass


def test_needs_a_newer_torch():
    raise AttributeError("module 'torch.amp' has no attribute 'GradScaler'")


@pytest.fixture
def detector():
    raise ModuleNotFoundError("No module named 'mmcv._ext'")


def test_fixture_needs_ops(detector):
    pass
'''


def test_plugin_skips_only_failures_for_want_of_what_the_venv_lacks(tmp_path):
    (tmp_path / 'test_sample.py').write_text(TESTS)
    (tmp_path / 'test_module_needs_ops.py').write_text("raise ModuleNotFoundError(\"No module named 'mmcv._ext'\")\n")
    junit = tmp_path / 'junit.xml'
    proc = subprocess.run([sys.executable, '-m', 'pytest', str(tmp_path), '-q', '-rs', '-p', 'no:cacheprovider', '-p',
                           'tools.compat_pytest_plugin', f'--junitxml={junit}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # test_fails_otherwise still fails
    outcomes = {}
    for case in ET.parse(junit).getroot().iter('testcase'):
        kinds = [child.tag for child in case if child.tag in ('failure', 'error', 'skipped')]
        # a module that fails to import is one case named by its dotted path, which depends on the rootdir pytest
        # picks (the temporary folder's parents): keep its last part
        outcomes[case.get('name').rsplit('.', 1)[-1]] = kinds[0] if kinds else 'passed'
    assert outcomes == {'test_needs_ops': 'skipped', 'test_fails_otherwise': 'failure', 'test_passes': 'passed',
                        'test_needs_a_newer_torch': 'skipped', 'test_fixture_needs_ops': 'skipped',
                        'test_module_needs_ops': 'skipped'}, outcomes
    assert proc.stdout.count('needs mmcv with compiled ops') == 3, proc.stdout  # the reasons are printed
    assert 'the test uses torch.amp.GradScaler' in proc.stdout


@pytest.mark.parametrize('version', [SUPPORTED['torch'][1], '1.13.1'])
def test_compat_check_refuses_a_torch_the_import_check_refuses(version, tmp_path):
    low, high = SUPPORTED['torch']
    proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'compat_check.sh'), version], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f'torch {version} is outside the range' in proc.stderr and f'torch>={low},<{high}' in proc.stderr
