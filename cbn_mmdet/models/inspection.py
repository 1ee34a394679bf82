"""What hooks and tools read of a CBN layer: its windows, its calls and what the latest call normalized with.

A mixin of :class:`~cbn_mmdet.models.cbn.CrossIterationBatchNorm2d` (the layer's public read-only interface); it
reads the state that :mod:`.window`, :mod:`.calls` and :mod:`.replay` keep for the layer.
"""
from typing import List, Optional, Tuple

from torch import Tensor

from .conv_lookup import find_conv
from .replay import Replay
from .window import WindowBank

__all__ = ['InspectionMixin']


class InspectionMixin:
    """The layer's windows, calls and last statistics, for hooks and tools."""

    def window_at(self, position: int) -> Optional[WindowBank]:
        """The window of the ``position``-th training call of an iteration (None if it holds nothing yet)."""
        return self._banks[position] if 0 <= position < len(self._banks) else None

    @property
    def window_length(self) -> int:
        """How many past iterations the window holds now (the first call position's; see :attr:`window_lengths`)."""
        bank = self.window_at(0)
        return 0 if bank is None else bank.count

    @property
    def window_lengths(self) -> List[int]:
        """How many past iterations each call position's window holds now: one entry per training call of an
        iteration (5 for a head shared across P3-P7), ``[]`` before any was stored."""
        return [0 if b is None else b.count for b in self._banks]

    @property
    def window_nbytes(self) -> int:
        """Bytes held by the windows of every call position (memory grows with the calls per iteration), not
        counting the layer's one scratch workspace (:attr:`workspace_nbytes`)."""
        return sum(b.nbytes for b in self._banks if b is not None)

    @property
    def workspace_nbytes(self) -> int:
        """Bytes of the layer's scratch, shared by its call positions: about one kernel."""
        ws = self._workspace
        return 0 if ws is None else ws.nbytes

    @property
    def calls_per_iteration(self) -> Optional[int]:
        """Training calls per iteration, once a windowed iteration has ended (None before)."""
        return self._calls.calls

    @property
    def call_position(self) -> int:
        """The position of the latest training call within its iteration (-1 before any)."""
        return self._calls.position

    def next_call_position(self, x: Tensor) -> int:
        """The call position a training forward of ``x`` would take now, without taking it (for hooks that look at
        the window before the call, as CBNStatsErrorHook does)."""
        conv = find_conv(x)[0] if self._counted() and x.numel() else None
        return self._calls.next_position(self._kernel_of(conv))

    @property
    def last_call(self) -> Optional[Replay]:
        """What the latest training call normalized with (its batch mean ``mu_t`` and its :class:`WindowStats`);
        None for a call without statistics (an empty batch) or before any."""
        return self._replays.get(self._calls.position)

    @property
    def last_conv(self) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        """The kernel and bias of the convolution whose iteration was pushed last (None before any push)."""
        return self._last.conv_params
