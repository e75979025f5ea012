"""The figure of feature evolution during training (Zeiler & Fergus Fig. 4)."""

from __future__ import annotations

import os

import torch
from matplotlib.figure import Figure

from ..analysis.evolution import Evolution
from .grids import grid_figure
from .render import normalize_projection

__all__ = ["evolution_figure"]


def evolution_figure(result: Evolution, *, model_name: str | None = None, title: str | None = None,
                     path: str | os.PathLike[str] | None = None) -> Figure:
    """Draws an :class:`Evolution`: a row per feature map, a column per checkpoint.

    Each cell is the strongest activation's projection cropped to its receptive field
    (0 is grey, scaled by its largest absolute value); a feature map never active at a
    checkpoint is a light-grey blank.

    Args:
        result: What :func:`evolution` returned.
        model_name: Named at the start of the default title, e.g. ``"zfnet-cifar10"``.
        title: The figure title (default: the model name, the layer and what the cells show).
        path: Where to write the PNG (atomically); ``None`` writes nothing.

    Returns:
        The figure.
    """
    rows: list[list[torch.Tensor | None]] = [
        [None if col[r].projection is None else normalize_projection(col[r].projection)
         for col in result.cells]
        for r in range(len(result.channels))
    ]
    default = f"{result.layer}: strongest activation per feature map, by checkpoint (blank: never active)"
    return grid_figure(
        rows, path, row_labels=[f"ch {c}" for c in result.channels], col_labels=list(result.labels),
        title=title or (f"{model_name} {default}" if model_name else default),
    )
