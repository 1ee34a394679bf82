"""Registration in mmengine's root registries, so that every OpenMMLab codebase's scope finds CBN."""
from mmengine.registry import HOOKS, MODELS

from .engine import CBNBurnInHook, CBNStatsErrorHook
from .models import CrossIterationBatchNorm2d

NORM_NAMES = ('CBN', 'CrossIterationBatchNorm2d')


def register_all() -> None:
    """Register ``CBN`` (and the class name) in the root MODELS and the hooks in the root HOOKS."""
    for name in NORM_NAMES:
        MODELS.register_module(name=name, module=CrossIterationBatchNorm2d, force=True)
    for hook in (CBNBurnInHook, CBNStatsErrorHook):
        HOOKS.register_module(name=hook.__name__, module=hook, force=True)
