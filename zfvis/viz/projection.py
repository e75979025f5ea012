"""Figures of one model from Python: what ``zfvis project`` and ``zfvis filters`` draw.

:func:`projection_figure` is the figure of ``zfvis project`` (the input, each projection,
and both cropped to the activation's receptive field); :func:`rules_figure` shows the
deconvnet, guided-backpropagation and gradient projections of the same activations side
by side; :func:`filters_figure` is the figure of ``zfvis filters`` (a convolution's
filters, ZF Fig. 6). Each returns a matplotlib ``Figure``; a PNG is written only when
``path`` is given.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import torch
from matplotlib.figure import Figure

from ..core.deconvnet import Deconvnet
from ..core.ops import RULES
from ..core.seeds import Seeds
from . import grids, render

__all__ = ["Selection", "choose_seeds", "projection_figure", "rules_figure", "strongest_channels"]

Show = Callable[[torch.Tensor], torch.Tensor]

_NOTE = ("{rule} projections: zero is grey, scaled by each projection's largest |value|; "
         "boxes: receptive field of the activation; ch C @ (row, column): the activation's channel and its "
         "position in the layer's feature map")


@dataclasses.dataclass
class Selection:
    """Which activations of one image to project.

    Attributes:
        channel: A channel, channels, or ``None`` for the ``top_channels`` most active.
        top_k: The k strongest positions per channel (maps only).
        position: A (y, x) position instead of the strongest.
        top_channels: How many channels when ``channel`` is ``None``.
    """

    channel: int | Sequence[int] | None = None
    top_k: int = 1
    position: tuple[int, int] | None = None
    top_channels: int = 9


def strongest_channels(output: torch.Tensor, count: int) -> list[int]:
    """The ``count`` channels of a layer's output (1, C, ...) whose maximum is largest, strongest
    first (ties: the lower channel); what ``zfvis project`` and :func:`projection_figure` show."""
    n = output.shape[1]
    strength = output[0].reshape(n, -1).amax(dim=1)
    order = torch.sort(strength, descending=True, stable=True).indices
    return [int(c) for c in order[: min(count, n)]]


def choose_seeds(dn: Deconvnet, image: torch.Tensor, layer: str, selection: Selection, *,
                 rule: str | None = None) -> tuple[Seeds, list[int]]:
    """The seeds of one image (1, C, H, W) and the channels they come from."""
    rec = dn.record(image, layer, rule=rule)
    channels = (strongest_channels(rec.output, selection.top_channels) if selection.channel is None
                else [selection.channel] if isinstance(selection.channel, int) else list(selection.channel))
    vector = rec.output.dim() == 2
    top_k = None if vector or selection.position is not None else selection.top_k
    return dn.select(rec, channels, None if vector else selection.position, top_k=top_k), channels


def _titles(seeds: Seeds) -> list[str]:
    out = []
    for i in range(len(seeds)):
        where = f" @ ({int(seeds.y[i])}, {int(seeds.x[i])})" if int(seeds.y[i]) >= 0 else ""  # (row, column)
        out.append(f"ch {int(seeds.channel[i])}{where}\nact {float(seeds.value[i]):.3g}")
    return out


def _shown(image: torch.Tensor, show: Show | None) -> torch.Tensor:
    """The image as drawn: ``show`` (e.g. ``preprocess.denormalize``) or min-max scaled."""
    x = image.detach().cpu().float()
    if show is not None:
        return show(x)
    lo, hi = x.amin(), x.amax()
    return (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)


def projection_figure(dn: Deconvnet, images: torch.Tensor, layer: str, selection: Selection | None = None, *,
                      rule: str | None = None, show: Show | None = None, title: str | None = None,
                      model_name: str | None = None, path: str | os.PathLike[str] | None = None) -> Figure:
    """The figure of ``zfvis project`` for the first image of ``images``.

    Args:
        dn: The deconvnet.
        images: A batch (N, C, H, W); only the first image is drawn.
        layer: A layer name or alias.
        selection: Which activations (default: the 9 most active channels' strongest).
        rule: The ReLU rule (default: the Deconvnet's).
        show: Maps the model input (C, H, W) to a displayable [0, 1] RGB image, e.g.
            ``preprocess.denormalize``; by default each image is min-max scaled.
        title: The figure title (default: the model, layer, rule and input size).
        model_name: The model's name in the default title (default: its class name).
        path: Where to write the PNG (atomically); ``None`` writes nothing.

    Where an activation's receptive field covers (nearly) the whole image, the crops show
    where its projection is non-negligible instead (:func:`zfvis.viz.grids.crop_box`), drawn
    dashed and said so on the figure.

    Returns:
        The figure.
    """
    selection = selection or Selection()
    x = images[:1]
    rule = dn.rule if rule is None else rule
    seeds, _ = choose_seeds(dn, x, layer, selection, rule=rule)
    patches = dn.reverse(dn.record(x, layer, rule=rule), seeds)
    title = title or f"{model_name or type(dn.model).__name__} / {layer} ({rule}) at {x.shape[-2]}x{x.shape[-1]}"
    return grids.project_figure(_shown(x[0], show), [p.float() for p in patches.full().cpu()], patches.boxes(),
                                 _titles(seeds), title, path, note=_NOTE.format(rule=rule))


def rules_figure(dn: Deconvnet, images: torch.Tensor, layer: str, selection: Selection | None = None, *,
                 show: Show | None = None, title: str | None = None, model_name: str | None = None,
                 path: str | os.PathLike[str] | None = None) -> Figure:
    """The same activations projected under each rule, side by side: a row per
    activation, columns input (receptive field cropped), deconvnet, guided, gradient.

    Where an activation's receptive field covers (nearly) the whole image, its row is cropped
    to where the deconvnet projection is non-negligible instead (:func:`zfvis.viz.grids.crop_box`),
    and its label says so.

    Args:
        dn: The deconvnet.
        images: A batch (N, C, H, W); only the first image is used.
        layer: A layer name or alias.
        selection: Which activations (default: the 9 most active channels' strongest).
        show: Maps the model input to a displayable [0, 1] RGB image.
        title: The figure title (default: the model and the layer).
        model_name: The model's name in the default title (default: its class name).
        path: Where to write the PNG; ``None`` writes nothing.
    """
    selection = selection or Selection()
    x = images[:1]
    seeds, _ = choose_seeds(dn, x, layer, selection)
    shown = _shown(x[0], show)
    columns: list[list[torch.Tensor]] = []
    crops: list[tuple[tuple[int, int, int, int], bool]] = []
    for rule in RULES:
        patches = dn.reverse(dn.record(x, layer, rule=rule), seeds)
        full = [p.float() for p in patches.full().cpu()]
        if not crops:  # the deconvnet's: the windows every rule's row is cropped to
            crops = [grids.crop_box(p, box) for p, box in zip(full, patches.boxes())]
        columns.append([render.normalize_projection(p) for p in full])
    cells: list[list[torch.Tensor | None]] = []
    for i, ((t, l_, b, r), _) in enumerate(crops):
        cells.append([shown[:, t:b, l_:r]] + [col[i][:, t:b, l_:r] for col in columns])
    labels = [s.replace("\n", ", ") + ("\n(cropped to where\n|projection| is large)" if support else "")
              for s, (_, support) in zip(_titles(seeds), crops)]
    name = model_name or type(dn.model).__name__
    return grids.grid_figure(
        cells, path, row_labels=labels, col_labels=["input (receptive field)", *RULES],
        title=title or f"{name} / {layer}: the same activations under each rule (cropped to the receptive field)",
        cell_inches=1.6,
    )
