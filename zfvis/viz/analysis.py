"""Figures of the analysis experiments: occlusion (ZF Fig. 7), invariance (Fig. 5) and
correspondence (Fig. 8, Table 1).

Like :mod:`zfvis.viz.render`: drawn on a :class:`~matplotlib.figure.Figure` with an Agg
canvas (pyplot is never imported), laid out by hand in inches, text 9 to 13 pt at the
written size (``dpi`` 100). Each function returns the figure and writes a PNG, atomically
(:func:`zfvis.io.atomic.atomic_open`), only when ``path`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from ..analysis.correspondence import CorrespondenceResult
from ..analysis.invariance import InvarianceResult
from ..analysis.occlusion import OcclusionResult
from .layout import (
    BOX_COLOR,
    DPI,
    FONT_LABEL,
    FONT_SMALL,
    FONT_TITLE,
    figure_format,
    new_figure,
    save_with_matplotlib,
    text,
)
from .render import normalize_projection

__all__ = ["occlusion_figure", "invariance_figure", "correspondence_figure", "DPI"]

_TITLE, _LABEL, _SMALL = FONT_TITLE, FONT_LABEL, FONT_SMALL
_HEAD = 11.0  # panel headings, between labels and titles
_MARGIN = 0.3
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
]  # fmt: skip
_OTHER = "#d9d9d9"


def _axes(fig: Figure, left: float, top: float, width: float, height: float, *, ticks: bool = False) -> Axes:
    """Axes placed in inches from the figure's top-left corner."""
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left / fw, 1.0 - (top + height) / fh, width / fw, height / fh))
    if not ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.tick_params(labelsize=_SMALL)
    return ax


