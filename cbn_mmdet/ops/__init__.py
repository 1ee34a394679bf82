"""Torch-only mathematics of CBN (no mmcv/mmdet imports)."""
from .cbn_stats import (Compensated, ConvSpec, HistoryGrad, StatGrads, batch_moments, cbn_normalize, channel_dots,
                        compensate, conv_stat_grads, history_grad, kernel_products, relative_stat_errors, stat_dtype,
                        subsample_plan, window_moments)

__all__ = [
    'Compensated', 'ConvSpec', 'HistoryGrad', 'StatGrads', 'batch_moments', 'cbn_normalize', 'channel_dots',
    'compensate', 'conv_stat_grads', 'history_grad', 'kernel_products', 'relative_stat_errors', 'stat_dtype',
    'subsample_plan', 'window_moments'
]
