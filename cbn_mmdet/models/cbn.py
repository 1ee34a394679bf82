"""CrossIterationBatchNorm2d: the CBN layer as a drop-in ``_BatchNorm``.

The layer owns the policy (when the window is used, where the convolution comes from, the window's storage,
the running statistics and the fallbacks); the formulas live in :mod:`cbn_mmdet.ops.cbn_stats`.
"""
import gc
import math
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.cbn_stats import (ConvSpec, HistoryGrad, batch_moments, cbn_normalize, compensate, conv_stat_grads,
                             history_grad, kernel_products, window_moments)

__all__ = ['CrossIterationBatchNorm2d', 'resolve_auto_window']

_WINDOW_KEYS = ('mu', 's', 'g_mu', 'g_s', 'p_mu', 'p_s', 'bias', 'm', 'w')
BACKWARDS = ('exact', 'authors')


def resolve_auto_window(images_per_gpu: int) -> int:
    """The paper's suggested window (Sec. 4.3): ``k = min(ceil(16 / images per GPU), 8)``."""
    if isinstance(images_per_gpu, bool) or not isinstance(images_per_gpu, int) or images_per_gpu < 1:
        raise ValueError(f'images_per_gpu must be a positive int, got {images_per_gpu!r}')
    return min(math.ceil(16 / images_per_gpu), 8)


def _check_window_size(window_size) -> Union[int, str]:
    if window_size == 'auto' and isinstance(window_size, str):
        return window_size
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be an int >= 1 or 'auto', got {window_size!r}")
    return window_size


def _check_subsample(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'stat_grad_subsample must be an int >= 1, got {value!r}')
    return value


def _check_backward(value) -> str:
    if value not in BACKWARDS:
        raise ValueError(f'backward must be one of {BACKWARDS}, got {value!r}')
    return value


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _leaf_parameter(node) -> Optional[Tensor]:
    """The leaf tensor behind a conv's weight/bias input, looking through autocast's dtype cast."""
    while node is not None:
        if hasattr(node, 'variable'):  # AccumulateGrad
            return node.variable
        if type(node).__name__ != 'ToCopyBackward0' or len(node.next_functions) != 1:
            return None
        node = node.next_functions[0][0]
    return None


class _Window:
    """The last ``capacity`` iterations of one layer's call position, as a ring buffer of stacked tensors.

    Per stored iteration: ``g_s`` (one kernel-sized tensor), ``g_mu`` (one patch per group), and the per-channel
    ``mu``, ``s``, ``p_mu = <g_mu, W_tau>``, ``p_s = <g_s, W_tau>``, the conv bias ``bias``, the count ``m`` and the
    weight ``w``: 1, or 0 for an iteration that was skipped because it was not finite (decided on the device, so
    the host never waits for it). A skipped iteration's values are stored as zeros: no NaN enters the history.
    No copy of the kernel is kept.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.count = 0
        self.next = 0
        self.tensors: Dict[str, Optional[Tensor]] = dict.fromkeys(_WINDOW_KEYS)

    def accepts(self, entry: Dict[str, Tensor], capacity: int) -> bool:
        """Whether an entry fits this window (same capacity, keys, shapes and dtype); otherwise start afresh."""
        t = self.tensors
        if self.capacity != capacity or t['mu'] is None:
            return self.capacity == capacity
        return all(t[k] is not None and t[k].shape[1:] == v.shape and t[k].dtype == v.dtype
                   for k, v in entry.items()) and all(t[k] is None for k in t if k not in entry)

    def push(self, entry: Dict[str, Tensor], ok: Tensor) -> None:
        """Store ``entry`` in the next slot; where ``ok`` (a device bool) is False, store zeros with weight 0."""
        t = self.tensors
        if t['mu'] is None:
            for key, value in entry.items():
                t[key] = value.new_zeros((self.capacity, ) + tuple(value.shape))
        zero = entry['mu'].new_zeros(())
        for key, value in entry.items():
            torch.where(ok, value, zero, out=t[key][self.next])  # one pass, as a copy would be
        self.next = (self.next + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def view(self) -> Dict[str, Optional[Tensor]]:
        """The stored iterations (order does not matter: Eq. 9-10 are sums)."""
        return {k: (None if v is None else v[:self.count]) for k, v in self.tensors.items()}

    def apply(self, fn) -> None:
        for key, value in self.tensors.items():
            if value is not None:
                self.tensors[key] = fn(value).to(value.dtype)


class _Stats(NamedTuple):
    """What one training forward normalized with."""
    mu_bar: Tensor
    var_bar: Tensor
    n_iters: Union[int, Tensor]  # iterations averaged, the current one included (a tensor when weights apply)
    m_total: Union[int, Tensor]  # values averaged
    hist: Optional[HistoryGrad]  # the exact backward's history terms, or None


class _Replay(NamedTuple):
    """One training call's statistics, for its checkpoint recomputation during backward."""
    mu_t: Tensor
    stats: _Stats
    pushed: bool
    shape: Tuple[int, ...] = ()  # the input's shape: finds the call again (FPN levels differ in size)
    replayed: bool = False


