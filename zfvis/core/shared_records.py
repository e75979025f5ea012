"""Recorded tensors that share memory with the forward pass's values, copied before a write.

An op's recorded inputs (a site's state) are not copied when recorded: most are never
written again. :class:`SharedRecords` watches them by storage and copies each just before a
node that may write into its memory runs (and at the end of the pass, if it is the caller's
images), so the reverse pass reads the values as they were.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .inplace import storage
from .ops import Site

__all__ = ["SharedRecords"]


class SharedRecords:
    """Recorded tensors that share memory with the forward pass's values (an op's recorded
    inputs are not copied when recorded): each is copied just before a node that may write
    into its memory runs, and at the end if it is the caller's images."""

    def __init__(self) -> None:
        self.by_storage: dict[int, list[tuple[Any, int | None]]] = {}

    def watch(self, site: Site) -> None:
        """Watches the tensors of a site's state (a tensor, or a list of them)."""
        state = site.state
        if isinstance(state, torch.Tensor):
            entries: list[tuple[Any, int | None, torch.Tensor]] = [(site, None, state)]
        elif isinstance(state, list):
            entries = [(state, k, t) for k, t in enumerate(state) if isinstance(t, torch.Tensor)]
        else:
            return
        for holder, key, t in entries:
            ptr = storage(t)
            if ptr:
                self.by_storage.setdefault(ptr, []).append((holder, key))

    def copy_before_write(self, values: Any) -> None:
        """Copies the watched tensors that share memory with any tensor in ``values``."""
        if not self.by_storage:
            return
        found: list[torch.Tensor] = []
        if isinstance(values, torch.Tensor):
            found.append(values)
        else:
            fx.node.map_aggregate(values, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
        for v in found:
            for holder, key in self.by_storage.pop(storage(v), []):
                if key is None:
                    holder.state = holder.state.clone()
                else:
                    holder[key] = holder[key].clone()
