"""The stack check: clear messages for a missing or wrong package, and for mmcv without compiled ops."""
import subprocess
import sys

import pytest

from cbn_mmdet.utils.stack import SUPPORTED, check_stack, installed_versions

GOOD = {'torch': '2.13.0+cpu', 'mmengine': '0.10.7', 'mmcv': '2.1.0', 'mmdet': '3.3.0'}


def test_missing_mmcv_names_supported_ranges():
    with pytest.raises(ImportError, match=r'mmcv>=2.0.0,<2.2.0.*mmcv is not installed.*make venv'):
        check_stack(dict(GOOD, mmcv=None), has_mmcv_ops=True)


@pytest.mark.parametrize('name, version', [('mmcv', '2.2.0'), ('mmdet', '2.28.2'), ('mmengine', '0.9.0'),
                                           ('torch', '1.13.1'), ('torch', '2.0.1'), ('torch', '2.16.0')])
def test_wrong_version_names_it(name, version):
    with pytest.raises(ImportError, match=f'{name} {version} is installed'):
        check_stack(dict(GOOD, **{name: version}), has_mmcv_ops=True)


@pytest.mark.parametrize('torch', ['2.1.0', '2.15.0', '2.15.0+cu130'])
def test_the_ends_of_the_torch_range_make_compat_checks_are_accepted(torch):
    check_stack(dict(GOOD, torch=torch), has_mmcv_ops=True)  # docs/compat.md


def test_mmcv_without_ops_warns():
    with pytest.warns(UserWarning, match='without its compiled ops.*MMCV_WITH_OPS=1'):
        check_stack(GOOD, has_mmcv_ops=False)


def test_mmcv_lite_counts_as_mmcv(monkeypatch):
    # mmcv-lite installs the mmcv modules under another distribution name: the version check reads it, and the
    # missing ops are left to the warning
    from cbn_mmdet.utils import stack

    def version(dist):
        if dist == 'mmcv':
            raise stack.metadata.PackageNotFoundError(dist)
        return {'mmcv-lite': '2.1.0'}.get(dist, GOOD.get(dist))

    monkeypatch.setattr(stack.metadata, 'version', version)
    assert stack.installed_versions()['mmcv'] == '2.1.0'
    with pytest.warns(UserWarning, match='without its compiled ops'):
        check_stack(has_mmcv_ops=False)


def test_error_tells_users_of_their_own_environment_what_to_do():
    with pytest.raises(ImportError) as info:
        check_stack(dict(GOOD, mmcv='2.2.0'), has_mmcv_ops=True)
    message = str(info.value)
    assert message.startswith('cbn_mmdet supports torch>=2.1.0,<2.16.0, mmengine>=0.10.0,<0.11.0, '
                              'mmcv>=2.0.0,<2.2.0, mmdet>=3.0.0,<3.4.0, but mmcv 2.2.0 is installed.')
    assert 'In your own environment, install versions in these ranges' in message


def test_installed_stack_is_supported():
    versions = installed_versions()
    assert set(versions) == set(SUPPORTED)
    check_stack()  # the environment the README builds


def test_import_from_venv_python_registers_everything():
    code = ('import cbn_mmdet, mmcv.ops\n'
            'from mmengine.registry import MODELS, HOOKS\n'
            'from mmcv.cnn import build_norm_layer\n'
            "assert MODELS.get('CBN') is cbn_mmdet.CrossIterationBatchNorm2d\n"
            "assert MODELS.get('CrossIterationBatchNorm2d') is cbn_mmdet.CrossIterationBatchNorm2d\n"
            "assert HOOKS.get('CBNBurnInHook') is cbn_mmdet.CBNBurnInHook\n"
            "name, layer = build_norm_layer(dict(type='CBN', window_size=4), 256)\n"
            "assert name == 'bn' and layer.window_size == 4\n"
            'from mmengine.registry import DefaultScope\n'
            "with DefaultScope.overwrite_default_scope('mmdet'):\n"
            '    import mmdet.models\n'
            "    name, layer = build_norm_layer(dict(type='CBN', window_size=2), 8)\n"
            "    assert name == 'bn' and isinstance(layer, cbn_mmdet.CrossIterationBatchNorm2d)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'ok'
