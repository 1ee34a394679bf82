"""cbn_mmdet: Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for MMDetection 3.x.

Importing the package checks the stack, registers the ``CBN`` norm layer, ``CBNBurnInHook`` and ``CBNStatsErrorHook``
in mmengine's root registries (where mmcv keeps BN, GN and SyncBN), and makes mmengine's checkpoint loader work with
torch's ``weights_only`` default.
"""
from .utils.stack import check_stack

check_stack()

from .engine import CBNBurnInHook, CBNStatsErrorHook, resolve_auto_window  # noqa: E402
from .models import CrossIterationBatchNorm2d  # noqa: E402
from .registry import register_all  # noqa: E402
from .utils.checkpoint import install_checkpoint_loader  # noqa: E402
from .version import __version__  # noqa: E402

register_all()
install_checkpoint_loader()

__all__ = ['CrossIterationBatchNorm2d', 'CBNBurnInHook', 'CBNStatsErrorHook', 'resolve_auto_window', '__version__']
