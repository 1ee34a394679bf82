"""The layer's options and their checks (one message shape for every bad value: the argument and the value), and
the layer's name in messages."""
import gc
from typing import Union

from torch import nn

__all__ = ['BACKWARDS', 'positive_int', 'check_window_size', 'check_backward', 'find_module_path']

BACKWARDS = ('exact', 'authors')


def positive_int(name: str, value, minimum: int = 1, owner: str = '') -> int:
    """``value`` if it is an int >= ``minimum`` (not a bool), else a ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{owner}{name} must be an int >= {minimum}, got {value!r}')
    return value


def check_window_size(value, owner: str = '') -> Union[int, str]:
    """An int >= 1 or ``'auto'``."""
    if isinstance(value, str) and value == 'auto':
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}window_size must be an int >= 1 or 'auto', got {value!r}")
    return value


def check_backward(value) -> str:
    if value not in BACKWARDS:
        raise ValueError(f'backward must be one of {BACKWARDS}, got {value!r}')
    return value


def find_module_path(module) -> str:
    """The dotted path of this layer in its root module (only used in messages)."""
    parent_of = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), nn.Module):
            for name, child in obj._modules.items():
                if child is not None:
                    parent_of.setdefault(id(child), (obj, name))
    parts, node = [], module
    while id(node) in parent_of and len(parts) < 64:
        node, name = parent_of[id(node)]
        parts.append(name)
    return '.'.join(reversed(parts)) or '<root>'
