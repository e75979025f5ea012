"""Image parameterisations: what the optimiser changes, and how it becomes an RGB image.

Two parameterisations (Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017):

* ``"fourier"``: the image's real 2-D Fourier coefficients (``torch.fft.rfft2``, orthonormal),
  each scaled by ``1 / max(frequency, 1 / max(H, W)) ** decay`` so that every frequency moves
  about as fast in the optimisation (a whitened space: natural images have a 1/f spectrum),
  then a fixed colour matrix that turns decorrelated colour channels into RGB, then a sigmoid
  to [0, 1];
* ``"pixel"``: one number per pixel and colour, a sigmoid to [0, 1] (the plain gradient ascent
  of Erhan et al. 2009, as Zeiler & Fergus contrast it with the deconvnet).

Every step is invertible on its range (:func:`image_to_params`), which the tests check.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "COLOR_CORRELATION",
    "PARAMS",
    "ImageParam",
    "color_matrix",
    "decorrelated_to_rgb",
    "rgb_to_decorrelated",
    "fourier_scale",
    "spectrum_to_image",
    "image_to_spectrum",
    "image_to_params",
]

#: The parameterisations :func:`zfvis.feature_vis` knows.
PARAMS = ("fourier", "pixel")

#: The square root of ImageNet's colour correlation (Lucid's ``color_correlation_svd_sqrt``):
#: its columns map decorrelated colour channels to RGB.
COLOR_CORRELATION = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))

#: Lucid's divisor of the Fourier image, which keeps the first steps' images in the sigmoid's linear range.
_FOURIER_DIVISOR = 4.0


def color_matrix(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """:data:`COLOR_CORRELATION` divided by its largest column norm (3, 3)."""
    m = torch.tensor(COLOR_CORRELATION, dtype=torch.float64)
    m = m / m.norm(dim=0).max()
    return m.to(dtype=dtype, device=device)


def decorrelated_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Decorrelated colour channels (N, 3, H, W) to correlated RGB (before the sigmoid)."""
    return torch.einsum("ij,njhw->nihw", color_matrix(x.dtype, x.device), x)


def rgb_to_decorrelated(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`decorrelated_to_rgb`."""
    inv = torch.linalg.inv(color_matrix(torch.float64, x.device)).to(x.dtype)
    return torch.einsum("ij,njhw->nihw", inv, x)


def fourier_scale(height: int, width: int, decay: float = 1.0, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """The scale of each real-FFT coefficient (H, W // 2 + 1): ``1 / max(f, 1 / max(H, W)) ** decay``,
    ``f`` the frequency in cycles per pixel."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    freq = torch.sqrt(fx * fx + fy * fy).clamp(min=1.0 / max(height, width))
    return (1.0 / freq**decay).to(dtype=dtype, device=device)


def spectrum_to_image(spectrum: torch.Tensor, scale: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Fourier parameters (N, 3, H, W // 2 + 1, 2) (real, imaginary) to an image (N, 3, H, W)
    in decorrelated colour space."""
    coeffs = torch.view_as_complex(spectrum.contiguous()) * scale
    return torch.fft.irfft2(coeffs, s=size, norm="ortho") / _FOURIER_DIVISOR


def image_to_spectrum(image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`spectrum_to_image`: the Fourier parameters of an image."""
    coeffs = torch.fft.rfft2(image * _FOURIER_DIVISOR, norm="ortho") / scale
    return torch.view_as_real(coeffs).contiguous()


def image_to_params(rgb: torch.Tensor, kind: str, decay: float = 1.0) -> torch.Tensor:
    """The parameters whose image is ``rgb`` (N, 3, H, W), values strictly inside (0, 1):
    the inverse of :meth:`ImageParam.image` (the logit, the inverse colour matrix, the forward FFT)."""
    logits = torch.logit(rgb)
    if kind == "pixel":
        return logits
    h, w = rgb.shape[-2:]
    scale = fourier_scale(h, w, decay, dtype=rgb.dtype, device=rgb.device)
    return image_to_spectrum(rgb_to_decorrelated(logits), scale)


@dataclasses.dataclass
class ImageParam:
    """A batch of images to optimise: the parameters and how they become RGB.

    Attributes:
        kind: ``"fourier"`` or ``"pixel"``.
        params: The leaf tensor the optimiser changes.
        size: (H, W) of the images.
        decay: The Fourier scale's power of the frequency.
    """

    kind: str
    params: torch.Tensor
    size: tuple[int, int]
    decay: float = 1.0

    @classmethod
    def random(cls, kind: str, n: int, size: tuple[int, int], *, generator: torch.Generator, sd: float = 0.01,
               decay: float = 1.0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> ImageParam:  # fmt: skip
        """``n`` images of nearly uniform grey: parameters drawn from N(0, sd^2) with ``generator`` (on the CPU,
        so a seed gives the same images on every device)."""
        h, w = size
        shape = (n, 3, h, w // 2 + 1, 2) if kind == "fourier" else (n, 3, h, w)
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * sd
        return cls(kind, values.to(dtype=dtype, device=device).requires_grad_(True), (h, w), decay)

    def image(self, params: torch.Tensor | None = None) -> torch.Tensor:
        """The RGB images (N, 3, H, W) in [0, 1] (of ``params``, default the own)."""
        p = self.params if params is None else params
        if self.kind == "pixel":
            return torch.sigmoid(p)
        scale = fourier_scale(*self.size, self.decay, dtype=p.dtype, device=p.device)
        return torch.sigmoid(decorrelated_to_rgb(spectrum_to_image(p, scale, self.size)))