def _save(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    """Writes ``fig`` when ``path`` is given, in the format its ending names (PNG by default),
    atomically and recorded as zfvis's."""
    if path is not None:
        target, fmt = figure_format(path)
        save_with_matplotlib(fig, target, fmt, DPI)
    return fig


def _hwc(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) float array."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def _show(ax: Axes, img: torch.Tensor) -> None:
    ax.imshow(_hwc(img), interpolation="nearest" if max(img.shape[-2:]) < 200 else "antialiased")


def _class_name(names: Sequence[str] | None, k: int) -> str:
    return names[k] if names is not None and 0 <= k < len(names) else f"class {k}"


# ----------------------------------------------------------------------------- occlusion


def _map_extent(res: OcclusionResult) -> tuple[float, float, float, float]:
    """Image coordinates of the map: each cell centred on its occluder's centre."""
    (ph, pw), (sh, sw) = res.patch, res.stride
    t, l = res.tops.float(), res.lefts.float()
    return (float(l[0]) + pw / 2 - sw / 2, float(l[-1]) + pw / 2 + sw / 2,
            float(t[-1]) + ph / 2 + sh / 2, float(t[0]) + ph / 2 - sh / 2)  # fmt: skip


def _heat(fig: Figure, ax: Axes, res: OcclusionResult, values: torch.Tensor, cmap: str, box: tuple[float, ...], *,
          label: str) -> None:
    """A position map in image coordinates, with a colour bar beside it saying what its colours are."""
    h, w = res.image_size
    im = ax.imshow(values.float().numpy(), cmap=cmap, extent=_map_extent(res), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_facecolor("#f2f2f2")
    left, top, width, height = box
    cax = _axes(fig, left + width + 0.08, top, 0.12, height, ticks=True)
    bar = fig.colorbar(im, cax=cax)
    bar.ax.yaxis.set_major_locator(MaxNLocator(6))
    labels = ScalarFormatter(useMathText=True, useOffset=False)
    labels.set_powerlimits((-2, 4))  # tiny probabilities: short labels and a x10^-3 above the bar
    bar.ax.yaxis.set_major_formatter(labels)
    bar.ax.yaxis.get_offset_text().set_fontsize(_SMALL)
    bar.ax.tick_params(labelsize=_SMALL)
    bar.set_label(label, fontsize=_SMALL)


def _class_colours(top: torch.Tensor, limit: int = 10) -> tuple[np.ndarray, list[tuple[str, int]], ListedColormap]:
    """Index image and legend entries for the most probable class map (the commonest classes)."""
    classes, counts = torch.unique(top, return_counts=True)
    order = [int(classes[i]) for i in torch.argsort(counts, descending=True, stable=True)]
    shown = order[:limit]
    index = np.full(top.shape, len(shown), dtype=np.int64)
    for k, c in enumerate(shown):
        index[(top == c).numpy()] = k
    colours = [_PALETTE[k % len(_PALETTE)] for k in range(len(shown))] + [_OTHER]
    return index, [(str(c), k) for k, c in enumerate(shown)], ListedColormap(colours)


def _projection_panel(fig: Figure, x0: float, y0: float, width: float, height: float, *,
                      pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], labels: Sequence[str]) -> None:  # fmt: skip
    """Up to 4 (projection, image patch) pairs, two pairs a row, each labelled under it."""
    gap, pair_gap, label_h = 0.06, 0.2, 0.22
    cell = min((width - 2 * gap - pair_gap) / 4, (height - 2 * label_h - 0.1) / 2)
    for k, (proj, patch) in enumerate(pairs[:4]):
        r, c = divmod(k, 2)
        left = x0 + c * (2 * cell + gap + pair_gap)
        top = y0 + r * (cell + label_h + 0.1)
        for j, img in enumerate((normalize_projection(proj[None])[0], patch)):
            ax = _axes(fig, left + j * (cell + gap), top, cell, cell)
            ax.imshow(_hwc(img), interpolation="nearest")
        if k < len(labels):
            text(fig, left + cell + gap / 2, top + cell + 0.03, labels[k], ha="center", va="top", fontsize=_SMALL)


def occlusion_figure(
    result: OcclusionResult,
    image: torch.Tensor,
    *,
    position: tuple[int, int] | None = None,
    projections: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    projection_labels: Sequence[str] = (),
    class_names: Sequence[str] | None = None,
    fill_rgb: torch.Tensor | None = None,
    title: str | None = None,
    note: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """ZF Fig. 7 for one image: the occluder, and what the network does as it moves.

    Panels: (a) the input with the occluder at one position; (b) the total activation of
    the feature map per occluder position; (c) that map's strongest activations projected
    to pixel space beside their image patches; (d) the probability of the target class per
    position; (e) the most probable class per position, with a legend of class names.
    Without a layer in ``result``, (b) and (c) are left out. Maps are drawn in image
    coordinates, each cell centred on its occluder's centre.

    Args:
        result: From :func:`zfvis.occlusion` (with a layer for panels b and c).
        image: The input as shown, (3, H, W) in [0, 1].
        position: Map entry (i, j) of the occluder drawn in (a); by default where the
            target's probability is lowest.
        projections: Up to 4 (projection (3, h, w), image patch (3, h, w)) pairs for (c).
        projection_labels: A caption under each pair, e.g. its activation.
        class_names: Names of the model's classes (else ``class N``).
        fill_rgb: The occluder colour as shown, (3,) in [0, 1] (default mid-grey).
        title: Figure title.
        note: A small line under the panels.
        path: PNG to write (its folder must exist), or ``None``.

    Returns:
        The figure.
    """
    cell, gap, wide = 2.4, 1.0, 3.3  # the gap holds a colour bar, its ticks and its label
    layered = result.layer is not None
    names = [_class_name(class_names, int(c)) for c in torch.unique(result.top_class)]
    legend_w = max(1.9, 0.45 + 0.075 * max(len(n) for n in names))  # about 0.075 in a character at 9 pt
    panels = (5 if layered else 3)
    width = 2 * _MARGIN + (panels - 1) * (cell + gap) + cell + (wide - cell if layered else 0.0) + legend_w
    top0 = _MARGIN + (0.5 if title else 0.0) + 0.5
    height = top0 + cell + (0.55 if note else 0.25) + _MARGIN
    fig = new_figure(width, height)
    if title:
        text(fig, width / 2, _MARGIN, title, ha="center", va="top", fontsize=_TITLE, fontweight="bold")
    x = [_MARGIN + k * (cell + gap) + (wide - cell if k > 2 else 0.0) for k in range(panels)]
    target = _class_name(class_names, result.target)
    heads = [f"(d) p({target})", "(e) most probable class"]
    if layered:
        heads = [f"(b) {result.layer}, map {result.channel}:\ntotal activation",
                 f"(c) map {result.channel}: strongest activations,\nprojected | image patch", *heads]
    heads = ["(a) input with occluder", *heads]
    for k, head in enumerate(heads):
        text(fig, x[k], top0 - 0.08, head, ha="left", va="bottom", fontsize=_HEAD)
    _occluded_panel(fig, x[0], top0, cell, result, image=image, position=position, fill_rgb=fill_rgb)
    box = lambda k: (x[k], top0, cell, cell)  # noqa: E731
    if layered:
        _heat(fig, _axes(fig, *box(1)), result, result.activation, "viridis", box(1),  # type: ignore[arg-type]
              label=f"sum of map {result.channel}")
        if projections:
            _projection_panel(fig, x[2], top0, wide, cell, pairs=projections, labels=projection_labels)
        else:
            text(fig, x[2] + wide / 2, top0 + cell / 2, "no projections given", ha="center", va="center",
                  fontsize=_LABEL, color="#707070")
    _heat(fig, _axes(fig, *box(panels - 2)), result, result.class_prob, "magma", box(panels - 2),
          label=f"p({target})")
    _class_panel(fig, box(panels - 1), result, class_names)
    if note:
        text(fig, _MARGIN, height - _MARGIN, note, ha="left", va="bottom", fontsize=_SMALL, color="#505050")
    return _save(fig, path)


def _occluded_panel(
    fig: Figure, x: float, top: float, cell: float, res: OcclusionResult, *, image: torch.Tensor,
    position: tuple[int, int] | None, fill_rgb: torch.Tensor | None,
) -> None:  # fmt: skip
    if position is None:
        flat = int(torch.argmin(res.class_prob))
        position = divmod(flat, res.shape[1])
    t, l, b, r = res.box(*position)
    shown = image.detach().float().cpu().clone()
    colour = torch.full((3,), 0.5) if fill_rgb is None else fill_rgb.float().cpu()
    shown[:, t:b, l:r] = colour.view(3, 1, 1)
    ax = _axes(fig, x, top, cell, cell)
    _show(ax, shown)
    ax.add_patch(Rectangle((l - 0.5, t - 0.5), r - l, b - t, fill=False, edgecolor=BOX_COLOR, linewidth=1.5))
    ax.set_xlabel(f"{r - l}x{b - t} occluder from row {t}, column {l}", fontsize=_SMALL)


def _class_panel(fig: Figure, box: tuple[float, float, float, float], res: OcclusionResult, names: Sequence[str] | None) -> None:
    index, entries, cmap = _class_colours(res.top_class)
    ax = _axes(fig, *box)
    h, w = res.image_size
    ax.imshow(index, cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, extent=_map_extent(res), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_facecolor("#f2f2f2")
    handles = [Patch(facecolor=cmap(k), label=_class_name(names, int(c))) for c, k in entries]
    if int(index.max()) == len(entries):
        handles.append(Patch(facecolor=_OTHER, label="other"))
    fig.legend(handles=handles, loc="upper left", fontsize=_SMALL, frameon=False,
               bbox_to_anchor=((box[0] + box[2] + 0.1) / fig.get_size_inches()[0], 1 - box[1] / fig.get_size_inches()[1]))


# ----------------------------------------------------------------------------- invariance

_UNITS = {"translation": "vertical shift (pixels)", "scale": "scale factor", "rotation": "rotation (degrees)"}


def invariance_figure(
    results: Sequence[InvarianceResult],
    image_names: Sequence[str],
    *,
    examples: Sequence[Sequence[tuple[str, torch.Tensor]]] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """ZF Fig. 5: a row per transformation; columns for a low layer's feature distance, a
    high layer's, and the probability of each image's class; one curve per image.

    Args:
        results: One :class:`~zfvis.invariance.InvarianceResult` per transformation, each
            with the same two (or one, or more: the first and last are drawn) layers.
        image_names: Legend label of each image.
        examples: Per row, up to 4 (label, image (3, h, w) in [0, 1]) thumbnails of the
            transformed first image, drawn in a first column.
        class_names: Names of the model's classes: the legend names each image's class.
        title: Figure title.
        path: PNG to write (its folder must exist), or ``None``.

    Returns:
        The figure.
    """
    if not results:
        raise ValueError("invariance_figure needs at least one result")
    plot_w, plot_h, gap_x, gap_y = 3.3, 2.3, 0.95, 0.8
    ex_w = 2.3 if examples else 0.0
    width = 2 * _MARGIN + 0.65 + ex_w + 3 * plot_w + 2 * gap_x + (0.4 if examples else 0.0)
    top0 = _MARGIN + (0.5 if title else 0.0) + 0.5 + 0.35
    height = top0 + len(results) * plot_h + (len(results) - 1) * gap_y + 0.55 + _MARGIN
    fig = new_figure(width, height)
    if title:
        text(fig, width / 2, _MARGIN, title, ha="center", va="top", fontsize=_TITLE, fontweight="bold")
    colours = [_PALETTE[k % len(_PALETTE)] for k in range(len(image_names))]
    targets = results[0].targets.tolist()
    labels = [f"{n} ({_class_name(class_names, t)})" for n, t in zip(image_names, targets)]
    handles = [Line2D([], [], color=c, marker="o", markersize=4, label=n) for c, n in zip(colours, labels)]
    fw, fh = fig.get_size_inches()
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=_LABEL, frameon=False,
               bbox_to_anchor=(0.5, 1 - (_MARGIN + (0.5 if title else 0.0)) / fh))
    x0 = _MARGIN + 0.65 + ex_w + (0.4 if examples else 0.0)
    for r, res in enumerate(results):
        top = top0 + r * (plot_h + gap_y)
        if examples:
            _examples(fig, _MARGIN, top, ex_w, plot_h, examples[r])
        columns = [(res.distances[res.layers[0]], f"{res.layers[0]}: feature distance", "Euclidean distance"),
                   (res.distances[res.layers[-1]], f"{res.layers[-1]}: feature distance", "Euclidean distance"),
                   (res.probability, "probability of the image's class", "probability")]  # fmt: skip
        for c, (values, head, ylabel) in enumerate(columns):
            ax = _axes(fig, x0 + c * (plot_w + gap_x), top, plot_w, plot_h, ticks=True)
            for k in range(values.shape[0]):
                ax.plot(res.amounts.numpy(), values[k].numpy(), color=colours[k], marker="o", markersize=3, linewidth=1.3)
            ax.set_title(head, fontsize=_LABEL)
            ax.set_xlabel(_UNITS[res.transform], fontsize=_SMALL)
            ax.set_ylabel(ylabel, fontsize=_SMALL)
            ax.grid(True, color="#e0e0e0", linewidth=0.6)
            if c == 2:
                ax.set_ylim(-0.03, 1.03)
    return _save(fig, path)


def _examples(fig: Figure, x: float, top: float, width: float, height: float, items: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Up to 4 thumbnails in a 2x2 grid, each labelled under it."""
    cell = min((width - 0.1) / 2, (height - 2 * 0.22 - 0.05) / 2)
    for k, (label, img) in enumerate(items[:4]):
        r, c = divmod(k, 2)
        ax = _axes(fig, x + c * (cell + 0.1), top + r * (cell + 0.27), cell, cell)
        _show(ax, img)
        ax.set_xlabel(label, fontsize=_SMALL, labelpad=1)


# ----------------------------------------------------------------------------- correspondence


def correspondence_figure(
    result: CorrespondenceResult,
    images: Sequence[torch.Tensor],
    image_names: Sequence[str],
    *,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """ZF Fig. 8 and Table 1: the images with their part boxes, and a bar per part and
    layer of the mean sign-change distance (with its spread over pairs), beside the same
    part's random baseline.

    Args:
        result: From :func:`zfvis.correspondence`.
        images: The model inputs as shown, (3, H, W) in [0, 1].
        image_names: A caption per image.
        title: Figure title.
        path: PNG to write (its folder must exist), or ``None``.

    Returns:
        The figure.
    """
    parts = [p for p in result.rows if not p.startswith("random (")]
    n = len(images)
    cell, gap = 2.2, 0.25
    plot_w = max(4.2, (n * (cell + gap) - gap - 0.8) / max(1, len(result.layers)))
    width = max(2 * _MARGIN + n * (cell + gap) - gap + 1.9, 2 * _MARGIN + 0.6 + len(result.layers) * (plot_w + 0.8))
    top0 = _MARGIN + (0.5 if title else 0.0) + 0.1
    plots_top = top0 + cell + 0.45 + 0.6
    height = plots_top + 2.8 + 0.5 + 0.45 + _MARGIN
    fig = new_figure(width, height)
    if title:
        text(fig, width / 2, _MARGIN, title, ha="center", va="top", fontsize=_TITLE, fontweight="bold")
    colours = {p: _PALETTE[k % len(_PALETTE)] for k, p in enumerate(parts)}
    for k, (img, name) in enumerate(zip(images, image_names)):
        ax = _axes(fig, _MARGIN + k * (cell + gap), top0, cell, cell)
        _show(ax, img)
        ax.set_xlabel(name, fontsize=_SMALL)
        for p in parts:
            t, l, b, r = result.boxes[p][k]
            ax.add_patch(Rectangle((l - 0.5, t - 0.5), r - l, b - t, fill=False, edgecolor=colours[p], linewidth=1.8))
    handles = [Patch(facecolor="none", edgecolor=colours[p], linewidth=1.8, label=p) for p in parts]
    fw, fh = fig.get_size_inches()
    fig.legend(handles=handles, loc="upper left", fontsize=_LABEL, frameon=False,
               bbox_to_anchor=((_MARGIN + n * (cell + gap)) / fw, 1 - top0 / fh))
    for c, layer in enumerate(result.layers):
        ax = _axes(fig, _MARGIN + 0.6 + c * (plot_w + 0.8), plots_top, plot_w, 2.8, ticks=True)
        _bars(ax, result, layer, parts, colours)
    note = ("bars: mean over image pairs of the fraction of units whose change differs in sign, whiskers: ± std\n"
            "coloured: the part occluded in every image")
    if any(p.startswith("random (") for p in result.rows):
        note += f"; grey: a box of the same size at a random place in each image (seed {result.seed})"
    text(fig, _MARGIN, height - _MARGIN, note, ha="left", va="bottom", fontsize=_SMALL, color="#505050")
    return _save(fig, path)


def _bars(ax: Axes, result: CorrespondenceResult, layer: str, parts: list[str], colours: dict[str, str]) -> None:
    xs = np.arange(len(parts))
    real = [result.rows[p][layer] for p in parts]
    rand = [result.rows.get(f"random ({p})", {}).get(layer) for p in parts]
    ax.bar(xs - 0.2, [s.mean for s in real], 0.38, yerr=[s.std for s in real], capsize=3,
           color=[colours[p] for p in parts])
    if all(s is not None for s in rand):
        ax.bar(xs + 0.2, [s.mean for s in rand], 0.38, yerr=[s.std for s in rand], capsize=3,  # type: ignore[union-attr]
               color="#bdbdbd")
        ax.set_xticks(xs + 0.2, ["random"] * len(parts), minor=True, fontsize=_SMALL, color="#707070")
        ax.tick_params(axis="x", which="minor", length=0, pad=17)
    ax.set_xticks(xs - (0.2 if all(s is not None for s in rand) else 0.0), parts, fontsize=_SMALL)
    ax.tick_params(axis="x", which="major", length=0)
    ax.set_title(f"{layer}: mean sign-change distance (lower: more consistent)", fontsize=_LABEL)
    ax.set_ylabel("fraction of units", fontsize=_SMALL)
    ax.grid(True, axis="y", color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)
