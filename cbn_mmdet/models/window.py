"""The window: a static bank of stacked tensors per call position, its scratch, and its checkpoint state.

The layout and the mathematics over it are in :mod:`cbn_mmdet.ops.fused`. A bank never changes shape once made:
an empty or skipped slot is a zero row of weight 0, so a partly filled window is computed exactly like a full one.
"""
import math
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from ..ops.fused import FIELDS, MU, ONE, A, M, R, S, BankViews, ScratchViews

__all__ = ['WindowBank', 'Workspace', 'WindowStateMixin', 'newest_entries', 'STATE_KEYS']

# the keys of a window state (one call position), as checkpoints have always held them; 'a_mu' and 'a_s' (the
# intercepts the bank keeps) were added with the bank and make a round trip exact; 'q' (T, g, r, D + C/g), the
# second-order term's patches and outputs, with ``second_order``
STATE_KEYS = ('mu', 's', 'g_mu', 'g_s', 'p_mu', 'p_s', 'bias', 'm', 'w', 'a_mu', 'a_s', 'q')


def _move(t: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(t)`` for a device move; a dtype cast (``.half()``, ``.to(torch.bfloat16)``) is not applied: the tensor
    follows the device only, bit for bit."""
    moved = fn(t)
    return moved if moved.dtype == t.dtype else t.to(moved.device)


class _HoldsViews:
    """Holds ``views`` of its own tensors. Plain pickle stores each view's storage apart, so the views are not
    pickled but rebuilt."""

    def __getstate__(self):
        state = dict(self.__dict__)
        del state['views']
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.views = self._views()


class Workspace(_HoldsViews):
    """One layer's scratch for a training forward: ``work = [gp entry (C + g, D) | q entry (g, r, D + C/g) |
    entry (F, C) | sums (4, C)]`` (the q entry with ``patches = r > 0`` only),
    the exact backward's coefficient buffer ``hbuf`` (T, 2C + 1), and a 0-dim zero. Shared by the layer's call
    positions, which run one after another; nothing in it is saved for the backward."""

    def __init__(self, channels: int, kernel_shape: Optional[Sequence[int]], groups: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, patches: int = 0, intercept: bool = False):
        patches = patches if kernel_shape is not None else 0
        self.intercept = intercept and kernel_shape is not None
        self.key = self.key_of(channels, kernel_shape, groups, capacity, dtype, device, patches, intercept)
        c = channels
        d = 0 if kernel_shape is None else math.prod(kernel_shape[1:])
        rows = c + groups if kernel_shape is not None else 0
        qsize = groups * patches * (d + c // groups)
        self.work = torch.zeros(rows * d + qsize + FIELDS * c + 4 * c, dtype=dtype, device=device)
        self.hbuf = torch.zeros(capacity, 2 * c + 1, dtype=dtype, device=device)
        self.hbuf[:, 2 * c] = 1
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.zeros = torch.zeros_like(self.work)  # all_finite's other operand
        self._shape = (c, groups, d, patches)
        self.views = self._views()
        # the entry's constant rows, written with its statistics by fill_entry's one op: [1, m, m - 1, 0]
        self.consts = torch.zeros(4, c, dtype=dtype, device=device)
        self.consts[0] = 1
        self._m: Optional[int] = None

    @staticmethod
    def key_of(channels: int, kernel_shape: Optional[Sequence[int]], groups: int, capacity: int, dtype: torch.dtype,
               device, patches: int = 0, intercept: bool = False) -> tuple:
        """What a workspace is made for: a layer makes a new one when its call needs another."""
        has_kernel = kernel_shape is not None
        return (channels, tuple(kernel_shape) if has_kernel else None, groups, capacity, dtype, torch.device(device),
                patches if has_kernel else 0, intercept and has_kernel)

    def _views(self) -> ScratchViews:
        return ScratchViews(self.work, self.hbuf, *self._shape, zeros=self.zeros, intercept=self.intercept)

    def __setstate__(self, state):
        self.__dict__.update(state)
        # scratch pickled with another layout (before the finiteness product's zeros and the entry's constant rows)
        # has no views: the layer drops it and makes a new one at its next forward
        self.views = self._views() if {'zeros', 'consts', 'intercept'} <= set(state) else None

    def set_count(self, m: int) -> None:
        """The entry's count row (values per channel of the current input); written only when it changes."""
        if m != self._m:
            self.consts[1] = m
            self.consts[2] = m - 1
            self._m = m

    @property
    def count(self) -> int:
        """Values per channel of the current input (0 before any)."""
        return self._m or 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.work, self.hbuf, self.zeros, self.consts))

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.work, self.hbuf, self.zero, self.zeros, self.consts = (
            _move(t, fn) for t in (self.work, self.hbuf, self.zero, self.zeros, self.consts))
        self.key = self.key[:5] + (self.work.device, ) + self.key[6:]  # the device follows the move
        self.views = self._views()


