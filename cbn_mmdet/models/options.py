"""The layer's options and their checks: one message shape for every bad value (the argument and the value)."""
from typing import Union

__all__ = ['BACKWARDS', 'positive_int', 'check_window_size', 'check_backward']

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
