"""A convolution's filters as an image grid (Zeiler & Fergus Fig. 6)."""

from __future__ import annotations

import math
import os

import torch
from matplotlib.figure import Figure
from torch import nn

from ..core.deconvnet import Deconvnet
from ..io.errors import InputTypeError
from .grids import grid_figure
from .render import normalize_projection

__all__ = ["filter_grid", "filters_figure"]


def filter_grid(
    weight: torch.Tensor, path: str | os.PathLike[str] | None = None, *, title: str | None = None
) -> Figure:
    """Draws convolution filters ``(out, in, k, k)`` as a grid of small images.

    With 3 input channels each filter is an RGB image; otherwise the mean over input
    channels is shown as grey. Each filter is normalised on its own like a projection
    (0 is grey, its largest absolute value is black or white). The grid is about
    square (at most 16 per row); each row is labelled with its first filter's index.

    Args:
        weight: Convolution weight ``(out, in, kh, kw)``.
        path: Target PNG (its folder must exist), or None to write nothing.
        title: Figure title, or None.

    Returns:
        The figure (written to ``path`` first, when given).

    Raises:
        ValueError: ``weight`` is not 4-D or has no filters.
        OSError: The folder is missing or cannot be written.
    """
    if weight.dim() != 4 or weight.shape[0] == 0:
        raise ValueError(f"expected a convolution weight (out, in, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    images = normalize_projection(w)
    n = images.shape[0]
    n_cols = min(16, math.ceil(math.sqrt(n)))
    n_rows = math.ceil(n / n_cols)
    cells: list[list[torch.Tensor | None]] = [
        [images[i] for i in range(r * n_cols, min(n, (r + 1) * n_cols))] for r in range(n_rows)
    ]
    labels = [str(r * n_cols) for r in range(n_rows)]
    cell_in = 0.6 if n_cols > 8 else 0.9
    return grid_figure(cells, path, row_labels=labels, title=title, cell_inches=cell_in)


def filters_figure(model: nn.Module | Deconvnet, layer: str, *, model_name: str | None = None,
                   title: str | None = None, path: str | os.PathLike[str] | None = None) -> Figure:
    """The filters of the convolution a layer stands for, as an image grid (ZF Fig. 6).

    The convolution is found through the model's graph
    (:meth:`~zfvis.Deconvnet.convolution`): the layer itself, or the convolution whose
    output it is after batch norm and ReLU (``conv3`` of the zoo's models). With 3 input
    channels each filter is an RGB image, otherwise the mean over input channels in grey;
    each is scaled on its own (0 is grey).

    Args:
        model: The model, or its :class:`~zfvis.Deconvnet`.
        layer: A layer name or alias.
        model_name: Named at the start of the default title, e.g. ``"zfnet-cifar10 (packaged)"``.
        title: The figure title (default: the model name, the layer, the module and the
            filters' count and size).
        path: Where to write the PNG (atomically); ``None`` writes nothing.

    Returns:
        The figure.

    Raises:
        UserInputError: The layer is unknown or is not a convolution.
        InputTypeError: ``model`` is neither a module nor a Deconvnet.
    """
    if not isinstance(model, (nn.Module, Deconvnet)):
        raise InputTypeError(f"expected a torch.nn.Module or a zfvis.Deconvnet, got {type(model).__name__}")
    dn = model if isinstance(model, Deconvnet) else Deconvnet(model)
    name, conv = dn.convolution(layer)
    w = conv.weight.detach().float().cpu()
    default = f"{layer} = '{name}': {w.shape[0]} filters {w.shape[2]}x{w.shape[3]}"
    return filter_grid(w, path, title=title or (f"{model_name} {default}" if model_name else default))
