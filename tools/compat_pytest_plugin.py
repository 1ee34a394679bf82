"""pytest plugin for tools/compat_check.sh: a test that fails only for want of what the venv lacks is a skip.

The compatibility venvs hold mmcv built with ``MMCV_WITH_OPS=0``: nothing is compiled, so ``mmcv.ops`` (RoIAlign,
nms) cannot be imported and Faster/Mask R-CNN cannot be built. The lowest torch lacks features some tests use. A
test, or a test module at collection, whose failure report contains one of the signatures in ``MISSING`` is
reported as skipped with that signature's reason; every other failure stays a failure. Load it with
``python -m pytest -p tools.compat_pytest_plugin`` from the repository root.
"""
import pytest

# the text of the error -> why the test cannot run in this venv
MISSING = {
    "No module named 'mmcv._ext'": 'needs mmcv with compiled ops; this venv has mmcv built with MMCV_WITH_OPS=0',
    '"slow_conv2d_cpu" not implemented for \'Half\'': 'needs fp16 convolution on the CPU, which torch 2.1 lacks',
    "module 'torch.amp' has no attribute 'GradScaler'": 'the test uses torch.amp.GradScaler, which torch 2.1 lacks',
}


def reason_to_skip(report):
    """The reason of the first signature in a failed report, or None."""
    if not report.failed:
        return None
    text = str(report.longrepr)
    return next((f'{reason} ({signature})' for signature, reason in MISSING.items() if signature in text), None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    reason = reason_to_skip(report) if report.when in ('setup', 'call') else None
    if reason:
        report.outcome = 'skipped'
        report.longrepr = (str(item.path), item.location[1] or 0, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    reason = reason_to_skip(report)
    if reason:
        report.outcome = 'skipped'
        report.longrepr = (str(collector.path), 0, reason)