class _BackwardFlag:
    """Set when backward runs through the layer; tells an unmanaged layer that a new iteration has begun."""

    def __init__(self):
        self.seen = False

    def __call__(self) -> None:
        self.seen = True


class CrossIterationBatchNorm2d(_BatchNorm):
    r"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) over a 4D input.

    BatchNorm estimates its statistics from the current mini-batch alone, which is too few examples at the 1-4
    images per GPU of detection training. CBN averages the statistics of the last ``k`` iterations. The
    statistics of an earlier iteration :math:`t-\tau` were computed under older weights, so they are first moved to
    the current weights of the preceding convolution by a first-order Taylor term:

    .. math::
        \mu_{t-\tau}(\theta_t) = \mu_{t-\tau} + \frac{\partial \mu_{t-\tau}}{\partial \theta_{t-\tau}}
            (\theta_t - \theta_{t-\tau}), \qquad
        \nu_{t-\tau}(\theta_t) = \nu_{t-\tau} + \frac{\partial \nu_{t-\tau}}{\partial \theta_{t-\tau}}
            (\theta_t - \theta_{t-\tau})                                                      \quad (7, 8)

        \bar\mu = \frac{1}{k}\sum_{\tau=0}^{k-1} \mu_{t-\tau}(\theta_t), \quad
        \bar\nu = \frac{1}{k}\sum_{\tau=0}^{k-1} \max[\nu_{t-\tau}(\theta_t), \mu_{t-\tau}(\theta_t)^2], \quad
        \bar\sigma^2 = \bar\nu - \bar\mu^2                                                    \quad (9, 10, 11)

        y = \gamma \frac{x - \bar\mu}{\sqrt{\bar\sigma^2 + \epsilon}} + \beta                 \quad (12, 4)

    :math:`\theta` is the kernel (and bias) of the convolution that produced ``x``. The gradients of the
    statistics are computed in closed form (Appendix B): :math:`\partial\mu/\partial\theta` is the mean input
    patch, :math:`\partial\nu/\partial\theta` one convolution weight-gradient.

    Choices made where the paper is silent:

    * **Gradients** (``backward``): the compensated statistics of Eq. 7-8 are functions of the current kernel
      :math:`\theta_t`. ``'exact'`` differentiates the forward through them too: the conv's kernel and bias get
      the derivative of the window statistics through the compensation (Sec. 3.3 fixes the earlier iterations'
      inputs and weights, not :math:`\theta_t`). BN's forward is scale-invariant in the kernel, so its kernel
      gradient is orthogonal to the kernel and the conv bias gets none; CBN's forward is so to first order in
      :math:`\theta_t - \theta_{t-\tau}`, and the exact backward keeps that (measured |cos| ~1e-3), where the
      authors' does not (~0.05-0.1). ``'authors'`` treats the history and the
      compensation terms, :math:`\theta_t` included, as constants, as the authors' release does (``weight.data``).
      Both send gradients to ``x`` through the current iteration's :math:`\mu_t, \nu_t` alone.
    * **Numerics**: the layer carries the centred moment :math:`s = \nu - \mu^2` per iteration, which is Eq. 8-11
      in exact arithmetic but does not cancel in fp32 when :math:`|\mu| \gg \sigma`. Statistics are fp32 for
      fp16/bf16/fp32 input and fp64 for fp64 input.
    * **Fewer than k iterations** (start of training): the average runs over those present.
    * **The convolution** is read from ``x``'s autograd graph at every training forward, so the layer needs no
      extra call, whatever module structure surrounds it. If ``x`` was not produced by a 2D convolution (a norm
      before the conv, an activation in between, a linear layer, ``torch.compile``, an input with no graph), the
      layer warns once and acts as plain BN (k=1); it never falls back to naive averaging.
    * **Iterations**: with :class:`~cbn_mmdet.engine.CBNBurnInHook` the hook marks iterations. Without it a new
      iteration begins at a training forward when, since the previous one, a backward pass ran through the layer
      (an empty call's included) or the conv's kernel changed.
    * **Several calls per iteration** (a head shared across FPN levels, as in RetinaNet, FCOS, ATSS or GFL, which
      run each head conv once per level, P3 to P7 in order): the c-th training call of an iteration keeps the c-th
      window, compensated against that call's own input, so each level averages with its own history. Every
      training call takes a position, empty and non-finite ones included (an empty call stores nothing, a
      non-finite one a weight-0 slot); eval-mode forwards and checkpoint recomputations take none. The number of
      calls per iteration is learnt from the first iteration with windows; a later iteration with another number
      raises an error naming the layer and both counts (:meth:`reset_window` starts afresh). Window memory grows
      with the number of calls (RetinaNet's head, k=4: 6.8 MiB per layer and level, 34 MiB per layer).
    * **Gradient checkpointing** (mmdet's ``with_cp=True``): the recomputation during backward replays the
      statistics of the first forward of the same call (found by the input's shape, or among calls of one shape
      by its batch mean, on the device) and pushes the iteration once. A first forward without a graph
      (reentrant checkpointing) compensates with the kernel seen at the previous iteration and pushes the
      iteration at the recomputation.
    * **Non-finite statistics**: such an iteration is normalized with its own statistics (as BN would), and
      enters neither the averages nor the running statistics: it takes a window slot with weight 0, stored as
      zeros. A non-finite compensation (a diverged kernel) falls back to the current batch's statistics. Both are
      decided on the device with ``torch.where``: a training iteration never waits on the host.

    Note:
        The running statistics follow an exponential moving average (``momentum``; cumulative when ``None``) of
        the statistics that actually normalized the batch: :math:`\bar\mu`, and :math:`\bar\sigma^2 n/(n-1)` with
        :math:`n` the number of values averaged (the sum of ``N*H*W`` over the iterations in the window). With
        ``k=1`` this is exactly BN's update. A layer called several times per iteration updates them once per
        call, as BN in a shared head does: with momentum 0.1 the last calls weigh most (in RetinaNet's head P7
        0.1, P6 0.09, ... P3 0.066 of each iteration's update), so the evaluation statistics lean towards the
        coarse levels P6 and P7, exactly as with BN. In eval mode the layer is ``nn.BatchNorm2d``. The
        ``state_dict`` has exactly BN's keys; the windows (one per call position) are read and restored with
        :meth:`get_window_state` and :meth:`set_window_state`.

    Args:
        num_features (int): C of the (N, C, H, W) input.
        eps (float): Added to the variance inside the square root (Eq. 12). Default: 1e-5.
        momentum (float | None): Running statistics' update factor; ``None`` for a cumulative average.
            Default: 0.1.
        affine (bool): Learn gamma and beta. Default: True.
        track_running_stats (bool): Keep running statistics for eval. Default: True.
        window_size (int | str): The paper's k, the number of iterations averaged, the current one included.
            ``k=1`` is plain BN. ``'auto'`` is resolved by ``CBNBurnInHook`` to
            ``min(ceil(16 / images per GPU), 8)``. Default: 4.
        compensate (bool): Apply the Taylor compensation; ``False`` gives the paper's "Naive CBN". Default: True.
        stat_grad_subsample (int): An opt-in approximation of the one extra cost of exact CBN, the weight-gradient
            ``dnu/dW`` of Eq. 8: estimate it from every r-th RoI (inputs of at least ``8r`` samples) or else every
            r-th row of the feature map (exact on maps of fewer than ``2r`` rows), which cuts that weight-gradient
            to ``1/r``. ``dmu/dW`` and the current statistics stay exact. ``1`` is exact CBN. Its measured effect
            on the statistics' error is in the README ("Opt-in approximation"). With the exact backward, the kernel
            gets the exact derivative of the forward as computed, i.e. through the estimated ``ds/dW``. Default: 1.
        backward (str): ``'exact'``, the derivative of the forward through the compensation's dependence on the
            current kernel, or ``'authors'``, the authors' released backward (history constant). Why the default
            is what it is: README, "Which backward". Default: ``'exact'``.

    Example:
        >>> from mmcv.cnn import build_norm_layer
        >>> import cbn_mmdet
        >>> name, cbn = build_norm_layer(dict(type='CBN', window_size=4), 64)  # ('bn', layer)
        >>> conv = torch.nn.Conv2d(3, 64, 3, padding=1)
        >>> y = cbn(conv(torch.randn(2, 3, 32, 32)))
    """

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 window_size: Union[int, str] = 4,
                 compensate: bool = True,
                 stat_grad_subsample: int = 1,
                 backward: str = 'exact',
                 device=None,
                 dtype=None):
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f'num_features must be a positive int, got {num_features!r}')
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
            raise ValueError(f'eps must be a finite number > 0, got {eps!r}')
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0 <= momentum <= 1):
            raise ValueError(f'momentum must be None or a number in [0, 1], got {momentum!r}')
        if not isinstance(compensate, bool):
            raise ValueError(f'compensate must be a bool, got {compensate!r}')
        _check_subsample(stat_grad_subsample)
        _check_backward(backward)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._window_size = _check_window_size(window_size)
        self.compensate = compensate
        self._stat_grad_subsample = stat_grad_subsample
        self._backward = backward
        # One window per call position within an iteration (a head shared across FPN levels is called once per
        # level, in a fixed order): the c-th training call of an iteration uses and fills self._windows[c].
        self._windows: List[Optional[_Window]] = []
        self._call = -1  # position of the latest training call in the current iteration (-1: none yet)
        self._calls: Optional[int] = None  # training calls per iteration, known once a windowed one has ended
        self._counted = False  # whether the current iteration's calls are windowed (checked against _calls)
        # Iteration control. An unmanaged layer uses its window from the first iteration; CBNBurnInHook calls
        # begin_iteration() before every training iteration.
        self._managed = False
        self._iter_mark = None  # hook's iteration index (managed)
        self._use_window = True
        self._collect = True
        self._last_mark = None
        self._last_version = None
        self._flag = _BackwardFlag()
        self._replays: List[Optional[_Replay]] = []  # per call position, for checkpoint recomputation
        self._conv_params: Optional[Tuple[Tensor, Optional[Tensor]]] = None  # kernel and bias of the last push
        self._warned = False
        # analysis only (tools/analysis/classification_study.py): the backward counts the batch's m values, not the
        # window's n*m, to tell the count's effect apart from the statistics'
        self._probe_batch_count = False
        self._replay_mismatches: Optional[Tensor] = None  # CUDA: checkpoint replays that saw another input
        self.module_path: Optional[str] = None  # set by CBNBurnInHook; looked up on error otherwise

    # ------------------------------------------------------------------ configuration
    @property
    def window_size(self) -> Union[int, str]:
        return self._window_size

    @window_size.setter
    def window_size(self, value) -> None:
        value = _check_window_size(value)
        if value != self._window_size:
            self._windows = []
        self._window_size = value

    @property
    def stat_grad_subsample(self) -> int:
        return self._stat_grad_subsample

    @stat_grad_subsample.setter
    def stat_grad_subsample(self, value) -> None:
        self._stat_grad_subsample = _check_subsample(value)  # takes effect at the next push; the window stays

    @property
    def backward(self) -> str:
        return self._backward

    @backward.setter
    def backward(self, value) -> None:
        self._backward = _check_backward(value)  # takes effect at the next forward

    def extra_repr(self) -> str:
        mode = 'taylor' if self.compensate else 'naive'
        sub = f', stat_grad_subsample={self.stat_grad_subsample}' if self.stat_grad_subsample != 1 else ''
        back = f', backward={self.backward!r}' if self.compensate else ''
        return f'{super().extra_repr()}, window_size={self.window_size!r}, compensate={mode}{back}{sub}'

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f'expected 4D input (got {input.dim()}D input)')

    def begin_iteration(self, mark: int, use_window: bool = True, collect: bool = True) -> None:
        """Called by :class:`~cbn_mmdet.engine.CBNBurnInHook` before each training iteration.

        Args:
            mark (int): The iteration index; the window advances when it changes.
            use_window (bool): Normalize with the window (False during burn-in: plain BN).
            collect (bool): Push this iteration into the window (the last k-1 burn-in iterations and after).
        """
        self._managed = True
        self._iter_mark = mark
        self._use_window = use_window
        self._collect = collect

    def reset_window(self) -> None:
        """Forget the stored iterations of every call position and the number of calls per iteration; the next
        training call starts a new iteration."""
        self._windows = []
        self._replays = []
        self._calls = None
        self._call, self._counted = -1, False

    @property
    def _window(self) -> Optional[_Window]:
        """The first call position's window (the only one of a layer called once per iteration)."""
        return self._windows[0] if self._windows else None

    @_window.setter
    def _window(self, value: Optional[_Window]) -> None:
        self._set_window(0, value)

    def _set_window(self, position: int, value: Optional[_Window]) -> None:
        if position >= len(self._windows):
            self._windows.extend([None] * (position + 1 - len(self._windows)))
        self._windows[position] = value

    def window_at(self, position: int) -> Optional[_Window]:
        """The window of the ``position``-th training call of an iteration (None if it holds nothing)."""
        return self._windows[position] if 0 <= position < len(self._windows) else None

    @property
    def _replay(self) -> Optional[_Replay]:
        """What the latest training call normalized with."""
        return self._replays[self._call] if 0 <= self._call < len(self._replays) else None

    @property
    def window_length(self) -> int:
        """How many past iterations the window holds now (the first call position's; see :attr:`window_lengths`)."""
        return 0 if self._window is None else self._window.count

    @property
    def window_lengths(self) -> List[int]:
        """How many past iterations each call position's window holds now: one entry per training call of an
        iteration (5 for a head shared across P3-P7), ``[]`` before any was stored."""
        return [0 if w is None else w.count for w in self._windows]

    @property
    def window_nbytes(self) -> int:
        """Bytes held by the windows of every call position (memory grows with the calls per iteration)."""
        return sum(v.nbytes for w in self._windows if w is not None for v in w.tensors.values() if v is not None)

    @property
    def calls_per_iteration(self) -> Optional[int]:
        """Training calls per iteration, once a windowed iteration has ended (None before)."""
        return self._calls

    # ------------------------------------------------------------------ state
    @staticmethod
    def _position_state(window: Optional[_Window]) -> dict:
        if window is None or not window.count:
            return dict(count=0, next=0, tensors={})
        return dict(count=window.count, next=window.next,
                    tensors={k: v.detach().cpu().clone() for k, v in window.tensors.items() if v is not None})

    def get_window_state(self) -> dict:
        """The window history as a dict of CPU tensors, for checkpoints (the state_dict stays BN's).

        ``count``, ``next`` and ``tensors`` hold the first call position's window, as a layer called once per
        iteration has always written them. A layer called several times per iteration (a head shared across FPN
        levels) adds ``calls`` (its calls per iteration) and ``later_calls``, the same three fields for each later
        position, in call order.
        """
        state = dict(window_size=self.window_size, **self._position_state(self._window))
        if len(self._windows) > 1 or (self._calls or 1) > 1:
            state.update(calls=self._calls, later_calls=[self._position_state(w) for w in self._windows[1:]])
        return state

    def set_window_state(self, state: dict) -> None:
        """Restore what :meth:`get_window_state` returned. A state without ``later_calls`` (written by a layer
        called once per iteration, or before per-call windows existed) restores the first call position."""
        if not isinstance(state, dict) or not {'window_size', 'count', 'next', 'tensors'} <= set(state):
            raise ValueError(f'{self._describe()}: not a CBN window state: {type(state).__name__}')
        self.window_size = state['window_size']
        self._windows = []
        self._replays = []
        self._calls = state.get('calls')
        self._call, self._counted, self._last_mark = -1, False, None  # the next call starts an iteration
        if self.window_size == 'auto' or self.window_size < 2:
            return
        for position, sub in enumerate([state] + list(state.get('later_calls') or ())):
            self._set_window(position, self._window_from_state(sub))
        while self._windows and self._windows[-1] is None:
            self._windows.pop()

    def _window_from_state(self, state: dict) -> Optional[_Window]:
        if not state['count']:
            return None
        tensors = state['tensors']
        capacity = self.window_size - 1
        if tensors['mu'].shape != (capacity, self.num_features):
            raise ValueError(f"{self._describe()}: window state holds {tuple(tensors['mu'].shape)} statistics, "
                             f'expected ({capacity}, {self.num_features})')
        window = _Window(capacity)
        device = self.running_mean.device if self.running_mean is not None else (
            self.weight.device if self.weight is not None else torch.device('cpu'))
        for key in _WINDOW_KEYS:
            if tensors.get(key) is not None:
                window.tensors[key] = tensors[key].to(device).clone()
        if window.tensors['w'] is None:  # written before skipped iterations had weights: every slot counted
            window.tensors['w'] = torch.ones_like(window.tensors['m'])
        window.count, window.next = int(state['count']), int(state['next'])
        return window

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for window in self._windows:
            if window is not None:
                window.apply(fn)  # follows the device; keeps the statistics dtype
        self._replays = []
        self._replay_mismatches = None
        return self

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), '__getstate__') else self.__dict__
        state = dict(state)
        state['_conv_params'] = None  # a reference into another module; found again at the next forward
        state['_replays'] = []
        return state

    # ------------------------------------------------------------------ helpers
    def _describe(self) -> str:
        return f"{type(self).__name__} '{self.module_path or self._find_module_path()}'"

    def _find_module_path(self) -> str:
        """The dotted path of this layer in its root module (only used in messages)."""
        parent_of = {}
        for obj in gc.get_objects():
            if issubclass(type(obj), nn.Module):
                for name, child in obj._modules.items():
                    if child is not None:
                        parent_of.setdefault(id(child), (obj, name))
        parts, node = [], self
        while id(node) in parent_of and len(parts) < 64:
            node, name = parent_of[id(node)]
            parts.append(name)
        return '.'.join(reversed(parts)) or '<root>'

    def _warn_once(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f'{self._describe()}: {why}; it acts as plain BatchNorm (k=1) for such inputs.',
                          stacklevel=3)

    def _active_k(self) -> int:
        if self.window_size == 'auto':
            raise RuntimeError(f"{self._describe()}: window_size='auto' is resolved by CBNBurnInHook from "
                               "train_dataloader.batch_size; add custom_hooks=[dict(type='CBNBurnInHook', ...)] "
                               'or give an int window_size.')
        return self.window_size

    @staticmethod
    def _find_conv(x: Tensor) -> Tuple[Optional[ConvSpec], str]:
        fn = x.grad_fn
        if fn is None:
            return None, 'its input has no autograd graph'
        if type(fn).__name__ != 'ConvolutionBackward0':
            return None, f'its input was produced by {type(fn).__name__}, not by a convolution'
        try:
            transposed, weight = fn._saved_transposed, fn._saved_weight
            inp = fn._saved_input
            stride, padding, dilation, groups = (fn._saved_stride, fn._saved_padding, fn._saved_dilation,
                                                 fn._saved_groups)
            has_bias = fn._saved_bias_sym_sizes_opt is not None
        except (AttributeError, RuntimeError) as err:  # saved tensors freed, or a new torch layout
            return None, f'the convolution in its graph could not be read ({err})'
        if transposed or weight.dim() != 4:
            return None, 'its input was produced by a transposed or non-2D convolution'
        kernel = _leaf_parameter(fn.next_functions[1][0])
        if kernel is None or kernel.shape != weight.shape:
            kernel = weight  # frozen or derived kernel: the tensor the conv used is theta
        bias = _leaf_parameter(fn.next_functions[2][0]) if has_bias else None  # frozen bias: constant, no term
        return ConvSpec(kernel, bias, inp, tuple(stride), tuple(padding), tuple(dilation), int(groups)), ''

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if x.numel() == 0:
            return self._empty_forward(x)
        if not self.training:
            return super().forward(x)  # exactly nn.BatchNorm2d in eval
        k = self._active_k()
        with torch.no_grad():  # the statistics' gradients are folded into cbn_normalize's backward
            mu_t, s_t = batch_moments(x)
            # a device bool, never read on the host: a non-finite batch is normalized with its own statistics and
            # enters neither the averages nor the running statistics, through torch.where and zero weights
            finite = torch.isfinite(mu_t).all() & torch.isfinite(s_t).all()
        if self._replays and _in_backward():
            positions = self._find_replay(x)
            if positions:
                return self._replay_forward(x, mu_t, s_t, finite, positions)

        counted = k > 1 and (self._use_window or self._collect)
        windowed = counted
        conv, why = self._find_conv(x) if windowed else (None, '')
        grad_mode = torch.is_grad_enabled()
        if windowed and conv is None and grad_mode:
            self._warn_once(f'cannot use its window because {why}')
            windowed = False
        position = self._begin_call(conv, counted)
        use_window = windowed and self._use_window
        window = self.window_at(position) if use_window else None
        with torch.no_grad():
            stats = self._window_stats(x, mu_t, s_t, finite, conv, window, position)
        y = self._normalize(x, stats, conv)
        self._update_running_stats(stats, finite)  # once per call, as BN in a shared head
        pushed = windowed and self._collect and conv is not None
        if pushed:
            self._push(conv, x, mu_t, s_t, finite, position)
        self._set_replay(position, _Replay(mu_t, stats, pushed or not (windowed and self._collect), tuple(x.shape)))
        return y

    def _empty_forward(self, x: Tensor) -> Tensor:
        """An empty RoI batch: keep a graph to gamma and beta (DDP needs every parameter used); no statistics. In
        training it is a call like any other: it takes its call position (its window gets nothing), and a backward
        through it tells an unmanaged layer that the iteration ended."""
        y = x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1) if self.affine else x.clone()
        if self.training and not _in_backward():
            k = self.window_size
            self._begin_call(None, isinstance(k, int) and k > 1 and (self._use_window or self._collect))
            if y.requires_grad:
                flag = self._flag
                y.register_hook(lambda grad: flag())
        return y

    def _normalize(self, x: Tensor, stats: _Stats, conv: Optional[ConvSpec]) -> Tensor:
        kernel = conv_bias = None
        if stats.hist is not None and conv is not None:
            kernel, conv_bias = conv.weight, conv.bias
        # the count-m probe (analysis only): the x-gradient as if the window statistics were this batch's own
        n_iters = 1 if self._probe_batch_count else stats.n_iters
        return cbn_normalize(x, self.weight, self.bias, stats.mu_bar, stats.var_bar, n_iters, self.eps,
                             self._flag, kernel, conv_bias, stats.hist if kernel is not None else None)

    def _new_iteration(self, kernel: Optional[Tensor]) -> bool:
        """Whether a training call now starts a new iteration: the hook's mark changed (managed), or since the
        previous call a backward ran through the layer or the conv's kernel changed (unmanaged)."""
        if self._managed:
            return self._iter_mark != self._last_mark
        version = kernel._version if kernel is not None else None
        return self._call < 0 or self._flag.seen or (version is not None and version != self._last_version)

    def _kernel_of(self, conv: Optional[ConvSpec]) -> Optional[Tensor]:
        return conv.weight if conv is not None else (self._conv_params[0] if self._conv_params else None)

    def _begin_call(self, conv: Optional[ConvSpec], counted: bool) -> int:
        """The position of this training call within its iteration: 0 when it starts a new iteration, else one
        more than the previous call's. Host integers only.

        ``counted`` (the call uses or fills windows) holds the iteration to the number of calls per iteration seen
        before. Calls that are not counted (k=1, early burn-in) still take positions: their checkpoint replays are
        kept per call.
        """
        kernel = self._kernel_of(conv)
        if self._new_iteration(kernel):
            if self._counted and self._call >= 0:
                self._check_calls(self._call + 1, 'the last')
            self._call, self._counted = 0, counted
            self._replays = []
        else:
            self._call += 1
            if self._counted and self._calls is not None and self._call >= self._calls:
                self._check_calls(self._call + 1, 'this')
        self._flag.seen = False
        self._last_mark = self._iter_mark
        self._last_version = kernel._version if kernel is not None else None
        return self._call

    def next_call_position(self, x: Tensor) -> int:
        """The call position a training forward of ``x`` would take now, without taking it (for hooks that look at
        the window before the call, as CBNStatsErrorHook does)."""
        k = self.window_size
        counted = isinstance(k, int) and k > 1 and (self._use_window or self._collect)
        conv = self._find_conv(x)[0] if counted and x.numel() else None
        return 0 if self._new_iteration(self._kernel_of(conv)) else self._call + 1

    @property
    def call_position(self) -> int:
        """The position of the latest training call within its iteration (-1 before any)."""
        return self._call

    def _check_calls(self, calls: int, which: str) -> None:
        """Learn the number of training calls per iteration from the first windowed iteration; refuse a change."""
        if self._calls is None:
            self._calls = calls
        elif calls != self._calls:
            raise RuntimeError(
                f'{self._describe()} was called {calls} times in {which} training iteration, but {self._calls} '
                'times in each earlier one. Its window is kept per call position (a head shared across FPN levels '
                'is called once per level, in a fixed order), so every iteration must make the same calls; call '
                'reset_window() to start afresh after a deliberate change.')

    def _set_replay(self, position: int, replay: _Replay) -> None:
        if position >= len(self._replays):
            self._replays.extend([None] * (position + 1 - len(self._replays)))
        self._replays[position] = replay

    def _find_replay(self, x: Tensor) -> List[int]:
        """The calls a checkpoint recomputation may repeat: those of this iteration with the input's shape (FPN
        levels differ in size), else every call (the replay's input check then fails)."""
        shape = tuple(x.shape)
        calls = [c for c, r in enumerate(self._replays) if r is not None]
        return [c for c in calls if self._replays[c].shape == shape] or calls

    def _pick_replay(self, mu_t: Tensor, positions: List[int]) -> Tuple[_Replay, Optional[int]]:
        """The replay of the call a recomputation repeats, and its position where the host knows it.

        One candidate: that call. Several calls of one shape (the order of recomputation is the autograd engine's):
        the one whose batch mean this input has, chosen on the device; its statistics are gathered by a device
        index, so the host never reads which. That needs every candidate already pushed and alike in kind;
        otherwise the latest call not yet replayed is taken (the engine's order for independent branches, as
        reentrant checkpointing gives), and the input check catches a wrong pick.
        """
        replays = [self._replays[c] for c in positions]
        fresh = [c for c in positions if not self._replays[c].replayed]
        kinds = {(r.stats.hist is None, 'tensor' if isinstance(r.stats.n_iters, Tensor) else r.stats.n_iters)
                 for r in replays}
        if len(replays) == 1 or not all(r.pushed for r in replays) or len(kinds) > 1:
            # the autograd engine recomputes independent branches latest first (a shared head's levels: P7 first)
            position = (fresh or positions)[-1]
            return self._replays[position], position
        match = torch.stack([torch.isclose(mu_t, r.mu_t, rtol=1e-4, atol=1e-6, equal_nan=True).all() for r in replays])
        index = match.to(mu_t.dtype).argmax().view(1)  # the first match (0 if none: the input check then fails)

        def pick(values):
            return torch.stack(list(values)).index_select(0, index)[0]

        stats = [r.stats for r in replays]
        n_iters = stats[0].n_iters  # an int is the same for all (checked above)
        if isinstance(n_iters, Tensor):
            n_iters = pick(st.n_iters for st in stats)
        hist = None if stats[0].hist is None else HistoryGrad(*(pick(f) for f in zip(*(st.hist for st in stats))))
        picked = _Stats(pick(st.mu_bar for st in stats), pick(st.var_bar for st in stats), n_iters,
                        stats[0].m_total, hist)  # m_total: the running statistics are not updated again
        return _Replay(pick(r.mu_t for r in replays), picked, True, replays[0].shape, True), None

    def _window_stats(self, x, mu_t, s_t, finite, conv, window, position: int = 0) -> _Stats:
        """Eq. 7-11 over the window: what this batch is normalized with, and the exact backward's history terms."""
        m = x.numel() // x.shape[1]
        if window is None or window.count == 0:
            if m == 1:
                raise ValueError(f'Expected more than 1 value per channel when training, got input size '
                                 f'{list(x.shape)} (an empty CBN window behaves as BN)')
            return _Stats(mu_t, s_t, 1, m, None)
        h = window.view()
        if self.compensate and h['g_s'] is None:  # collected as Naive CBN: nothing to compensate with
            self._set_window(position, None)
            return self._window_stats(x, mu_t, s_t, finite, conv, None)
        comp = None
        if self.compensate:
            params = (conv.weight, conv.bias) if conv is not None else self._conv_params
            if params is None:  # a forward without graph, before any forward with one: nothing to compensate to
                self._warn_once('it got an input without graph before it knew its convolution')
                return _Stats(mu_t, s_t, 1, m, None)
            kernel, bias = params
            comp = compensate(h['mu'], h['s'], h['g_mu'], h['g_s'], h['p_mu'], h['p_s'], h['bias'],
                              kernel.detach(), None if bias is None else bias.detach())
            comp_ok = torch.isfinite(comp.mu).all() & torch.isfinite(comp.s).all()
            comp = comp._replace(mu=torch.where(comp_ok, comp.mu, 0), s=torch.where(comp_ok, comp.s, 0),
                                 d_mu=torch.where(comp_ok, comp.d_mu, 0))
            mu_c, s_c = comp.mu, comp.s
        else:
            mu_c, s_c = h['mu'], h['s']
        mu_bar, var_bar = window_moments(torch.cat([mu_t[None], mu_c]), torch.cat([s_t[None], s_c]),
                                         torch.cat([h['w'].new_ones(1), h['w']]))
        # Decided on the device: a non-finite batch averages nothing else in, and a diverged kernel (a non-finite
        # compensation, or averages that overflow) falls back to the batch's own statistics.
        ok = finite & torch.isfinite(mu_bar).all() & torch.isfinite(var_bar).all()
        if comp is not None:
            ok = ok & comp_ok
        weight = h['w'] * ok
        n = 1 + weight.sum()
        mu_bar, var_bar = torch.where(ok, mu_bar, mu_t), torch.where(ok, var_bar, s_t)
        m_total = m + (weight * h['m']).sum()
        hist = None
        if comp is not None and self.backward == 'exact' and any(p is not None and p.requires_grad for p in params):
            hist = history_grad(comp, mu_bar, h['g_mu'], h['g_s'], weight, n)
        return _Stats(mu_bar, var_bar, n, m_total, hist)

    def _update_running_stats(self, stats: _Stats, finite: Tensor) -> None:
        if not self.track_running_stats:
            return
        with torch.no_grad():
            self.num_batches_tracked.add_(finite)  # a non-finite batch is not counted (BN counts every batch)
            if self.momentum is None:  # cumulative average, on the device
                factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
            else:
                factor = self.momentum
            m_total = stats.m_total
            if isinstance(m_total, Tensor):
                unbiased = stats.var_bar * torch.where(m_total > 1, m_total / (m_total - 1), 1)
            else:
                unbiased = stats.var_bar * (m_total / (m_total - 1)) if m_total > 1 else stats.var_bar
            for buf, new in ((self.running_mean, stats.mu_bar), (self.running_var, unbiased)):
                buf.copy_(torch.where(finite, buf * (1 - factor) + new.to(buf.dtype) * factor, buf))

    def _push(self, conv: ConvSpec, x: Tensor, mu_t: Tensor, s_t: Tensor, finite: Tensor, position: int) -> None:
        """Store this iteration in the call position's window, with its statistics' kernel gradients (Appendix B)
        if compensating. A non-finite iteration takes a slot with weight 0 (decided on the device)."""
        capacity = self._active_k() - 1
        with torch.no_grad():
            m = torch.full((), float(x.numel() // x.shape[1]), dtype=mu_t.dtype, device=mu_t.device)
            if not self.compensate:  # Naive CBN needs no gradient
                entry = dict(mu=mu_t, s=s_t, m=m)
                ok = finite
            else:
                grads = conv_stat_grads(conv, x.detach(), mu_t, self.stat_grad_subsample)
                p_mu, p_s = kernel_products(grads.g_mu, grads.g_s, conv.weight.detach())
                # a non-finite entry of g_s (or g_mu) makes p_s (p_mu) non-finite: inf*w, inf*0 and nan*w all are
                ok = finite & torch.isfinite(p_s).all() & torch.isfinite(p_mu).all()
                bias = conv.bias.detach().to(mu_t.dtype) if conv.bias is not None else torch.zeros_like(mu_t)
                entry = dict(mu=mu_t, s=s_t, g_mu=grads.g_mu, g_s=grads.g_s, p_mu=p_mu, p_s=p_s, bias=bias, m=m)
            entry['w'] = ok.to(mu_t.dtype)
            window = self.window_at(position)
            if window is None or not window.accepts(entry, capacity):
                window = _Window(capacity)
                self._set_window(position, window)
            window.push(entry, ok)
        self._conv_params = (conv.weight, conv.bias)

    def _replay_message(self) -> str:
        return (f"{type(self).__name__} '{self.module_path or '?'}': a forward during backward (gradient "
                'checkpointing) saw a different input from the first forward of this iteration; cannot replay its '
                'statistics.')

    def check_replays(self) -> None:
        """Raise if a checkpoint recomputation on a GPU saw a different input from its first forward (counted on the
        device; this reads the count, so call it now and then: CBNBurnInHook does every 100 iterations)."""
        if self._replay_mismatches is not None and int(self._replay_mismatches) > 0:
            raise RuntimeError(f'{self._replay_message()} ({int(self._replay_mismatches)} times)')

    def _replay_forward(self, x: Tensor, mu_t: Tensor, s_t: Tensor, finite: Tensor, positions: List[int]) -> Tensor:
        """A checkpoint recomputation of one of the calls at ``positions``: the same statistics as its first forward,
        and at most one push, into that call's window."""
        replay, position = self._pick_replay(mu_t, positions)
        # checked without reading a bool on the host: on the CPU an asynchronous assert raises at once; on CUDA a
        # device-side assert would poison the context, so a device counter is kept and check_replays() raises
        same = torch.isclose(mu_t, replay.mu_t, rtol=1e-4, atol=1e-6, equal_nan=True).all()
        if mu_t.device.type == 'cpu':
            torch._assert_async(same, self._replay_message())
        else:
            if self._replay_mismatches is None or self._replay_mismatches.device != mu_t.device:
                self._replay_mismatches = torch.zeros((), dtype=torch.int64, device=mu_t.device)
            self._replay_mismatches.add_(~same)
        stats = replay.stats
        conv = None
        if stats.hist is not None or not replay.pushed:
            conv, why = self._find_conv(x)
            if conv is None and not replay.pushed:
                self._warn_once(f'cannot collect its window because {why}')
        y = self._normalize(x, stats, conv)
        if position is not None:
            if not replay.pushed and conv is not None:
                self._push(conv, x, mu_t, s_t, finite, position)
            self._replays[position] = replay._replace(pushed=True, replayed=True)
        return y
