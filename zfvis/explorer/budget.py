"""A server-wide budget of something being held at once (pixels being decoded, bytes
being received): a request takes its share, waits briefly while others hold the rest,
and is refused (503, ``Retry-After``) when the wait runs out."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from .errors import ApiError

__all__ = ["Budget", "Busy"]


class Busy(ApiError):
    """The server is busy: 503 with ``Retry-After``.

    Attributes:
        retry_after: Seconds the client should wait.
    """

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(503, message)
        self.retry_after = retry_after


class Budget:
    """How much of a resource may be held at once, shared by every request.

    Args:
        total: The most held at once (a single share larger than this waits for an empty
            budget and then takes it all).
        unit: What is counted, for messages (``"pixels"``, ``"bytes"``).
    """

    def __init__(self, total: int, unit: str) -> None:
        self.total = int(total)
        self.unit = unit
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()

    def try_take(self, amount: int) -> bool:
        """Takes ``amount`` if it is free now; whether it did."""
        with self._cond:
            return self._take_locked(amount)

    def _take_locked(self, amount: int) -> bool:
        fits = self.held + amount <= self.total or (self.held == 0 and amount > 0)
        if fits:
            self.held += amount
            self.peak = max(self.peak, self.held)
        return fits

    def take(self, amount: int, wait: float) -> bool:
        """Takes ``amount``, waiting up to ``wait`` seconds for it; whether it did."""
        end = time.monotonic() + wait
        with self._cond:
            while not self._take_locked(amount):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def give(self, amount: int) -> None:
        """Returns ``amount`` taken before."""
        with self._cond:
            self.held = max(0, self.held - amount)
            self._cond.notify_all()

    @contextlib.contextmanager
    def share(self, amount: int, wait: float, what: str) -> Iterator[None]:
        """Holds ``amount`` for the ``with`` block.

        Raises:
            Busy: Not free within ``wait`` seconds (503).
        """
        if not self.take(amount, wait):
            raise Busy(f"the server is busy with other {what} ({self.held:,} of {self.total:,} {self.unit} in use); "
                       "try again in a moment")
        try:
            yield
        finally:
            self.give(amount)
