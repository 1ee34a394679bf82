"""What a training call normalized with, kept for its gradient-checkpointing recomputation during backward.

mmdet's ``with_cp=True`` recomputes a block's forward during backward. The recomputation must normalize with the
same statistics as the first forward (otherwise the gradient is of another function) and push the iteration at
most once. The replay of a call is found by its input's shape (FPN levels differ in size), or among calls of one
shape by its batch mean, chosen on the device.
"""
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops import ConvSpec, HistoryGrad, batch_moments
from ..ops.fused import all_finite, fill_entry
from .conv_lookup import find_conv, intercept_of

__all__ = ['WindowStats', 'Replay', 'ReplayBook', 'CheckpointReplayMixin']


class WindowStats(NamedTuple):
    """What one training forward normalized with."""
    mu_bar: Tensor
    var_bar: Tensor
    n_iters: Union[int, Tensor]  # iterations averaged, the current one included (a tensor when weights apply)
    hist: Optional[HistoryGrad]  # the exact backward's history terms, or None
    ok: Optional[Tensor] = None  # 0-dim bool: False where the window fell back to the batch (with hist)


class Replay(NamedTuple):
    """One training call's statistics, for its checkpoint recomputation during backward."""
    mu_t: Optional[Tensor]  # the batch mean (None for a BatchNorm call that computed none)
    stats: Optional[WindowStats]  # None: the call normalized as BatchNorm, with its batch's own statistics
    pushed: bool
    shape: Tuple[int, ...] = ()  # the input's shape: finds the call again (FPN levels differ in size)
    replayed: bool = False


# how close a recomputed batch mean must be to the first forward's. The recomputation runs the same ops on the same
# input, so on a deterministic backend the means are bit-identical; 1e-4 relative admits nondeterministic reduction
# orders (atomics on a GPU: a few ulp of fp32, ~1e-7 relative, of sums of a few thousand terms) and rejects a
# different input, whose means differ at O(1/sqrt(m)) of the std
RTOL, ATOL = 1e-4, 1e-6


def same_batch(a: Tensor, b: Tensor) -> Tensor:
    """0-dim bool on the device: the two batch means agree within the recomputation's rounding."""
    return torch.isclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True).all()


class ReplayBook:
    """The replays of the current iteration, one per call position."""

    def __init__(self):
        self.replays: List[Optional[Replay]] = []

    def clear(self) -> None:
        self.replays = []

    def __bool__(self) -> bool:
        return bool(self.replays)

    def get(self, position: int) -> Optional[Replay]:
        return self.replays[position] if 0 <= position < len(self.replays) else None

    def set(self, position: int, replay: Replay) -> None:
        if position >= len(self.replays):
            self.replays.extend([None] * (position + 1 - len(self.replays)))
        self.replays[position] = replay

    def candidates(self, x: Tensor) -> List[int]:
        """The calls a recomputation of ``x`` may repeat: those of this iteration with its shape, else every call
        (the replay's input check then fails)."""
        shape = tuple(x.shape)
        calls = [c for c, r in enumerate(self.replays) if r is not None]
        return [c for c in calls if self.replays[c].shape == shape] or calls

    def pick(self, mu_t: Tensor, positions: List[int]) -> Tuple[Replay, Optional[int]]:
        """The replay of the call a recomputation repeats, and its position where the host knows it.

        One candidate: that call. Several calls of one shape (the order of recomputation is the autograd engine's):
        the one whose batch mean this input has, chosen on the device; its statistics are gathered by a device
        index, so the host never reads which. That needs every candidate already pushed and alike in kind;
        otherwise the latest call not yet replayed is taken (the engine's order for independent branches, as
        reentrant checkpointing gives), and the input check catches a wrong pick.
        """
        replays = [self.replays[c] for c in positions]
        fresh = [c for c in positions if not self.replays[c].replayed]
        kinds = {(r.stats.hist is None or tuple(h is None for h in r.stats.hist), r.stats.ok is None,
                  'tensor' if isinstance(r.stats.n_iters, Tensor) else r.stats.n_iters) for r in replays}
        if len(replays) == 1 or not all(r.pushed for r in replays) or len(kinds) > 1:
            # the autograd engine recomputes independent branches latest first (a shared head's levels: P7 first)
            position = (fresh or positions)[-1]
            return self.replays[position], position
        match = torch.stack([same_batch(mu_t, r.mu_t) for r in replays])
        index = match.to(mu_t.dtype).argmax().view(1)  # the first match (0 if none: the input check then fails)

        def pick(values):
            values = list(values)
            return None if values[0] is None else torch.stack(values).index_select(0, index)[0]

        stats = [r.stats for r in replays]
        n_iters = stats[0].n_iters  # an int is the same for all (checked above)
        if isinstance(n_iters, Tensor):
            n_iters = pick(st.n_iters for st in stats)
        hist = None if stats[0].hist is None else HistoryGrad(*(pick(f) for f in zip(*(st.hist for st in stats))))
        picked = WindowStats(pick(st.mu_bar for st in stats), pick(st.var_bar for st in stats), n_iters, hist,
                             pick(st.ok for st in stats))
        return Replay(pick(r.mu_t for r in replays), picked, True, replays[0].shape, True), None


