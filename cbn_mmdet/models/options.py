"""The layer's options and their checks (one message shape for every bad value: the argument and the value), and
the layer's name in messages."""
import gc
import math
from typing import Optional, Union

from torch import nn

__all__ = ['BACKWARDS', 'positive_int', 'check_window_size', 'check_backward', 'check_layer_options',
           'find_module_path', 'OptionsMixin']

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


def check_layer_options(num_features, eps, momentum, compensate, stat_grad_subsample, backward,
                        second_order) -> None:
    """The CBN layer's constructor arguments other than ``window_size`` (:func:`check_window_size`)."""
    positive_int('num_features', num_features)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f'eps must be a finite number > 0, got {eps!r}')
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0 <= momentum <= 1):
        raise ValueError(f'momentum must be None or a number in [0, 1], got {momentum!r}')
    if not isinstance(compensate, bool):
        raise ValueError(f'compensate must be a bool, got {compensate!r}')
    positive_int('stat_grad_subsample', stat_grad_subsample)
    check_backward(backward)
    positive_int('second_order', second_order, minimum=0)


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


class OptionsMixin:
    """The CBN layer's options that may change after construction, each checked as the constructor checks it (a
    mixin of :class:`~cbn_mmdet.models.cbn.CrossIterationBatchNorm2d`)."""

    _window_size: Union[int, str]
    _stat_grad_subsample: int
    _backward: str
    _second_order: int
    compensate: bool
    _workspace: Optional[object]

    @property
    def window_size(self) -> Union[int, str]:
        return self._window_size

    @window_size.setter
    def window_size(self, value) -> None:
        value = check_window_size(value)
        if value != self._window_size:
            self._banks = []
            self._workspace = None
        self._window_size = value

    @property
    def stat_grad_subsample(self) -> int:
        return self._stat_grad_subsample

    @stat_grad_subsample.setter
    def stat_grad_subsample(self, value) -> None:
        self._stat_grad_subsample = positive_int('stat_grad_subsample', value)  # takes effect at the next push

    @property
    def backward(self) -> str:
        return self._backward

    @backward.setter
    def backward(self, value) -> None:
        self._backward = check_backward(value)  # takes effect at the next forward

    @property
    def second_order(self) -> int:
        return self._second_order

    @second_order.setter
    def second_order(self, value) -> None:
        self._second_order = positive_int('second_order', value, minimum=0)  # a new bank at the next push

    def extra_repr(self) -> str:
        mode = 'taylor' if self.compensate else 'naive'
        sub = f', stat_grad_subsample={self.stat_grad_subsample}' if self.stat_grad_subsample != 1 else ''
        back = f', backward={self.backward!r}' if self.compensate else ''
        second = f', second_order={self.second_order}' if self.second_order and self.compensate else ''
        return f'{super().extra_repr()}, window_size={self.window_size!r}, compensate={mode}{back}{sub}{second}'
