"""CrossIterationBatchNorm2d: the CBN layer as a drop-in ``_BatchNorm``.

The layer holds the options and orchestrates one call. Each kind of state has its own module: the window banks
(:mod:`.window`), iteration boundaries and call positions (:mod:`.calls`), checkpoint replays (:mod:`.replay`), and
finding the convolution (:mod:`.conv_lookup`). The formulas are in :mod:`cbn_mmdet.ops`.
"""
import contextlib
import warnings
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import ConvSpec, batch_moments, cbn_normalize
from ..ops._common import autocast_active
from ..ops.fused import (KernelViews, all_finite, compensate_bank, fill_entry, finish_mean, history_terms,
                         running_update, store_entry, window_sums)
from .calls import CallTracker
from .conv_lookup import find_conv, intercept_of, recomputing
from .inspection import InspectionMixin
from .options import OptionsMixin, check_layer_options, check_window_size, find_module_path
from .replay import CheckpointReplayMixin, Replay, ReplayBook, WindowStats
from .running import batch_update, pack_running, packed_running, running_factor
from .window import WindowBank, WindowStateMixin, Workspace

__all__ = ['CrossIterationBatchNorm2d']

_NULL = contextlib.nullcontext()


@torch.compiler.disable
def _eager_forward(layer: 'CrossIterationBatchNorm2d', x: Tensor) -> Tensor:
    """A training call under ``torch.compile``, run eagerly (dynamo does not trace it)."""
    return layer._forward(x)


# True while dynamo traces (it folds the call): torch.compiler's since torch 2.3, dynamo's own on torch 2.1 and 2.2
# (loaded by the decorator above)
_is_compiling = getattr(torch.compiler, 'is_compiling', None) or torch._dynamo.is_compiling


class _Last:
    """The kernel and bias of the convolution whose iteration was pushed last, its groups, and the kernel's views."""

    def __init__(self):
        self.conv_params: Optional[Tuple[Tensor, Optional[Tensor]]] = None
        self.groups = 1
        self.intercept = False  # its bias was not in its graph (frozen or derived)
        self.kernel_views: Optional[KernelViews] = None


