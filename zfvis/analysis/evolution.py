"""How features evolve during training (Zeiler & Fergus 2014, Fig. 4).

For each feature map of a layer, the strongest activation over a set of images is
projected to pixel space, at each checkpoint of a training run. :func:`evolution`
computes it, one model at a time (pass a generator to hold one checkpoint in memory);
:func:`evolution_figure` draws it, a row per feature map and a column per checkpoint.
:func:`sample_images` and :func:`load_images` pick and read the images, evenly spaced
over the whole data set, as ``zfvis evolution`` does.

>>> images = zfvis.load_images(zfvis.sample_images("cifar10/test", 512), preprocess)
>>> evo = zfvis.evolution([model_epoch1, model_epoch5], images.batch, "conv2", range(16))
>>> fig = zfvis.evolution_figure(evo, path="evolution.png")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence, Sized
from pathlib import Path

import torch
from torch import nn

from ..core.deconvnet import Deconvnet
from ..io import progress as _progress
from ..io.checks import check_channels
from ..io.errors import InputTypeError, UserInputError
from ..io.images import evenly_spaced, list_images, load_image, resolve
from .topk import crop_winners, make_seeds, strongest

__all__ = ["EvolutionCell", "Evolution", "ImageBatch", "sample_images", "load_images", "evolution"]

Box = tuple[int, int, int, int]


@dataclasses.dataclass
class ImageBatch:
    """Images read for a search.

    Attributes:
        batch: The readable images, preprocessed, as one batch (N, C, H, W).
        paths: The file of each image in ``batch``.
        skipped: The files that could not be read.
    """

    batch: torch.Tensor
    paths: list[Path]
    skipped: list[Path]


@dataclasses.dataclass
class EvolutionCell:
    """One feature map's strongest activation at one checkpoint.

    Attributes:
        value: The activation.
        image: Its image, an index into the images searched.
        position: Its (y, x) in the feature map; ``None`` for a vector layer.
        box: Its receptive field in the image, (top, left, bottom, right).
        projection: The projection cropped to ``box`` (C, h, w), raw (any sign);
            ``None`` when the feature map was never active (``value <= 0``).
    """

    value: float
    image: int
    position: tuple[int, int] | None
    box: Box
    projection: torch.Tensor | None


@dataclasses.dataclass
class Evolution:
    """What :func:`evolution` found.

    Attributes:
        layer: The layer, as given.
        channels: The feature maps, in row order.
        labels: One label per checkpoint, in column order.
        cells: ``cells[k][r]``: checkpoint ``k``, feature map ``channels[r]``.
    """

    layer: str
    channels: list[int]
    labels: list[str]
    cells: list[list[EvolutionCell]]


def sample_images(dataset: str | os.PathLike[str], limit: int | None = None) -> list[Path]:
    """The image files of a data set, ``limit`` of them evenly spaced over all of them.

    Args:
        dataset: A folder of images (searched recursively) or a text file of paths.
        limit: How many (:func:`zfvis.io.images.evenly_spaced`: the first file and, in a
            folder of class sub-folders, every class, the last one included); ``None``: all.

    Returns:
        The paths, in the data set's sorted order.
    """
    found = list_images(dataset)
    return [resolve(dataset, found[i]) for i in evenly_spaced(len(found), limit)]


def load_images(paths: Sequence[str | os.PathLike[str]], preprocess: Callable[..., torch.Tensor], *,
                progress: bool = False) -> ImageBatch:
    """Reads and preprocesses images into one batch, skipping unreadable files.

    Args:
        paths: Image files.
        preprocess: PIL image -> model input (C, H, W), one size for every image.
        progress: Show a progress bar (``tqdm.auto``: a terminal or a notebook).

    Returns:
        The batch, the path of each image in it, and the files skipped.

    Raises:
        UserInputError: No file is a readable image.
    """
    tensors, kept, skipped = [], [], []
    with _progress.progress(len(paths), "reading images", "img", show=progress) as bar:
        for path in [Path(p) for p in paths]:
            try:
                image = load_image(path)
            except (OSError, UserInputError):  # an unreadable file: skipped and listed
                skipped.append(path)
            else:
                tensors.append(preprocess(image))
                kept.append(path)
            bar.update(1)
    if not tensors:
        raise UserInputError(f"none of the {len(paths)} images is readable; check the data set's files")
    return ImageBatch(torch.stack(tensors), kept, skipped)


def _deconvnet(model: nn.Module | Deconvnet) -> Deconvnet:
    if isinstance(model, Deconvnet):
        return model
    if isinstance(model, nn.Module):
        return Deconvnet(model)
    raise InputTypeError(f"expected models (torch.nn.Module or zfvis.Deconvnet), got {type(model).__name__}")


def _device(dn: Deconvnet) -> torch.device:
    return next((p.device for p in dn.model.parameters()), torch.device("cpu"))


def _cells(dn: Deconvnet, images: torch.Tensor, layer: str, channels: list[int]) -> list[EvolutionCell]:
    """One checkpoint: each channel's strongest activation, projected and cropped."""
    best = strongest(dn, images, layer, channels)
    winners = sorted(set(best.image.tolist()))  # each image recorded once
    where = {i: j for j, i in enumerate(winners)}
    rows = [(where[int(i)], c, int(y), int(x), float(v))
            for i, c, y, x, v in zip(best.image, channels, best.y, best.x, best.value)]
    crops = crop_winners(dn, images[winners], layer, make_seeds(rows, images.device))
    return [EvolutionCell(float(v), int(i), (int(y), int(x)) if int(y) >= 0 else None, box,
                          proj.float() if float(v) > 0 else None)
            for (proj, _, box), i, y, x, v in zip(crops, best.image, best.y, best.x, best.value)]


