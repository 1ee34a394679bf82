"""Iteration boundaries and call positions of a CBN layer.

The c-th training call of an iteration uses the c-th window (a head shared across FPN levels calls its layers once
per level, in a fixed order). With :class:`~cbn_mmdet.engine.CBNBurnInHook` the hook marks iterations; without it a
new iteration begins at a training call when, since the previous one, a backward pass ran through the layer or the
conv's kernel changed. Host integers only.
"""
from typing import Callable, Optional

from torch import Tensor

__all__ = ['CallTracker']


class CallTracker:
    """Which iteration a training call belongs to and which position it takes in it."""

    def __init__(self):
        self.position = -1  # of the latest training call in the current iteration (-1: none yet)
        self.calls: Optional[int] = None  # training calls per iteration, known once a windowed one has ended
        self.counted = False  # whether the current iteration's calls are windowed (checked against calls)
        self.managed = False  # CBNBurnInHook marks the iterations
        self.mark = None  # the hook's iteration index
        self.use_window = True
        self.collect = True
        self.last_mark = None
        self.last_version = None
        self.backward_seen = False  # set from a hook on the output: a backward ran through the layer

    def begin_iteration(self, mark: int, use_window: bool, collect: bool) -> None:
        self.managed = True
        self.mark = mark
        self.use_window = use_window
        self.collect = collect

    def saw_backward(self, grad=None) -> None:
        """A gradient hook on the layer's output (unmanaged layers): the iteration has ended."""
        self.backward_seen = True

    def reset(self) -> None:
        """Forget the calls per iteration; the next training call starts an iteration."""
        self.calls = None
        self.position, self.counted = -1, False

    def restart(self) -> None:
        """The next training call starts an iteration (the calls per iteration are kept)."""
        self.position, self.counted, self.last_mark = -1, False, None

    def is_new_iteration(self, kernel: Optional[Tensor]) -> bool:
        """Whether a training call now starts a new iteration: the hook's mark changed (managed), or since the
        previous call a backward ran through the layer or the conv's kernel changed (unmanaged)."""
        if self.managed:
            return self.mark != self.last_mark
        version = kernel._version if kernel is not None else None
        return self.position < 0 or self.backward_seen or (version is not None and version != self.last_version)

    def next_position(self, kernel: Optional[Tensor]) -> int:
        """The position a training call would take now, without taking it."""
        return 0 if self.is_new_iteration(kernel) else self.position + 1

    def begin_call(self, kernel: Optional[Tensor], counted: bool, describe: Callable[[], str],
                   on_new_iteration: Callable[[], None]) -> int:
        """Take the position of this training call: 0 when it starts a new iteration, else one more than the
        previous call's.

        ``counted`` (the call uses or fills windows) holds the iteration to the number of calls per iteration seen
        before. Calls that are not counted (k=1, early burn-in) still take positions: their checkpoint replays are
        kept per call.
        """
        if self.is_new_iteration(kernel):
            if self.counted and self.position >= 0:
                self._check(self.position + 1, 'the last', describe)
            self.position, self.counted = 0, counted
            on_new_iteration()
        else:
            self.position += 1
            if self.counted and self.calls is not None and self.position >= self.calls:
                self._check(self.position + 1, 'this', describe)
        self.backward_seen = False
        self.last_mark = self.mark
        self.last_version = kernel._version if kernel is not None else None
        return self.position

    def _check(self, calls: int, which: str, describe: Callable[[], str]) -> None:
        """Learn the number of training calls per iteration from the first windowed iteration; refuse a change."""
        if self.calls is None:
            self.calls = calls
        elif calls != self.calls:
            raise RuntimeError(
                f'{describe()} was called {calls} times in {which} training iteration, but {self.calls} '
                'times in each earlier one. Its window is kept per call position (a head shared across FPN levels '
                'is called once per level, in a fixed order), so every iteration must make the same calls; call '
                'reset_window() to start afresh after a deliberate change. Training-mode forwards without '
                'gradients are calls too: reentrant checkpointing makes them the same way every iteration, but a '
                "pass whose number follows the batch (OHEM's hard mining, once per image) or a pass that forgot "
                'model.eval() changes the count; run such passes in eval mode.')
