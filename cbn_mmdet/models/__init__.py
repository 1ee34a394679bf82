"""The CBN layer (torch-only), split by kind of state; registration with mmengine's root MODELS happens in
cbn_mmdet.registry."""
from .cbn import CrossIterationBatchNorm2d
from .conv_lookup import find_conv, in_backward, recomputing
from .replay import Replay, WindowStats
from .window import WindowBank

__all__ = ['CrossIterationBatchNorm2d', 'Replay', 'WindowBank', 'WindowStats', 'find_conv', 'in_backward',
           'recomputing']
