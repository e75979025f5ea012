"""The figure of feature visualization by optimization: synthetic images per unit, in rows,
optionally beside another parameterisation's images of the same units."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from ..analysis.feature_vis import FeatureVisResult
from ..io.errors import InputTypeError, UserInputError
from .layout import (
    FONT_SMALL,
    FONT_TITLE,
    MARGIN,
    axes,
    finish,
    new_figure,
    show,
    text,
    text_height,
    text_width,
    title_band,
)
from .render import _to_hwc

__all__ = ["feature_vis_figure"]


@dataclasses.dataclass
class _Cell:
    images: list[torch.Tensor]
    caption: str


def _as_list(results: FeatureVisResult | Sequence[FeatureVisResult] | None, name: str) -> list[FeatureVisResult]:
    if results is None:
        return []
    items = [results] if isinstance(results, FeatureVisResult) else list(results)
    if not items or not all(isinstance(r, FeatureVisResult) for r in items):
        raise InputTypeError(f"{name} must be a FeatureVisResult or a non-empty list of them")
    return items


def _rows(results: list[FeatureVisResult], compare: list[FeatureVisResult], columns: int,
          labels: Sequence[str] | None) -> tuple[list[list[_Cell]], list[str]]:  # fmt: skip
    """The cells of each row (a result wraps after ``columns`` images) and each row's label."""
    rows: list[list[_Cell]] = []
    names: list[str] = []
    for i, res in enumerate(results):
        other = compare[i] if compare else None
        if other is not None and other.units != res.units:
            raise UserInputError(f"compare[{i}] shows units {other.units}, not the same as results[{i}] ({res.units})")
        label = labels[i] if labels is not None else (res.layer or "logits")
        cells = []
        for j, unit in enumerate(res.units):
            imgs = [res.images[j]] + ([other.images[j]] if other is not None else [])
            noun = "class" if res.objective == "logit" else "dir" if res.objective == "direction" else "ch"
            cells.append(_Cell(imgs, f"{noun} {unit}"))
        for start in range(0, len(cells), columns):
            rows.append(cells[start:start + columns])
            names.append(label if start == 0 else "")
    return rows, names


def feature_vis_figure(
    results: FeatureVisResult | Sequence[FeatureVisResult],
    *,
    compare: FeatureVisResult | Sequence[FeatureVisResult] | None = None,
    names: tuple[str, str] | None = None,
    row_labels: Sequence[str] | None = None,
    columns: int = 8,
    cell_inches: float = 0.9,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Draws synthetic images: a row per result (wrapping after ``columns`` units), each unit
    captioned; with ``compare``, each unit's image beside the other result's (e.g. the Fourier
    parameterisation beside plain pixels), the pair named above the first row.

    Args:
        results: What :func:`zfvis.feature_vis` returned, one or a list (e.g. one per layer).
        compare: Results of the same units to show beside them, one per result.
        names: The two images' names in a pair (default: the results' parameterisations).
        row_labels: One label per result (default: its layer).
        columns: Units per row.
        cell_inches: Side of one image in inches.
        title: The figure title.
        path: Where to write the PNG (atomically); ``None`` writes nothing.

    Returns:
        The figure.

    Raises:
        InputTypeError: ``results`` or ``compare`` is not a FeatureVisResult or a list of them.
        UserInputError: ``compare`` or ``row_labels`` does not match ``results``.
    """
    res, other = _as_list(results, "results"), _as_list(compare, "compare")
    if other and len(other) != len(res):
        raise UserInputError(f"compare holds {len(other)} results for {len(res)} results; give one per result")
    if row_labels is not None and len(row_labels) != len(res):
        raise UserInputError(f"got {len(row_labels)} row labels for {len(res)} results")
    if columns < 1 or cell_inches <= 0:
        raise UserInputError(f"columns must be at least 1 and cell_inches positive, got {columns}, {cell_inches}")
    rows, labels = _rows(res, other, columns, row_labels)
    pair = (names or (res[0].param, other[0].param)) if other else None
    return _draw(rows, labels, pair, cell_inches, title, path)


def _draw(rows: list[list[_Cell]], labels: list[str], pair: tuple[str, str] | None, cell: float,
          title: str | None, path: str | os.PathLike[str] | None) -> Figure:  # fmt: skip
    per = 2 if pair else 1
    inner = 0.03  # between the images of a pair
    gap = 0.12 + 0.1 * (per - 1)  # between cells
    cell_w = per * cell + (per - 1) * inner
    n_cols = max(len(r) for r in rows)
    label_w = min(text_width("\n".join(labels), FONT_SMALL) + 0.15, 2.0) if any(labels) else 0.0
    cap_h = text_height(1, FONT_SMALL) + 0.04
    head_h = text_height(1, FONT_SMALL) + 0.04 if pair else 0.0
    grid_w = n_cols * cell_w + (n_cols - 1) * gap
    fig_w = 2 * MARGIN + label_w + grid_w
    if title:
        fig_w = max(fig_w, min(text_width(title, FONT_TITLE) + 2 * MARGIN + 0.1, 12.0))
    sup, sup_h = title_band(title, fig_w)
    x0 = (fig_w - label_w - grid_w) / 2 + label_w
    top0 = MARGIN + sup_h + head_h
    row_h = cell + cap_h + 0.08
    fig = new_figure(fig_w, top0 + len(rows) * row_h + MARGIN)
    if sup:
        text(fig, fig_w / 2, MARGIN, sup, ha="center", va="top", fontsize=FONT_TITLE, fontweight="bold")
    for i, row in enumerate(rows):
        y = top0 + i * row_h
        if labels[i]:
            text(fig, x0 - 0.1, y + cell / 2, labels[i], ha="right", va="center", fontsize=FONT_SMALL)
        for j, c in enumerate(row):
            x = x0 + j * (cell_w + gap)
            for k, img in enumerate(c.images):
                if pair and i == 0:
                    text(fig, x + k * (cell + inner) + cell / 2, y - 0.04, pair[k], ha="center", va="bottom",
                         fontsize=FONT_SMALL, color="#505050")
                show(axes(fig, x + k * (cell + inner), y, cell, cell), _to_hwc(img.clamp(0, 1)), cell)
            text(fig, x + cell_w / 2, y + cell + 0.03, c.caption, ha="center", va="top", fontsize=FONT_SMALL)
    return finish(fig, path)
