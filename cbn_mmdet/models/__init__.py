"""The CBN layer (torch-only); registration with mmengine's root MODELS happens in cbn_mmdet.registry."""
from .cbn import CrossIterationBatchNorm2d, resolve_auto_window

__all__ = ['CrossIterationBatchNorm2d', 'resolve_auto_window']
