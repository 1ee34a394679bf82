"""tools/analysis/paired_stats.py: the paired difference every study reports."""
import math
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))

from paired_stats import paired_difference  # noqa: E402


def test_paired_difference_against_hand_computed_values():
    d = paired_difference([1.0, 2.0, 6.0])
    sem = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) / math.sqrt(3)  # sample std / sqrt(n)
    assert d['n'] == 3 and d['mean'] == 3.0 and d['min'] == 1.0 and d['max'] == 6.0
    # Tolerances: both sides are a few fp64 operations on small integers (relative rounding ~1e-16 each), so 1e-12
    # leaves 10^4 ulps on any IEEE-754 machine; the t quantile is compared with its 16-digit table value, and
    # scipy's inverse-t is accurate to ~1e-12 relative, well inside 1e-9.
    assert d['sem'] == pytest.approx(sem, rel=1e-12)
    assert d['ci95'] == pytest.approx(4.302652729911275 * sem, rel=1e-9)  # t(0.975, 2 dof) from tables


def test_one_seed_has_no_interval_and_none_is_refused():
    assert paired_difference([0.5]) == dict(n=1, mean=0.5, sem=None, ci95=None, min=0.5, max=0.5)
    with pytest.raises(ValueError, match='no paired seeds'):
        paired_difference([])