def evolution(models: Iterable[nn.Module | Deconvnet], images: torch.Tensor, layer: str,
              channels: Iterable[int | tuple[int, int]], *, labels: Sequence[str] | None = None,
              progress: bool = False) -> Evolution:
    """Each feature map's strongest activation over ``images``, projected, at each checkpoint.

    Args:
        models: The checkpoints, in training order: models of one architecture (or their
            :class:`~zfvis.Deconvnet`). A generator is consumed one model at a time.
        images: The images to search (N, C, H, W), preprocessed as the models expect;
            moved to each model's device.
        layer: A layer name or alias.
        channels: The feature maps: channel numbers or inclusive ``(first, last)``
            ranges (checked against the layer, then sorted, each once).
        labels: One label per checkpoint (default ``checkpoint 1``, ``checkpoint 2``, ...).
        progress: Show a progress bar over the checkpoints (``tqdm.auto``).

    Returns:
        The :class:`Evolution`: per checkpoint and feature map the strongest activation,
        its image and the projection cropped to its receptive field. Ties: the first
        image, then the first position (as in mining).

    Raises:
        UserInputError: No model, no channel or a channel out of range, an unknown
            layer, activations that are not finite (NaN weights), or a label count that
            does not match the models.
        InputTypeError: A model is neither a module nor a Deconvnet.
    """
    wanted = list(channels)
    chosen: list[int] = []
    cells: list[list[EvolutionCell]] = []
    total = len(models) if isinstance(models, Sized) else None  # a generator: one model at a time
    with _progress.progress(total, "checkpoints", "ckpt", show=progress) as bar:
        for model in models:
            dn = _deconvnet(model)
            x = images.to(_device(dn))
            probe = dn.output(x[:1], layer)
            if not torch.isfinite(probe).all():
                raise UserInputError(f"checkpoint {len(cells) + 1}: the activations of {layer} are not finite (NaN or "
                                     "infinite); its weights up to that layer are unusable (a shipped training snapshot "
                                     "holds only the first layers: see zfvis.models.snapshots)")
            if not chosen:
                chosen = check_channels(wanted, probe.shape[1], layer)
            cells.append(_cells(dn, x, layer, chosen))
            bar.update(1)
    if not cells:
        raise UserInputError("evolution needs at least one model (checkpoint)")
    names = list(labels) if labels is not None else [f"checkpoint {k + 1}" for k in range(len(cells))]
    if len(names) != len(cells):
        raise UserInputError(f"got {len(names)} labels for {len(cells)} checkpoints; give one label per checkpoint")
    return Evolution(layer, chosen, names, cells)