class CrossIterationBatchNorm2d(OptionsMixin, InspectionMixin, CheckpointReplayMixin, WindowStateMixin, _BatchNorm):
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
      fp16/bf16/fp32 input and fp64 for fp64 input. The mean is linear in the kernel, so a stored iteration's mean
      is moved exactly, :math:`\mu_\tau(\theta_t) = \langle P_\tau, W_t\rangle + b_t`, in the statistics
      dtype; a conv that rounds its kernel (autocast, TF32) is off from that by its own rounding,
      :math:`|\langle P, W - \mathrm{round}(W)\rangle| \le u \langle |P|, |W|\rangle` (:math:`u = 2^{-8}` bf16,
      :math:`2^{-11}` fp16 and TF32). A bias outside the graph (frozen or derived) has no readable value: the
      window then keeps the mean's intercept per stored iteration.
    * **Second order** (``second_order = r > 0``): Eq. 8 moves :math:`\nu` to first order and misses
      :math:`\Delta\theta^\top M_2 \Delta\theta` (:math:`M_2` the input patches' second moment). Under the exact
      backward the kernel can turn fast, as BN's does, and then that term is most of the variance's error (issue
      20: 0.08 rad across a window at 2 images and lr 0.1 on digits; ``docs/studies/compensation.md``). With
      ``r > 0`` the centred moment is moved instead, with its second-order term from ``r`` input patches that
      each slot keeps (at fixed low-discrepancy output positions):
      :math:`s_\tau(\theta_t) = s_\tau + \langle \partial s/\partial\theta, \Delta\theta\rangle +
      \frac{1}{r}\sum_i (\Delta\theta \cdot (x_i - P_\tau))^2`, exact for a convolution when the ``r`` patches
      are all of the iteration's. It costs ``r (C_in/g k_h k_w + C/g)`` numbers per slot and group, and a few
      small products per iteration.
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
      iteration at the recomputation. Non-reentrant checkpointing keeps no activation, so reading the conv's
      input recomputes the segment up to it, during the forward; a layer earlier in the segment that this runs
      again replays too (it is not a call).
    * **Non-finite statistics**: one reduction over everything a windowed forward computes (the batch's moments,
      its kernel gradients, the window's sums) decides, on the device, whether it is all finite. If not, the
      batch is normalized with its own statistics (as BN would; a diverged kernel or window thus falls back to
      BN), the iteration takes a window slot with weight 0, stored as zeros, and the running statistics are not
      updated. All of it is ``torch.where``: a training iteration never waits on the host. Calls without a window
      (burn-in, ``k=1``) normalize as ``nn.BatchNorm2d``, and their running statistics skip a non-finite batch too.
    * **Switching** ``compensate`` off on a layer whose window was collected with compensation (or the reverse)
      restarts the window; meanwhile the layer normalizes as BN.
    * **Speed**: the window is a static bank of stacked tensors per call position (:mod:`cbn_mmdet.ops.fused`), so a
      windowed forward and backward is 40 aten ops more than BN's whatever ``k`` (``tools/benchmark.py --cases
      launch``): on a GPU, where a layer's time is set by its kernel launches, that is what the cost is.
    * **Dtype casts**: ``model.half()`` or ``.to(torch.bfloat16)`` moves the windows with the module but keeps
      their fp32 (fp64) statistics bit for bit; the running statistics follow the cast, as BN's do.

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
            is what it is: docs/studies/classification.md. Default: ``'exact'``.
        second_order (int): ``r``, the input patches each window slot keeps for the second-order term of the
            centred moment's compensation; ``0`` is the paper's Eq. 8 (first order in :math:`\nu`). Switching it
            restarts the window. Default: 0: ``16`` corrects the variance where kernels turn fast, but it did not
            win the accuracy rule on MNIST-5k and the toy detector, where they turn 10-40 times less
            (``docs/studies/compensation.md``).

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
                 second_order: int = 0,
                 device=None,
                 dtype=None):
        check_layer_options(num_features, eps, momentum, compensate, stat_grad_subsample, backward, second_order)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._window_size = check_window_size(window_size)
        self.compensate = compensate
        self._stat_grad_subsample = stat_grad_subsample
        self._backward = backward
        self._second_order = second_order
        # One bank per call position within an iteration (a head shared across FPN levels is called once per
        # level, in a fixed order): the c-th training call of an iteration uses and fills self._banks[c].
        self._banks: List[Optional[WindowBank]] = []
        self._workspace: Optional[Workspace] = None
        self._calls = CallTracker()
        self._replays = ReplayBook()
        self._last = _Last()  # what the latest push saw (a plain object: nn.Module's __setattr__ costs host time)
        self._warned = False
        self._replay_mismatches: Optional[Tensor] = None  # CUDA: checkpoint replays that saw another input
        self.module_path: Optional[str] = None  # set by CBNBurnInHook; looked up on error otherwise
        pack_running(self)  # running_mean and running_var: the two rows of one tensor, for a one-op EMA step

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
        self._calls.begin_iteration(mark, use_window, collect)

    def reset_window(self) -> None:
        """Forget the stored iterations of every call position and the number of calls per iteration; the next
        training call starts a new iteration."""
        self._banks = []
        self._replays.clear()
        self._calls.reset()

    def _set_bank(self, position: int, bank: Optional[WindowBank]) -> None:
        if position >= len(self._banks):
            self._banks.extend([None] * (position + 1 - len(self._banks)))
        self._banks[position] = bank

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        pack_running(self)  # a move or cast replaced the buffers
        for bank in self._banks:
            if bank is not None:
                bank.apply(fn)  # follows the device; keeps the statistics dtype bit for bit
        if self._workspace is not None:
            self._workspace.apply(fn)
        self._replays.clear()
        self._replay_mismatches = None
        self._last.kernel_views = None
        return self

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), '__getstate__') else self.__dict__
        state = dict(state)
        state['_last'] = _Last()  # references into another module; found again at the next forward
        state['_replays'] = ReplayBook()
        state.pop('_running_packed', None)  # plain pickle would store it apart from the buffers: packed again
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self._workspace is not None and self._workspace.views is None:  # scratch of another layout
            self._workspace = None
        pack_running(self)

    # ------------------------------------------------------------------ helpers
    def _describe(self) -> str:
        return f"{type(self).__name__} '{self.module_path or find_module_path(self)}'"

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

    def _counted(self) -> bool:
        """Whether this iteration's training calls use or fill windows."""
        k = self.window_size
        return isinstance(k, int) and k > 1 and (self._calls.use_window or self._calls.collect)

    def _kernel_of(self, conv: Optional[ConvSpec]) -> Optional[Tensor]:
        return conv.weight if conv is not None else (self._last.conv_params[0] if self._last.conv_params else None)

    def _workspace_for(self, conv_shape, groups: int, dtype: torch.dtype, device, intercept: bool = False) -> Workspace:
        capacity = self._active_k() - 1
        args = (self.num_features, conv_shape, groups, capacity, dtype, device, self.second_order, intercept)
        if self._workspace is None or self._workspace.key != Workspace.key_of(*args):
            self._workspace = Workspace(*args)
        return self._workspace

    def _bank_for(self, position: int, conv: ConvSpec, dtype: torch.dtype, device) -> WindowBank:
        """The bank of a call position, made afresh when this iteration does not fit it (another conv shape)."""
        capacity = self._active_k() - 1
        shape = tuple(conv.weight.shape) if self.compensate else None
        groups = conv.groups if self.compensate else 1
        intercept = self.compensate and intercept_of(conv)
        bank = self.window_at(position)
        if bank is None or not bank.matches(capacity, self.num_features, dtype, device, shape, groups,
                                            self.second_order, intercept):
            bank = WindowBank(capacity, self.num_features, dtype, device, shape, groups, self.second_order, intercept)
            self._set_bank(position, bank)
        return bank

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if _is_compiling() and self.training:
            # torch.compile: a training call runs eagerly, outside the graph (graph break). Its window state is
            # Python state that changes every iteration; traced, it would be baked into the graph as constants.
            return _eager_forward(self, x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return self._empty_forward(x)
        if not self.training:
            return super().forward(x)  # exactly nn.BatchNorm2d in eval
        self._active_k()  # refuses an unresolved 'auto'
        if recomputing() and self._replays:  # a checkpoint's recomputation of a call of this iteration
            positions = self._replays.candidates(x)
            if positions:
                return self._replay_forward(x, positions)
        counted = self._counted()
        windowed = counted
        conv, why = find_conv(x) if windowed else (None, '')
        if windowed and conv is None and torch.is_grad_enabled():
            self._warn_once(f'cannot use its window because {why}')
            windowed = False
        position = self._calls.begin_call(self._kernel_of(conv), counted, self._describe, self._replays.clear)
        use_window = windowed and self._calls.use_window
        collect = windowed and self._calls.collect
        if not (use_window or collect):  # burn-in, k=1, or no convolution: BatchNorm itself
            y = self._bn_forward(x)
            self._replays.set(position, Replay(None, None, True, tuple(x.shape)))
        else:
            y, stats, mu_t, pushed = self._window_forward(x, conv, position, use_window, collect)
            self._replays.set(position, Replay(mu_t, stats, pushed or not collect, tuple(x.shape)))
        if not self._calls.managed and y.requires_grad:
            y.register_hook(self._calls.saw_backward)
        return y

    def _window_forward(self, x: Tensor, conv: Optional[ConvSpec], position: int, use_window: bool,
                        collect: bool) -> Tuple[Tensor, Optional[WindowStats], Tensor, bool]:
        """A training call that uses or fills its window: the fused path of :mod:`cbn_mmdet.ops.fused`.

        Returns the output, what it normalized with (None: BatchNorm's own statistics), the batch mean and whether
        the iteration was pushed."""
        device_type = x.device.type
        # the statistics' products stay in the statistics dtype (fp32/fp64) inside a mixed-precision forward
        precise = torch.autocast(device_type, enabled=False) if autocast_active(device_type) else _NULL
        with torch.no_grad(), precise:
            mu_t, s_t = batch_moments(x.detach())
            dtype, device = mu_t.dtype, mu_t.device
            params = (conv.weight, conv.bias) if conv is not None else self._last.conv_params
            groups = conv.groups if conv is not None else self._last.groups
            intercept = intercept_of(conv) if conv is not None else self._last.intercept
            push = collect and conv is not None
            compensating = self.compensate and params is not None
            if use_window and self.compensate and params is None:
                # a forward without graph, before any forward with one: nothing to compensate to
                self._warn_once('it got an input without graph before it knew its convolution')
            if not compensating:
                groups = 1
            shape = tuple(params[0].shape) if compensating else None
            bank = self.window_at(position) if use_window and (compensating or not self.compensate) else None
            intercept = intercept and compensating
            if bank is not None:
                fit = dict(capacity=self._active_k() - 1, channels=self.num_features, device=device,
                           kernel_shape=shape, groups=groups, patches=self.second_order, intercept=intercept)
                if bank.dtype != dtype and bank.matches(dtype=bank.dtype, **fit):
                    bank.cast(dtype)  # the statistics dtype changed (model.double() mid-run): the window follows
                if not bank.matches(dtype=dtype, **fit):
                    if self.compensate and not bank.compensating:  # collected as Naive CBN: nothing to compensate
                        self._set_bank(position, None)
                    bank = None
            ws = self._workspace_for(shape, groups, dtype, device, intercept)
            ws.set_count(x.numel() // x.shape[1])
            sv = ws.views
            kv = self._kernel_views(params[0], dtype, groups) if compensating else None
            with_gp = push and compensating
            fill_entry(sv, kv if with_gp else None, conv, x, mu_t, s_t, ws.consts, self.stat_grad_subsample)
            if bank is not None:
                stats = self._window_statistics(ws, bank, kv, params, mu_t, with_gp)
                ok = stats.ok
            else:  # burn-in's collecting iterations, or a window not started yet: BatchNorm (stats None)
                stats = None
                ok = all_finite(*sv.fresh[with_gp, False]) if push else None
        y = self.normalize(x, stats, conv) if bank is not None else self._bn_forward(x, moments=(mu_t, s_t))
        if push:
            with torch.no_grad(), precise:
                self._store(conv, position, ws, ok, dtype, device, bank)
        return y, stats, mu_t, push

    def _store(self, conv: ConvSpec, position: int, ws: Workspace, ok: Tensor, dtype: torch.dtype, device,
               bank: Optional[WindowBank] = None) -> None:
        """Write the scratch's entry into the call position's bank (zeros with weight 0 where ``ok`` is False).
        ``bank``: that bank, when the forward has matched it to this call already."""
        if bank is None:
            bank = self._bank_for(position, conv, dtype, device)
        store_entry(bank.views, bank.next, ws.views, ok, ws.zero)
        bank.advance()
        self._last.conv_params = (conv.weight, conv.bias)
        self._last.groups = conv.groups
        self._last.intercept = intercept_of(conv)

    def _kernel_views(self, kernel: Tensor, dtype: torch.dtype, groups: int) -> KernelViews:
        kv = self._last.kernel_views
        if kv is None or not kv.valid_for(kernel, dtype):
            kv = self._last.kernel_views = KernelViews(kernel, dtype, groups)
        return kv

    def _window_statistics(self, ws: Workspace, bank: WindowBank, kv: Optional[KernelViews], params, mu_t: Tensor,
                           with_gp: bool) -> WindowStats:
        """Eq. 7-11 over the bank, the running statistics' update, and the exact backward's history terms."""
        kernel, conv_bias = params if bank.compensating else (None, None)
        exact = bank.compensating and self.backward == 'exact' and (
            kernel.requires_grad or (conv_bias is not None and conv_bias.requires_grad))
        sv, bv = ws.views, bank.views
        delta = compensate_bank(bv, kv if bank.compensating else None, conv_bias, mu_t, sv.inside if exact else None,
                                sv.intercept)
        window_sums(bv, sv)
        # one decision for everything this forward computed (its entry, kernel gradients and sums included)
        ok = all_finite(*sv.fresh[with_gp, True])
        hist = history_terms(bv, sv, delta, conv_bias is not None) if exact else None
        finish_mean(sv, mu_t)
        chosen = torch.where(ok, sv.sums, sv.fallback)  # (mu, var, n, M - 1), or the batch's own
        if self.track_running_stats:
            running_update(self.running_mean, self.running_var, sv, ok, running_factor(self, ok, mu_t.dtype),
                           single=ws.count < 2, packed=packed_running(self))
        return WindowStats(chosen[0], chosen[1], chosen[2, 0], hist, ok)

    def _bn_forward(self, x: Tensor, replay: bool = False, moments: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """``nn.BatchNorm2d``'s training forward, whose running statistics skip a non-finite batch (decided on the
        device) and whose ``momentum=None`` factor is computed on the device (BN reads it on the host).
        ``replay``: a checkpoint recomputation, which normalizes the same way and updates nothing. ``moments``: the
        batch's ``(mu, s)`` where the caller has them already."""
        y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.track_running_stats and not replay:
            with torch.no_grad():
                mu, s = batch_moments(x.detach()) if moments is None else moments
                batch_update(self, mu, s, x.numel() // x.shape[1])
        return y

    def normalize(self, x: Tensor, stats: WindowStats, conv: Optional[ConvSpec]) -> Tensor:
        """Normalize ``x`` with ``stats`` (Eq. 12, 4); the exact backward reaches ``conv``'s kernel. An extension
        point for analysis subclasses (tools/analysis/classification_study.py's count probe)."""
        kernel = conv_bias = None
        if stats.hist is not None and conv is not None:
            kernel, conv_bias = conv.weight, conv.bias
        ws = self._workspace
        return cbn_normalize(x, self.weight, self.bias, stats.mu_bar, stats.var_bar, stats.n_iters, self.eps,
                             kernel, conv_bias, stats.hist if kernel is not None else None, stats.ok,
                             ws.zero if ws is not None else None)

    def _empty_forward(self, x: Tensor) -> Tensor:
        """An empty RoI batch: keep a graph to gamma and beta (DDP needs every parameter used); no statistics. In
        training it is a call like any other: it takes its call position (its window gets nothing), and a backward
        through it tells an unmanaged layer that the iteration ended."""
        y = x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1) if self.affine else x.clone()
        if self.training and not recomputing():
            self._calls.begin_call(self._kernel_of(None), self._counted(), self._describe, self._replays.clear)
            if y.requires_grad and not self._calls.managed:
                y.register_hook(self._calls.saw_backward)
        return y
