"""pytest plugin for tools/compat_check.sh: a test that fails only for want of mmcv's compiled ops is a skip.

The compatibility venvs hold mmcv built with ``MMCV_WITH_OPS=0``: nothing is compiled, so ``mmcv.ops`` (RoIAlign,
nms) cannot be imported and Faster/Mask R-CNN cannot be built. A test, or a test module at collection, whose failure
report says ``No module named 'mmcv._ext'`` is reported as skipped with that reason; every other failure stays a
failure. Load it with ``python -m pytest -p tools.compat_pytest_plugin`` from the repository root.
"""
import pytest

MISSING_OPS = "No module named 'mmcv._ext'"
REASON = f'needs mmcv with compiled ops ({MISSING_OPS}); this venv has mmcv built with MMCV_WITH_OPS=0'


def lacks_only_the_ops(report) -> bool:
    return report.failed and MISSING_OPS in str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when in ('setup', 'call') and lacks_only_the_ops(report):
        report.outcome = 'skipped'
        report.longrepr = (str(item.path), item.location[1] or 0, REASON)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if lacks_only_the_ops(report):
        report.outcome = 'skipped'
        report.longrepr = (str(collector.path), 0, REASON)
