"""Registration in mmengine's root registries, so that every OpenMMLab codebase's scope finds CBN."""
from mmengine.registry import HOOKS, MODELS

from .engine import CBNBurnInHook
from .models import CrossIterationBatchNorm2d

NORM_NAMES = ('CBN', 'CrossIterationBatchNorm2d')


def register_all() -> None:
    """Register ``CBN`` (and the class name) in the root MODELS and ``CBNBurnInHook`` in the root HOOKS."""
    for name in NORM_NAMES:
        MODELS.register_module(name=name, module=CrossIterationBatchNorm2d, force=True)
    HOOKS.register_module(name='CBNBurnInHook', module=CBNBurnInHook, force=True)
