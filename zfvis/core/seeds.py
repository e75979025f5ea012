"""Seeds and patches: what a reverse pass takes (the activations to project) and gives back
(each projection, cropped to the seed's receptive field)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..io.errors import InputTypeError, UnsupportedModelError, UserInputError
from .reverse import crop_windows

__all__ = ["Seeds", "Patches", "widen", "select_seeds", "check_position"]


@dataclasses.dataclass
class Seeds:
    """Activations to project, one entry each.

    Attributes:
        image: Index of the image in the recorded batch (B,).
        channel: Channel (or unit, for a vector layer) (B,).
        y: Row of the activation (B,); -1 for a whole-map seed or a vector layer.
        x: Column of the activation (B,); -1 likewise.
        value: The activation's value (B,); for a whole-map seed, the map's maximum.
        whole_map: Whether each seed is its channel's whole feature map.
    """

    image: torch.Tensor
    channel: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    value: torch.Tensor
    whole_map: bool = False

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __getitem__(self, index: slice | torch.Tensor) -> Seeds:
        return Seeds(
            self.image[index], self.channel[index], self.y[index], self.x[index], self.value[index], self.whole_map
        )


@dataclasses.dataclass
class Patches:
    """Reverse-pass results cropped to each seed's receptive field.

    Attributes:
        pixels: (B, C, h, w): the projection inside the window of each seed.
        top: First input row of each window (B,).
        left: First input column of each window (B,).
        box: Per seed (top, left, bottom, right) of its receptive field clipped to the
            image (B, 4); the projection is zero outside it.
        image_size: (H, W) of the input images.
    """

    pixels: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    box: torch.Tensor
    image_size: tuple[int, int]

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Each seed's (top, left, bottom, right) receptive-field box as ints."""
        return [tuple(int(v) for v in b) for b in self.box.cpu()]  # type: ignore[misc]

    def crops(self) -> list[torch.Tensor]:
        """Each seed's projection cropped to its box (C, h, w), on the CPU."""
        pixels = self.pixels.detach().cpu()
        out = []
        for j, (t, l, b, r) in enumerate(self.boxes()):
            wt, wl = int(self.top[j]), int(self.left[j])
            out.append(pixels[j, :, t - wt : b - wt, l - wl : r - wl])
        return out

    def full(self) -> torch.Tensor:
        """The projections pasted into zero images of the input size, (B, C, H, W)."""
        return crop_windows(self.pixels, None, -self.top, -self.left, *self.image_size)


def widen(p: Patches, h: int, w: int) -> Patches:
    """The same patches on windows of size (h, w) (zeros added; windows kept in the image)."""
    ph, pw = p.pixels.shape[-2:]
    if (ph, pw) == (h, w):
        return p
    top = torch.minimum(p.top, torch.full_like(p.top, p.image_size[0] - h)).clamp(min=0)
    left = torch.minimum(p.left, torch.full_like(p.left, p.image_size[1] - w)).clamp(min=0)
    pixels = crop_windows(p.pixels, None, top - p.top, left - p.left, h, w)
    return Patches(pixels, top, left, p.box, p.image_size)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_position(position: object, out_shape: tuple[int, ...]) -> tuple[int, int]:
    if (
        not isinstance(position, (tuple, list))
        or len(position) != 2
        or not all(_is_int(v) or (isinstance(v, torch.Tensor) and v.numel() == 1) for v in position)
    ):
        raise InputTypeError(f"position must be a (y, x) pair of ints, got {position!r}")
    y, x = (int(v) for v in position)
    h, w = out_shape[1], out_shape[2]
    if not (0 <= y < h and 0 <= x < w):
        raise UserInputError(f"position ({y}, {x}) is outside the {h}x{w} feature map (0..{h - 1}, 0..{w - 1})")
    return y, x


def _check_channels(channel: int | Sequence[int], count: int, layer: str | None) -> list[int]:
    if _is_int(channel):
        channels = [int(channel)]  # type: ignore[arg-type]
    elif isinstance(channel, (list, tuple, range)) or (isinstance(channel, torch.Tensor) and channel.dim() == 1):
        channels = [int(c) for c in channel]
        if not all(_is_int(c) or isinstance(c, torch.Tensor) for c in channel):
            raise InputTypeError(f"channels must be ints, got {list(channel)!r}")
        if not channels:
            raise UserInputError("channel list is empty")
    else:
        raise InputTypeError(f"channel must be an int or a sequence of ints, got {type(channel).__name__}")
    for c in channels:
        if not 0 <= c < count:
            raise UserInputError(f"channel {c} is out of range: layer '{layer}' has {count} channels (0..{count - 1})")
    return channels


def select_seeds(
    out: torch.Tensor,
    layer: str | None,
    channel: int | Sequence[int],
    position: tuple[int, int] | str | None = None,
    top_k: int | None = None,
) -> Seeds:
    """Chooses seed activations in a layer's output ``out`` (what
    :meth:`zfvis.Deconvnet.select` does; its docstring says how)."""
    if out.dim() not in (2, 4):
        raise UnsupportedModelError(
            f"layer '{layer}' outputs shape {tuple(out.shape)}; zfvis projects (N, C, H, W) maps and (N, F) vectors. "
            "Hint: choose a layer with a feature map or a vector (`zfvis layers` lists each layer's shape)")
    n = out.shape[0]
    channels = _check_channels(channel, out.shape[1], layer)
    m = len(channels)
    dev = out.device
    ch = torch.tensor(channels, device=dev, dtype=torch.long)
    if top_k is not None:
        if not _is_int(top_k) or top_k < 1:
            raise UserInputError(f"top_k must be a positive int, got {top_k!r}")
        if position is not None:
            raise UserInputError("give either position or top_k, not both")
    vector = out.dim() == 2
    if vector:
        if position is not None or (top_k is not None and top_k != 1):
            raise UserInputError(
                f"layer '{layer}' outputs a vector; it has no positions (leave position and top_k unset)"
            )
        img = torch.arange(n, device=dev).repeat_interleave(m)
        chs = ch.repeat(n)
        minus = torch.full_like(img, -1)
        return Seeds(img, chs, minus, minus, out[img, chs])
    h, w = out.shape[2], out.shape[3]
    maps = out[:, ch].reshape(n, m, h * w)
    if isinstance(position, str):
        if position != "all":
            raise UserInputError(f"position must be (y, x), None or 'all', got {position!r}")
        img = torch.arange(n, device=dev).repeat_interleave(m)
        chs = ch.repeat(n)
        minus = torch.full_like(img, -1)
        return Seeds(img, chs, minus, minus, maps.amax(dim=2).reshape(-1), whole_map=True)
    if position is not None:
        y, x = check_position(position, tuple(out.shape[1:]))
        flat = torch.full((n, m, 1), y * w + x, device=dev, dtype=torch.long)
    else:
        k = 1 if top_k is None else top_k
        if k > h * w:
            raise UserInputError(f"top_k={k} exceeds the {h}x{w}={h * w} positions of layer '{layer}'")
        flat = torch.sort(maps, dim=2, descending=True, stable=True).indices[:, :, :k]
    k = flat.shape[2]
    values = torch.gather(maps, 2, flat).reshape(-1)
    img = torch.arange(n, device=dev).view(n, 1, 1).expand(n, m, k).reshape(-1)
    chs = ch.view(1, m, 1).expand(n, m, k).reshape(-1)
    flat = flat.reshape(-1)
    return Seeds(img, chs, flat // w, flat % w, values)
