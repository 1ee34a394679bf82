"""What a training call normalized with, kept for its gradient-checkpointing recomputation during backward.

mmdet's ``with_cp=True`` recomputes a block's forward during backward. The recomputation must normalize with the
same statistics as the first forward (otherwise the gradient is of another function) and push the iteration at
most once. The replay of a call is found by its input's shape (FPN levels differ in size), or among calls of one
shape by its batch mean, chosen on the device.
"""
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops import HistoryGrad

__all__ = ['WindowStats', 'Replay', 'ReplayBook']


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
