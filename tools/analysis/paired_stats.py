"""Paired differences over seeds, as every study in this folder reports them."""
import math
from typing import Optional, Sequence

import numpy as np


def paired_difference(diffs: Sequence[float]) -> dict:
    """``a - b`` per seed -> n, mean, standard error, the 95% t-interval's half-width, min and max.

    With one seed the spread is unknown: ``sem`` and ``ci95`` are None (never a made-up width).
    """
    from scipy import stats
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise ValueError('paired_difference: no paired seeds')
    sem: Optional[float] = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else None
    ci95 = float(stats.t.ppf(0.975, d.size - 1) * sem) if sem is not None else None
    return dict(n=int(d.size), mean=float(d.mean()), sem=sem, ci95=ci95, min=float(d.min()), max=float(d.max()))
