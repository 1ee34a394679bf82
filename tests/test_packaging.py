"""Package metadata and installs into an environment that already holds a supported stack.

The ranges in setup.cfg's install_requires are the ranges ``cbn_mmdet.utils.stack.SUPPORTED`` checks on import
(torch excepted: it is never declared, so pip cannot replace a CUDA build). ``pip install`` of the wheel, of the
source tree and of the source tree in editable mode must install cbn_mmdet and nothing else: pip runs with
``--dry-run --no-index`` in this venv, so anything beyond cbn_mmdet shows up in its report or fails the resolve.

The builds run on a copy of the checkout's files (tracked and untracked, not ignored): pip builds in the source
tree, and a stale ``build/`` there could leak into the wheel.
"""
import configparser
import json
import os.path as osp
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cbn_mmdet.utils.stack import SUPPORTED
from cbn_mmdet.version import __version__

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
NOT_DECLARED = {'torch'}  # checked on import only
PIP = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '--no-input']


def declared_requirements():
    cfg = configparser.ConfigParser()
    cfg.read(osp.join(ROOT, 'setup.cfg'))
    lines = cfg['options']['install_requires'].splitlines()
    return [Requirement(line) for line in (line.strip() for line in lines) if line and not line.startswith('#')]


def check_requirements(requirements):
    by_name = {req.name.lower(): req for req in requirements}
    assert len(by_name) == len(requirements), 'a requirement is declared twice'
    for name, (low, high) in SUPPORTED.items():
        if name in NOT_DECLARED:
            assert name not in by_name, f'{name} must not be declared: pip would replace the user\'s build'
            continue
        assert name in by_name, f'{name} is checked on import but not declared'
        assert by_name[name].specifier == SpecifierSet(f'>={low},<{high}'), (name, str(by_name[name].specifier))
        assert by_name[name].marker is None and not by_name[name].extras
    for name, req in by_name.items():
        if name not in SUPPORTED:  # anything else is an unversioned direct import: it never changes a version
            assert not req.specifier and req.marker is None, str(req)


def test_declared_ranges_are_the_import_check_ranges():
    check_requirements(declared_requirements())


@pytest.mark.parametrize('name', sorted(NOT_DECLARED))
def test_undeclared_ranges_are_stated_where_users_read_them(name):
    """setup.cfg's comment and the README's table state the range that only the import check enforces."""
    low, high = SUPPORTED[name]
    with open(osp.join(ROOT, 'setup.cfg')) as f:
        comment = ' '.join(line.lstrip('# ').strip() for line in f if line.startswith('#'))
    assert f'the import check still requires {name}>={low},<{high}' in comment, comment
    with open(osp.join(ROOT, 'README.md')) as f:
        readme = f.read()
    assert f'| {name} | `>={low},<{high}` |' in readme


@pytest.fixture(scope='module')
def source_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp('src') / 'cbn_mmdet_src'
    try:
        out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                             capture_output=True, check=True)
        files = [f for f in out.stdout.decode().split('\0') if f and osp.isfile(osp.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy what .gitignore would keep
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns('.git', '.venv', 'data', 'work_dirs', 'build', 'dist',
                                                                 '*.egg-info', '__pycache__', '.pytest_cache',
                                                                 'outputs'))
        return dst
    for f in files:
        target = dst / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(osp.join(ROOT, f), target)
    return dst


@pytest.fixture(scope='module')
def wheel(source_copy, tmp_path_factory):
    out = tmp_path_factory.mktemp('wheel')
    proc = subprocess.run([*PIP, 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(out),
                           str(source_copy)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob('*.whl'))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_the_package_only(wheel, source_copy):
    assert wheel.name == f'cbn_mmdet-{__version__}-py3-none-any.whl'
    dist_info = f'cbn_mmdet-{__version__}.dist-info/'
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = Parser().parsestr(zf.read(dist_info + 'METADATA').decode())
        top_level = zf.read(dist_info + 'top_level.txt').decode().split()
    package = {n for n in names if not n.startswith(dist_info)}
    sources = {osp.relpath(p, source_copy).replace(osp.sep, '/') for p in (source_copy / 'cbn_mmdet').rglob('*.py')}
    assert package == sources, (sorted(package ^ sources))  # every module, and no configs/, tools/, tests/
    assert top_level == ['cbn_mmdet']
    # the built metadata says what setup.cfg says
    requires = [Requirement(r) for r in metadata.get_all('Requires-Dist')]
    check_requirements(requires)
    assert sorted(map(str, requires)) == sorted(map(str, declared_requirements()))


def dry_run_installs(*target):
    proc = subprocess.run([*PIP, 'install', '--dry-run', '--no-index', '--no-build-isolation', '-q', '--report', '-',
                           *target], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    return [(item['metadata']['name'], item['metadata']['version']) for item in report['install']]


@pytest.mark.parametrize('kind', ['wheel', 'source', 'editable'])
def test_install_into_a_supported_stack_installs_cbn_mmdet_only(kind, wheel, source_copy):
    # --no-index: the stack must be satisfied by what is installed; --no-build-isolation only because the
    # isolated build env would need setuptools from an index (a user's plain `pip install .` fetches it there)
    target = {'wheel': [str(wheel)], 'source': [str(source_copy)], 'editable': ['-e', str(source_copy)]}[kind]
    assert dry_run_installs(*target) == [('cbn_mmdet', __version__)]