class CheckpointReplayMixin:
    """The CBN layer's side of gradient checkpointing: a forward during backward replays its call's statistics
    and pushes the iteration at most once. Uses the layer's replay book, windows and normalization."""

    def _replay_message(self) -> str:
        return (f"{type(self).__name__} '{self.module_path or '?'}': a forward during backward (gradient "
                'checkpointing) saw a different input from the first forward of this iteration; cannot replay its '
                'statistics.')

    def check_replays(self) -> None:
        """Raise if a checkpoint recomputation on a GPU saw a different input from its first forward (counted on the
        device; this reads the count, so call it now and then: CBNBurnInHook does every 100 iterations)."""
        if self._replay_mismatches is not None and int(self._replay_mismatches) > 0:
            raise RuntimeError(f'{self._replay_message()} ({int(self._replay_mismatches)} times)')

    def _replay_forward(self, x: Tensor, positions: List[int]) -> Tensor:
        """A checkpoint recomputation of one of the calls at ``positions``: the same statistics as its first forward,
        and at most one push, into that call's window."""
        with torch.no_grad():
            mu_t, s_t = batch_moments(x.detach())
        windowed = [p for p in positions if self._replays.get(p).stats is not None]
        candidates = [self._replays.get(p) for p in positions]
        if windowed:
            replay, position = self._replays.pick(mu_t, windowed)
            same = same_batch(mu_t, replay.mu_t)
        elif all(r.pushed for r in candidates):
            # calls that normalized as BatchNorm (burn-in, k=1), nothing left to push: the recomputation needs no
            # position, only that its input is one of theirs
            replay, position = candidates[-1], None
            known = [r.mu_t for r in candidates if r.mu_t is not None]
            same = torch.stack([same_batch(mu_t, m) for m in known]).any() if known else None
        else:  # the engine recomputes independent branches latest first
            fresh = [p for p in positions if not self._replays.get(p).replayed]
            position = (fresh or positions)[-1]
            replay = self._replays.get(position)
            same = same_batch(mu_t, replay.mu_t) if replay.mu_t is not None else None
        if same is not None:
            # checked without reading a bool on the host: on the CPU an asynchronous assert raises at once; on CUDA a
            # device-side assert would poison the context, so a device counter is kept and check_replays() raises
            if mu_t.device.type == 'cpu':
                torch._assert_async(same, self._replay_message())
            else:
                if self._replay_mismatches is None or self._replay_mismatches.device != mu_t.device:
                    self._replay_mismatches = torch.zeros((), dtype=torch.int64, device=mu_t.device)
                self._replay_mismatches.add_(~same)
        stats = replay.stats
        conv = None
        if (stats is not None and stats.hist is not None) or not replay.pushed:
            conv, why = find_conv(x)
            if conv is None and not replay.pushed:
                self._warn_once(f'cannot collect its window because {why}')
        if position is not None and not replay.pushed and conv is not None:
            device_type = x.device.type
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                self._push_alone(conv, x, mu_t, s_t, position)
        if stats is None:  # BatchNorm's first forward again, without updating the running statistics
            y = self._bn_forward(x, replay=True)
        else:
            y = self.normalize(x, stats, conv)
        if position is not None:
            self._replays.set(position, replay._replace(pushed=True, replayed=True))
        return y

    def _push_alone(self, conv: ConvSpec, x: Tensor, mu_t: Tensor, s_t: Tensor, position: int) -> None:
        """Push an iteration outside a windowed forward (a reentrant checkpoint's recomputation)."""
        dtype, device = mu_t.dtype, mu_t.device
        shape = tuple(conv.weight.shape) if self.compensate else None
        groups = conv.groups if self.compensate else 1
        ws = self._workspace_for(shape, groups, dtype, device, self.compensate and intercept_of(conv))
        ws.set_count(x.numel() // x.shape[1])
        kv = self._kernel_views(conv.weight, dtype, groups) if self.compensate else None
        fill_entry(ws.views, kv, conv, x, mu_t, s_t, ws.consts, self.stat_grad_subsample)
        self._store(conv, position, ws, all_finite(*ws.views.fresh[self.compensate, False]), dtype, device)
