"""Checks that the installed stack is one cbn_mmdet supports, with messages that say what to do."""
import importlib.util
import warnings
from importlib import metadata
from typing import Dict, Optional

from packaging.version import Version

# package -> (lowest supported, first unsupported); checked together on torch 2.13 CPU, Python 3.11 (`make test`).
# torch's ends, 2.1.0 and 2.15.0, and 2.4.1 pass the layer, engine and checkpoint tests with mmengine 0.10.7, mmdet
# 3.3.0 and mmcv 2.1.0 without ops (`make compat`, docs/compat.md).
# setup.cfg's install_requires declares the same ranges, torch excepted (tests/test_packaging.py).
SUPPORTED = {
    'torch': ('2.1.0', '2.16.0'),
    'mmengine': ('0.10.0', '0.11.0'),
    'mmcv': ('2.0.0', '2.2.0'),
    'mmdet': ('3.0.0', '3.4.0'),
}
# the distributions that provide a package's modules, checked in this order (mmcv-lite is mmcv without its ops)
DISTRIBUTIONS = {'mmcv': ('mmcv', 'mmcv-lite')}
HOW_TO_INSTALL = ('In your own environment, install versions in these ranges (README: "Installation in your own '
                  'environment", and docs/install.md). For this repository\'s CPU environment, run `make venv` '
                  '(tools/setup_env.sh) from the repository root, which installs torch==2.13.0, mmcv==2.1.0 built with '
                  'MMCV_WITH_OPS=1, mmengine==0.10.7 and mmdet==3.3.0 into .venv/.')


def supported_ranges() -> str:
    return ', '.join(f'{name}>={low},<{high}' for name, (low, high) in SUPPORTED.items())


def installed_versions() -> Dict[str, Optional[str]]:
    versions = {}
    for name in SUPPORTED:
        versions[name] = None
        for dist in DISTRIBUTIONS.get(name, (name, )):
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                pass
    return versions


def check_stack(versions: Optional[Dict[str, Optional[str]]] = None, has_mmcv_ops: Optional[bool] = None) -> None:
    """Raise ImportError naming the supported ranges if a package is missing or out of range.

    Warns when mmcv lacks its compiled ops (RoIAlign and nms, which R-CNN needs).

    Args:
        versions (dict, optional): package -> version, for tests; read from the installed metadata by default.
        has_mmcv_ops (bool, optional): for tests; looked up by default.
    """
    versions = installed_versions() if versions is None else versions
    problems = []
    for name, (low, high) in SUPPORTED.items():
        found = versions.get(name)
        if found is None:
            problems.append(f'{name} is not installed')
        elif not Version(low) <= Version(Version(found).base_version) < Version(high):
            problems.append(f'{name} {found} is installed')
    if problems:
        raise ImportError(f"cbn_mmdet supports {supported_ranges()}, but {'; '.join(problems)}. {HOW_TO_INSTALL}")
    if has_mmcv_ops is None:
        has_mmcv_ops = importlib.util.find_spec('mmcv._ext') is not None
    if not has_mmcv_ops:
        warnings.warn('mmcv was installed without its compiled ops (mmcv-lite, or built with MMCV_WITH_OPS=0): '
                      'RoIAlign and nms, which Faster/Mask R-CNN need, are missing. CBN itself works. To fix: '
                      'pip uninstall mmcv && MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0',
                      stacklevel=2)
