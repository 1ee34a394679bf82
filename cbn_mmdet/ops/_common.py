"""Helpers shared by the ops modules."""
import functools
from typing import Callable

import torch
from torch import Tensor


def autocast_off(fn: Callable) -> Callable:
    """Run ``fn`` with autocast disabled on its tensors' device: the statistics' matrix products stay in the
    statistics dtype (fp32/fp64) inside a mixed-precision forward."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        if not autocast_active(device):  # entering a context costs host time; skip it when it changes nothing
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def autocast_active(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no device argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == 'cpu' else torch.is_autocast_enabled()
