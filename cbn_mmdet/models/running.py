"""The running statistics as one (2, C) tensor whose two rows are the layer's ``running_mean`` and ``running_var``.

The buffers stay BN's (same names, shapes and values in the ``state_dict``); they are only views of one storage, so
that the EMA step is one select and one lerp over both. Everything that replaces a buffer (a device move, a dtype
cast, ``load_state_dict(assign=True)``) is seen: :func:`pack_running` packs again after a module ``_apply``, and
:func:`packed_running` returns None for buffers that are not packed, whose update then takes one op more.
"""
from typing import Optional, Union

import torch
from torch import Tensor
from torch.nn import Module

from ..ops.fused import all_finite, ema_step

__all__ = ['pack_running', 'packed_running', 'running_factor', 'batch_update']


def packed_running(module: Module) -> Optional[Tensor]:
    """The (2, C) tensor whose rows are ``module.running_mean`` and ``module.running_var``, or None when they are not
    its two rows (not tracked, or replaced since they were packed). Host attributes only: no op."""
    packed = module.__dict__.get('_running_packed')
    mean, var = module.running_mean, module.running_var
    if packed is None or mean is None or var is None:
        return None
    step = packed.stride(0) * packed.element_size()
    if (mean.data_ptr() != packed.data_ptr() or var.data_ptr() != packed.data_ptr() + step
            or mean.dtype != packed.dtype or var.dtype != packed.dtype or mean.device != packed.device
            or mean.shape != packed.shape[1:] or var.shape != packed.shape[1:]):
        return None
    return packed


def pack_running(module: Module) -> None:
    """Make ``module.running_mean`` and ``running_var`` the two rows of one (2, C) tensor, kept as
    ``module._running_packed`` (a plain attribute: copies and pickles keep the three sharing one storage), keeping
    their values; a no-op when they are packed already, or of different dtypes, devices or shapes."""
    mean, var = module.running_mean, module.running_var
    if (mean is None or var is None or packed_running(module) is not None or mean.dtype != var.dtype
            or mean.device != var.device or mean.shape != var.shape or mean.dim() != 1):
        return
    with torch.no_grad():
        packed = torch.stack([mean, var])
    module._buffers['running_mean'] = packed[0]
    module._buffers['running_var'] = packed[1]
    module.__dict__['_running_packed'] = packed


def running_factor(module: Module, ok: Tensor, dtype: torch.dtype) -> Union[float, Tensor]:
    """Count the call where ``ok`` (a non-finite or fallen-back one is not counted; BN counts every batch) and
    return the EMA factor: ``momentum``, or the cumulative ``1/count`` on the device for ``momentum=None``."""
    module.num_batches_tracked.add_(ok)
    if module.momentum is None:
        return 1.0 / module.num_batches_tracked.clamp(min=1).to(dtype)
    return module.momentum


def batch_update(module: Module, mu: Tensor, s: Tensor, m: int) -> None:
    """BN's running-statistics step with a batch's own ``mu`` and centred moment ``s`` over ``m`` values per
    channel (the variance unbiased by ``m / (m - 1)``), skipped where they are not finite (decided on the device)."""
    new = torch.stack([mu, s * (m / max(m - 1, 1))])
    ok = all_finite(new)
    ema_step(module.running_mean, module.running_var, new, ok, running_factor(module, ok, module.running_mean.dtype),
             packed_running(module))
