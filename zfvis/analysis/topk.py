"""Running top-k lists of activations: the knowledge mining and evolution share.

A top-k list holds, per channel, ``values``, ``index`` (the image) and ``pos`` (the flat
position in the map, -1 for a vector), each (C, k), ordered by value descending and then
image index ascending; empty slots have index :data:`EMPTY` and sort last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.deconvnet import Deconvnet
from ..core.seeds import Seeds

__all__ = ["EMPTY", "empty_topk", "merge_topk", "image_maxima", "strongest", "make_seeds", "crop_winners"]

#: Index of an empty top-k slot (sorts last).
EMPTY = torch.iinfo(torch.long).max


def empty_topk(channels: int, k: int) -> dict[str, torch.Tensor]:
    """A top-k list with every slot empty, for ``channels`` channels."""
    return {
        "values": torch.full((channels, k), -math.inf),
        "index": torch.full((channels, k), EMPTY, dtype=torch.long),
        "pos": torch.full((channels, k), -1, dtype=torch.long),
    }


def merge_topk(parts: Sequence[dict[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    """Merges top-k lists (each ``values``/``index``/``pos`` of shape (C, n)) exactly.

    Order: value descending, then image index ascending; empty slots (index
    ``EMPTY``) last. Entries of one image must occur once per channel across ``parts``.
    """
    values = torch.cat([p["values"] for p in parts], dim=1)
    index = torch.cat([p["index"] for p in parts], dim=1)
    pos = torch.cat([p["pos"] for p in parts], dim=1)
    order = torch.sort(index, dim=1, stable=True).indices  # secondary key first
    values, index, pos = (torch.gather(t, 1, order) for t in (values, index, pos))
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    values, index, pos = (torch.gather(t, 1, order) for t in (values, index, pos))
    return {"values": values[:, :k].contiguous(), "index": index[:, :k].contiguous(), "pos": pos[:, :k].contiguous()}


def image_maxima(out: torch.Tensor, channels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel the maximum over positions and its flat position (C, B)."""
    out = out.detach()
    if channels is not None:
        out = out.index_select(1, channels)
    if out.dim() == 2:
        vals = out.float()
        pos = torch.full_like(vals, -1, dtype=torch.long)
    else:
        flat = out.flatten(2).float()
        vals = flat.amax(dim=2)
        pos = (flat == vals.unsqueeze(2)).to(torch.uint8).argmax(dim=2)  # first maximum
    vals = torch.nan_to_num(vals, nan=-math.inf)
    return vals.t().cpu(), pos.t().cpu()


def strongest(dn: Deconvnet, images: torch.Tensor, layer: str, channels: Sequence[int], *,
              batch: int = 128) -> Seeds:
    """Each channel's strongest activation over ``images``, as seeds into ``images``
    (ties: the first image, then the first position, as in mining).

    Args:
        dn: The deconvnet.
        images: The images to search (N, C, H, W).
        layer: A layer name or alias.
        channels: The channels.
        batch: Images per forward pass.

    Returns:
        One seed per channel, in the order given; ``image`` indexes ``images``.
    """

    sel = torch.tensor(list(channels), device=images.device)
    best = None
    width = 1
    for start in range(0, len(images), batch):
        out = dn.output(images[start : start + batch], layer)
        values, pos = image_maxima(out, sel)
        index = torch.arange(start, start + out.shape[0]).expand_as(values)
        part = {"values": values, "index": index, "pos": pos}
        best = merge_topk([part] if best is None else [best, part], 1)
        width = out.shape[-1] if out.dim() == 4 else 1
    if best is None:
        raise ValueError("no image to search")
    pos = best["pos"][:, 0]
    dev = images.device
    y = torch.where(pos >= 0, pos // width, -1).to(dev)
    x = torch.where(pos >= 0, pos % width, -1).to(dev)
    return Seeds(best["index"][:, 0].to(dev), sel, y, x, best["values"][:, 0].to(dev))


def make_seeds(entries: Sequence[tuple[int, int, int, int, float]], device: torch.device | str) -> Seeds:
    """Seeds from ``(image, channel, y, x, value)`` rows (y = x = -1: a vector layer's unit).

    The one place where mining and ``zfvis evolution`` build seeds by hand.
    """
    cols = list(zip(*entries)) if entries else [(), (), (), (), ()]
    ints = [torch.tensor(c, dtype=torch.long, device=device) for c in cols[:4]]
    return Seeds(*ints, torch.tensor(cols[4], dtype=torch.float32, device=device))


Box = tuple[int, int, int, int]


def crop_winners(dn: Deconvnet, images: torch.Tensor, layer: str, seeds: Seeds) -> list[tuple[torch.Tensor, torch.Tensor, Box]]:
    """Projects ``seeds`` of ``layer`` (images indexed within ``images``) and crops.

    Returns, per seed, (projection, image patch, box): both (C, h, w) cropped to the
    seed's receptive field clipped to the image, box = (top, left, bottom, right)
    (:meth:`~zfvis.core.deconvnet.Patches.boxes`).
    """
    rec = dn.record(images, layer)
    patches = dn.reverse(rec, seeds)
    imgs = images.detach().cpu()
    out = []
    for j, (proj, (t, l, b, r)) in enumerate(zip(patches.crops(), patches.boxes())):
        out.append((proj, imgs[int(seeds.image[j]), :, t:b, l:r], (t, l, b, r)))
    return out
