"""Transformation robustness: small random changes of the image at every step.

An image that excites a unit only at one exact placement is mostly high-frequency noise;
asking it to work under small random jitter, scaling and rotation gives clearer images
(Olah et al. 2017, "Transformation robustness"). Each step, every image in the batch is

1. padded by ``pad`` pixels of grey (0.5) on each side;
2. scaled by a factor from ``scales`` and rotated by an angle in ``[-degrees, degrees]`` about
   its centre (one bilinear resampling, :func:`rotate_scale`);
3. cropped back to its own size at a random offset, ``0..2 * pad`` pixels from each corner
   (:func:`jitter`): a shift of up to ``pad`` pixels each way.

The output has the input's size, so any model (including one with a fixed input size) takes it.
Defaults grow with the image: ``pad`` and the shift are a sixteenth of its side (2 pixels at
32x32, 14 at 224x224).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ...io.checks import check_int, check_number
from ...io.errors import UserInputError

__all__ = ["Robustness", "pad", "jitter", "rotate_scale"]

#: The grey that pads the image, in [0, 1] RGB.
PAD_VALUE = 0.5


def pad(x: torch.Tensor, width: int, value: float = PAD_VALUE) -> torch.Tensor:
    """Pads ``x`` (N, C, H, W) by ``width`` pixels of ``value`` on every side."""
    return F.pad(x, (width, width, width, width), mode="constant", value=value) if width else x


def jitter(x: torch.Tensor, offsets: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crops ``size`` (h, w) from each image of ``x`` (N, C, H, W) at its own top-left offset
    (N, 2): image ``i`` becomes ``x[i, :, dy:dy + h, dx:dx + w]``."""
    h, w = size
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (N, h)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (N, w)
    n, c = x.shape[:2]
    idx_r = rows[:, None, :, None].expand(n, c, h, x.shape[3])
    picked = x.gather(2, idx_r)  # (N, C, h, W)
    idx_c = cols[:, None, None, :].expand(n, c, h, w)
    return picked.gather(3, idx_c)


def rotate_scale(x: torch.Tensor, degrees: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rotates each image (counter-clockwise as displayed, by ``degrees`` (N,)) and scales it
    (by ``scales`` (N,), above 1 larger) about its centre, bilinearly; points from outside
    take :data:`PAD_VALUE`. Angle 0 and scale 1 return the image unchanged."""
    n, _, h, w = x.shape
    theta = degrees.to(x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(theta) / scales.to(x.dtype), torch.sin(theta) / scales.to(x.dtype)
    aspect = h / w  # the grid's x and y units differ on a non-square image
    zero = torch.zeros_like(cos)
    mat = torch.stack([torch.stack([cos, -sin * aspect, zero], 1), torch.stack([sin / aspect, cos, zero], 1)], 1)
    grid = F.affine_grid(mat, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x - PAD_VALUE, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + PAD_VALUE


@dataclasses.dataclass(frozen=True)
class Robustness:
    """The random transformations applied at each step (see the module's docstring).

    Attributes:
        pad: Pixels of grey on each side, and the largest shift each way (``None``: a sixteenth
            of the image side, at least 1).
        scales: Scale factors drawn from uniformly (Lucid's 0.9 .. 1.1).
        degrees: Largest rotation each way.
    """

    pad: int | None = None
    scales: tuple[float, ...] = tuple(1.0 + (i - 5) / 50.0 for i in range(11))
    degrees: float = 10.0

    def __post_init__(self) -> None:
        if self.pad is not None:
            check_int("transforms pad", self.pad, 0)
        if not self.scales:
            raise UserInputError("transforms scales must hold at least one factor")
        for s in self.scales:
            check_number("transforms scale", s, 0.0, above=True)
        check_number("transforms degrees", self.degrees, 0.0)

    def width(self, size: tuple[int, int]) -> int:
        """The padding (and largest shift) for images of ``size``."""
        return self.pad if self.pad is not None else max(1, round(min(size) / 16))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The transformed batch (same shape); draws from ``generator`` (a CPU generator)."""
        n, _, h, w = x.shape
        p = self.width((h, w))
        pick = torch.randint(len(self.scales), (n,), generator=generator)
        scales = torch.tensor(self.scales, dtype=torch.float64)[pick]
        degrees = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * self.degrees
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator)
        y = pad(x, p)
        if self.degrees > 0 or any(s != 1.0 for s in self.scales):
            y = rotate_scale(y, degrees.to(x.device), scales.to(x.device))
        return jitter(y, offsets.to(x.device), (h, w))