class WindowBank(_HoldsViews):
    """The last ``capacity`` iterations of one call position, as a ring of static slots.

    ``stats`` (T, F, C) and, when compensating, ``gp`` (C + g, T, D) and with ``patches = r > 0`` (the second-order
    term) ``qs`` (g, T, r, D + C/g): see :mod:`cbn_mmdet.ops.fused`. ``count`` and
    ``next`` are host integers: how many slots hold an iteration, and which slot the next push writes. No copy of the
    kernel is kept.
    """

    def __init__(self, capacity: int, channels: int, dtype: torch.dtype, device,
                 kernel_shape: Optional[Sequence[int]] = None, groups: int = 1, patches: int = 0,
                 intercept: Optional[bool] = False):
        self.capacity = capacity
        # the conv's bias is not in its graph, so the slots keep the mean's intercept A; None (a bank loaded from a
        # window state, which does not say) takes the flag of the first call that uses it
        self.intercept = intercept
        self.channels = channels
        self.kernel_shape = None if kernel_shape is None else tuple(kernel_shape)
        self.groups = groups
        self.qs = None
        self.patches = patches if self.kernel_shape is not None else 0
        d = math.prod(self.kernel_shape[1:]) if self.kernel_shape is not None else 0
        # slot by slot [gp (C + g, D) | stats (F, C)]: a push writes one contiguous row
        self.flat = torch.zeros(capacity, (channels + groups) * d + FIELDS * channels, dtype=dtype, device=device)
        if self.patches:
            self.qs = torch.zeros(groups, capacity, self.patches, d + channels // groups, dtype=dtype, device=device)
        self.views = self._views()
        self.count = 0
        self.next = 0

    def _views(self) -> BankViews:
        if 'flat' not in self.__dict__:  # pickled before the flat layout: stats (8 fields) and gp apart
            self._from_separate(self.__dict__.get('gp'), self.stats)
        t, c = self.capacity, self.channels
        self.stats = self.flat[:, self.flat.shape[1] - FIELDS * c:].view(t, FIELDS, c)
        self.gp = None
        if self.kernel_shape is not None:
            d = math.prod(self.kernel_shape[1:])
            self.gp = self.flat[:, :(c + self.groups) * d].view(t, c + self.groups, d).transpose(0, 1)
        return BankViews(self.stats, self.gp, self.groups, self.qs, self.flat)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop('stats', None)  # views of flat, made again
        state.pop('gp', None)
        return state

    def _from_separate(self, gp: Optional[Tensor], stats: Tensor) -> None:
        """``flat`` from a bank pickled before the flat layout, whose ``stats`` had the 8 fields
        ``A, R, S, MU, E, Q, ONE, M``; ``E`` and ``Q`` are scratch, rewritten at the next forward."""
        t, _, c = stats.shape
        new = stats.new_zeros(t, FIELDS, c)
        for field, old in ((A, 0), (R, 1), (S, 2), (MU, 3), (ONE, 6), (M, 7)):
            new[:, field] = stats[:, old]
        rows = [] if gp is None else [gp.transpose(0, 1).reshape(t, -1)]
        self.flat = torch.cat(rows + [new.reshape(t, -1)], 1)
        self.__dict__.setdefault('intercept', None)

    @property
    def compensating(self) -> bool:
        return self.gp is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.stats.dtype

    @property
    def device(self) -> torch.device:
        return self.stats.device

    def matches(self, capacity: int, channels: int, dtype: torch.dtype, device,
                kernel_shape: Optional[Sequence[int]], groups: int, patches: int = 0,
                intercept: bool = False) -> bool:
        """Whether an iteration of this shape fits (otherwise the window starts afresh). A bank loaded from a
        window state takes ``intercept`` from the first call it fits."""
        fits = (self.capacity == capacity and self.channels == channels and self.dtype == dtype
                and self.device == torch.device(device) and self.kernel_shape == (
                    None if kernel_shape is None else tuple(kernel_shape)) and self.groups == groups
                and self.patches == (patches if kernel_shape is not None else 0)
                and self.intercept in (None, intercept and kernel_shape is not None))
        if fits and self.intercept is None:
            self.intercept = intercept and kernel_shape is not None
        return fits

    def advance(self) -> None:
        self.next = (self.next + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.flat, self.qs) if t is not None)

    def cast(self, dtype: torch.dtype) -> None:
        """Hold the stored iterations in ``dtype`` (the layer's statistics dtype changed: ``model.double()``)."""
        self.flat = self.flat.to(dtype)
        if self.qs is not None:
            self.qs = self.qs.to(dtype)
        self.views = self._views()

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Follow a device move; the statistics keep their dtype bit for bit under a module dtype cast."""
        self.flat = _move(self.flat, fn)
        if self.qs is not None:
            self.qs = _move(self.qs, fn)
        self.views = self._views()

    # ------------------------------------------------------------------ the stored iterations, as named tensors
    def tensors(self, rows: Optional[int] = None) -> Dict[str, Tensor]:
        """The first ``rows`` slots (default: all) in the window-state format: ``mu``, ``s`` (T, C), ``m``, ``w``
        (T,), and when compensating ``g_mu`` (T, g, C_in/g, kh, kw), ``g_s`` (T, C, C_in/g, kh, kw), ``p_mu``,
        ``p_s``, ``bias`` (T, C; the bias is folded into ``p_mu``, which compensates the same) and the intercepts
        ``a_mu``, ``a_s``. New tensors (copies), in slot order."""
        rows = self.capacity if rows is None else rows
        st = self.stats[:rows]
        out = dict(mu=st[:, MU].clone(), s=st[:, S].clone(), m=st[:, M, 0].clone(), w=st[:, ONE, 0].clone())
        if self.gp is not None:
            c, g = self.channels, self.groups
            k = self.kernel_shape
            gp = self.gp[:, :rows].transpose(0, 1)  # (T, C + g, D)
            # the mean's intercept A is 0 but for a conv whose bias is not in its graph (mu_tau(theta) = <P, W> + b
            # exactly): p_mu = mu - A is <P, W_tau> + b_tau
            out.update(g_mu=gp[:, c:].reshape(rows, g, *k[1:]), g_s=gp[:, :c].reshape(rows, *k),
                       p_mu=st[:, MU] - st[:, A], p_s=st[:, S] - st[:, R], bias=torch.zeros_like(st[:, MU]),
                       a_mu=st[:, A].clone(), a_s=st[:, R].clone())
            if self.qs is not None:
                out['q'] = self.qs[:, :rows].transpose(0, 1).clone()  # (T, g, r, D + C/g)
        return out

    def view(self) -> Dict[str, Tensor]:
        """The stored iterations (order does not matter: Eq. 9-10 are sums), as :meth:`tensors` names them."""
        return self.tensors(self.count)

    def state(self) -> dict:
        """The checkpoint state of this call position: CPU tensors of every slot, ``count`` and ``next``."""
        return dict(count=self.count, next=self.next, tensors={k: v.cpu() for k, v in self.tensors().items()})

    @classmethod
    def from_state(cls, state: dict, capacity: int, channels: int, device, describe: str,
                   patches: int = 0) -> Optional['WindowBank']:
        """A bank holding a :meth:`state` (or a window state written before the bank existed). None when empty.

        ``patches``: the layer's ``second_order``. A state without the second-order patches (written with
        ``second_order=0``, or before it existed) or with another ``r`` restores zero patches: those slots are moved
        by the first-order term of the centred moment alone until the window has turned over."""
        if not state['count']:
            return None
        t = state['tensors']
        if t['mu'].shape != (capacity, channels):
            raise ValueError(f"{describe}: window state holds {tuple(t['mu'].shape)} statistics, expected "
                             f'({capacity}, {channels})')
        dtype = t['mu'].dtype
        kernel_shape = groups = None
        if t.get('g_s') is not None:
            kernel_shape, groups = tuple(t['g_s'].shape[1:]), t['g_mu'].shape[1]
        bank = cls(capacity, channels, dtype, device, kernel_shape, groups or 1, patches, intercept=None)
        st = bank.stats
        st[:, MU] = t['mu']
        st[:, S] = t['s']
        st[:, M] = t['m'].to(dtype)[:, None]
        # written before skipped iterations had weights: every stored slot counted
        w = t['w'] if t.get('w') is not None else (torch.arange(capacity) < int(state['count'])).to(dtype)
        st[:, ONE] = w.to(dtype)[:, None]
        if kernel_shape is not None:
            # the intercepts, stored since the bank existed ('a_mu', 'a_s'), else from the recorded products; A is
            # read only for a conv whose bias is not in its graph (for the others it is 0 up to rounding: Euler)
            if t.get('a_mu') is not None:
                st[:, A], st[:, R] = t['a_mu'], t['a_s']
            else:
                bias = t['bias'] if t.get('bias') is not None else 0
                st[:, A] = t['mu'] - t['p_mu'] - bias
                st[:, R] = t['s'] - t['p_s']
            c = channels
            bank.gp[:c] = t['g_s'].reshape(capacity, c, -1).transpose(0, 1).to(device)
            bank.gp[c:] = t['g_mu'].reshape(capacity, groups, -1).transpose(0, 1).to(device)
            q = t.get('q')
            if bank.qs is not None and q is not None and tuple(q.shape) == (capacity, groups, patches,
                                                                            bank.qs.shape[3]):
                bank.qs.copy_(q.transpose(0, 1))
            # a slot of weight 0 holds zero gradients and patches, as a skipped push stores it: the exact
            # backward's history sums rely on it (history_terms); once, at load, so a mask costs nothing per iteration
            dead = (st[:, ONE, 0] == 0).to(device)
            bank.gp[:, dead] = 0
            if bank.qs is not None:
                bank.qs[:, dead] = 0
        bank.count, bank.next = int(state['count']), int(state['next'])
        return bank


class WindowStateMixin:
    """The CBN layer's window state for checkpoints (its ``state_dict`` stays BN's)."""

    def get_window_state(self) -> dict:
        """The window history as a dict of CPU tensors, for checkpoints (the state_dict stays BN's).

        ``count``, ``next`` and ``tensors`` hold the first call position's window, as a layer called once per
        iteration has always written them. A layer called several times per iteration (a head shared across FPN
        levels) adds ``calls`` (its calls per iteration) and ``later_calls``, the same three fields for each later
        position, in call order.
        """

        def position(bank):
            return dict(count=0, next=0, tensors={}) if bank is None or not bank.count else bank.state()

        state = dict(window_size=self.window_size, **position(self.window_at(0)))
        if len(self._banks) > 1 or (self._calls.calls or 1) > 1:
            state.update(calls=self._calls.calls, later_calls=[position(b) for b in self._banks[1:]])
        return state

    def set_window_state(self, state: dict) -> Optional[str]:
        """Restore what :meth:`get_window_state` returned. A state without ``later_calls`` (written by a layer
        called once per iteration, or before per-call windows existed) restores the first call position.

        The configured window size wins: a state written with another ``k`` keeps the newest ``min(k - 1, stored)``
        iterations of each position. Returns a note saying so (None when the sizes agree); a layer whose size is
        still ``'auto'`` takes the state's.
        """
        if not isinstance(state, dict) or not {'window_size', 'count', 'next', 'tensors'} <= set(state):
            raise ValueError(f'{self._describe()}: not a CBN window state: {type(state).__name__}')
        stored = state['window_size']
        if self.window_size == 'auto':
            self.window_size = stored
        k = self.window_size
        self._banks = []
        self._replays.clear()
        self._calls.calls = state.get('calls')
        self._calls.restart()  # the next call starts an iteration
        note = None
        if stored != k:
            kept = min(k - 1, max([state['count']] + [s['count'] for s in state.get('later_calls') or ()]))
            note = (f'{self._describe()}: the checkpoint holds windows of k={stored}, the layer is configured with '
                    f'k={k}: kept the newest {max(kept, 0)} iteration(s) of each call position')
        if k == 'auto' or k < 2:
            return note
        device = self.running_mean.device if self.running_mean is not None else (
            self.weight.device if self.weight is not None else torch.device('cpu'))
        for position, sub in enumerate([state] + list(state.get('later_calls') or ())):
            if stored != k and isinstance(stored, int) and stored > 1:
                sub = newest_entries(sub, stored - 1, k - 1)
            bank = WindowBank.from_state(sub, k - 1, self.num_features, device, self._describe(), self.second_order)
            self._set_bank(position, bank)
        while self._banks and self._banks[-1] is None:
            self._banks.pop()
        return note


def newest_entries(state: dict, old_capacity: int, new_capacity: int) -> dict:
    """A window state of one call position cut (or padded) to ``new_capacity`` slots, keeping its newest
    ``min(new_capacity, count)`` iterations in ring order (the oldest of them in slot 0)."""
    count, nxt = int(state['count']), int(state['next'])
    if not count:
        return dict(count=0, next=0, tensors={})
    order = list(range(count)) if count < old_capacity else [(nxt + i) % old_capacity for i in range(old_capacity)]
    kept = order[max(0, len(order) - new_capacity):]
    index = torch.tensor(kept, dtype=torch.long)
    tensors = {}
    for key, value in state['tensors'].items():
        if value is None:
            continue
        rows = value.index_select(0, index)
        pad = value.new_zeros((new_capacity - len(kept), ) + tuple(value.shape[1:]))
        tensors[key] = torch.cat([rows, pad])
    return dict(count=len(kept), next=len(kept) % new_capacity, tensors=tensors)
