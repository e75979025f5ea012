"""Which units a call visualises: the checked channels, classes or directions, as an :class:`Objective`."""

from __future__ import annotations

from typing import Any

import torch

from ...io.checks import check_channels, parse_channel_spec
from ...io.errors import InputTypeError, UserInputError
from .objectives import OBJECTIVES, Objective

__all__ = ["make_objective"]


def make_objective(kind: str, probe: torch.Tensor, *, channels: Any, position: Any, direction: Any,
                   layer: str | None) -> Objective:  # fmt: skip
    """The objective of ``kind`` for a layer whose output on one image is ``probe`` (1, C, ...).

    Raises:
        UserInputError: An unknown objective, channels out of range, a bad position or direction.
    """
    if kind not in OBJECTIVES:
        raise UserInputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {kind!r}")
    if probe.dim() < 2:
        raise UserInputError(f"layer '{layer or 'output'}' outputs shape {tuple(probe.shape)}; "
                             "feature visualization needs (N, C) or (N, C, H, W)")
    n_channels = probe.shape[1]
    if kind == "direction":
        return Objective(kind, _directions(direction, n_channels, layer), list(range(_count(direction))))
    name = layer or "output"
    units = list(range(n_channels)) if channels is None else check_channels(parse_channel_spec(channels, "channels"),
                                                                             n_channels, name)
    weights = torch.zeros(len(units), n_channels, dtype=probe.dtype, device=probe.device)
    weights[torch.arange(len(units)), torch.tensor(units)] = 1.0
    return Objective(kind, weights, units, _position(position) if kind == "unit" else None)


def _count(direction: Any) -> int:
    return 1 if direction.dim() == 1 else int(direction.shape[0])


def _directions(direction: Any, n_channels: int, layer: str | None) -> torch.Tensor:
    if not isinstance(direction, torch.Tensor):
        raise InputTypeError(f"objective='direction' needs direction=, a tensor (C,) or (D, C), got "
                             f"{type(direction).__name__}")
    d = direction.detach()
    if d.dim() not in (1, 2) or d.shape[-1] != n_channels or d.numel() == 0:
        raise UserInputError(f"direction must have shape ({n_channels},) or (D, {n_channels}) for layer "
                             f"'{layer or 'output'}', got {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise UserInputError("direction holds NaN or infinite values")
    return d.reshape(-1, n_channels).float()


def _position(position: Any) -> tuple[int, int] | None:
    if position is None:
        return None
    try:
        y, x = position
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (y, x)):
            raise TypeError
    except (TypeError, ValueError):
        raise UserInputError(f"position must be (row, column), two whole numbers, got {position!r}") from None
    return int(y), int(x)
