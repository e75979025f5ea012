"""The signals a reverse pass has sent to nodes whose reverse layers have not run yet.

Where a value fed several nodes, their signals are summed before its producer's layer runs
(as autograd accumulates gradients). :class:`PendingSignals` also knows which pending
signals nothing else refers to (a new tensor a layer made, or a sum it made itself): those
are summed into in place, and a layer may overwrite them (a rectifier rectifies in place),
which saves allocating and touching a new map per step.
"""

from __future__ import annotations

import torch

__all__ = ["PendingSignals"]


def _broadcasts(small: torch.Size, big: torch.Size) -> bool:
    """Whether a tensor of shape ``small`` broadcasts to ``big`` (``big += small`` keeps ``big``'s
    shape); ``torch.broadcast_shapes`` costs tens of microseconds."""
    return len(small) <= len(big) and all(s in (1, b) for s, b in zip(reversed(small), reversed(big)))


class PendingSignals:
    """Signals by node name, each marked owned (writable in place) or not.

    Args:
        name: The seed node's name.
        signal: The seed signal (the caller's: never written).
    """

    def __init__(self, name: str, signal: torch.Tensor) -> None:
        self._signals: dict[str, torch.Tensor] = {name: signal}
        self._owned: set[int] = set()  # ids of the pending tensors nothing else refers to

    def pop(self, name: str) -> tuple[torch.Tensor | None, bool]:
        """The signal pending at ``name`` (``None`` if none) and whether it is owned."""
        s = self._signals.pop(name, None)
        if s is None:
            return None, False
        mine = id(s) in self._owned
        self._owned.discard(id(s))
        return s, mine

    def add(self, name: str, r: torch.Tensor, owned: bool) -> None:
        """Adds signal ``r`` (``owned``: nothing else refers to it) to the one pending at
        ``name``: in place where that one is owned and holds the sum's shape and dtype."""
        prev = self._signals.get(name)
        if prev is None:
            self._signals[name] = r
            if owned:
                self._owned.add(id(r))
            return
        if id(prev) in self._owned and prev.dtype == r.dtype and _broadcasts(r.shape, prev.shape):
            prev.add_(r)
            return
        self._owned.discard(id(prev))
        self._signals[name] = total = prev + r
        self._owned.add(id(total))
