"""The model's own state that zfvis's runs must leave as they found it.

A model's ``forward`` may write into its own buffers (a call counter): zfvis runs it, or its
graph, several times (the trace, the check, each projection, occlusion's passes), and puts
those buffers back after each run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["kept_buffers"]


@contextlib.contextmanager
def kept_buffers(model: nn.Module, names: frozenset[str] | None = None) -> Iterator[set[str]]:
    """Leaves the model's buffers (those in ``names``; default all) as they were: a forward
    that writes into its own buffers (a call counter) runs inside without changing the model.
    Yields the set it fills with the names of those it put back."""
    saved = [(n, b, b._version, b.detach().clone()) for n, b in model.named_buffers()
             if names is None or n in names]
    written: set[str] = set()
    try:
        yield written
    finally:
        with torch.no_grad():
            for name, buf, version, copy in saved:
                if buf._version != version:
                    buf.copy_(copy)
                    written.add(name)
