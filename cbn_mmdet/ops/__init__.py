"""Torch-only mathematics of CBN (no mmcv/mmdet imports), one module per group of equations.

* :mod:`.moments`: batch and window moments (Eq. 2-3, 9-11);
* :mod:`.conv_grads`: the statistics' kernel gradients in closed form (Appendix B);
* :mod:`.compensation`: compensation and its derivative in the current kernel, in reference form (Eq. 7-8, 10);
* :mod:`.fused`: the same over a static window bank in a few packed ops (the layer's hot path);
* :mod:`.normalize`: normalization with window statistics and its backward (Eq. 12, 4).
"""
from .compensation import Compensated, compensate, history_grad
from .conv_grads import ConvSpec, StatGrads, channel_dots, conv_stat_grads, kernel_products, subsample_plan
from .moments import batch_moments, relative_stat_errors, stat_dtype, window_moments
from .normalize import HistoryGrad, cbn_normalize

__all__ = [
    'Compensated', 'ConvSpec', 'HistoryGrad', 'StatGrads', 'batch_moments', 'cbn_normalize', 'channel_dots',
    'compensate', 'conv_stat_grads', 'history_grad', 'kernel_products', 'relative_stat_errors', 'stat_dtype',
    'subsample_plan', 'window_moments'
]
