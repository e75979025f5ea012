"""Invariance (Zeiler & Fergus 2014, Fig. 5): how features change as an image is moved.

Each image is translated vertically, scaled or rotated by a range of amounts. For every
amount, :func:`invariance` measures at each requested layer the Euclidean distance
between the feature vector of the transformed image and that of the original, and the
probability the model gives the image's true (or top) class. Small changes in the low
layers that grow with the amount, flatter curves in high layers, and a stable
probability mean the network is invariant to that transformation.

The transformations act on the preprocessed image (model input space) and keep its
size; pixels that come from outside the image take the value ``fill`` (0.0: the data
set's mean colour after normalisation):

* ``translation``: a vertical shift by a whole number of pixels (positive: down);
* ``scale``: a zoom about the centre by a factor (above 1: larger), bilinear;
* ``rotation``: a rotation about the centre by degrees (positive: counter-clockwise
  as displayed), bilinear.

The identity (shift 0, factor 1, angle 0) returns the image unchanged, exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.deconvnet import Deconvnet
from ..core.graph import eval_mode
from ..io import progress as _progress
from ..io.checks import check_model, forward_failure
from ..io.errors import InputTypeError, UserInputError, is_out_of_memory
from ..io.parse import check_fill, check_finite_result, parse_number, representable
from .evolution import ImageBatch

__all__ = ["TRANSFORMS", "InvarianceResult", "invariance", "transform_images", "check_amount"]

#: The transformations :func:`invariance` applies.
TRANSFORMS = ("translation", "scale", "rotation")
_IDENTITY = {"translation": 0.0, "scale": 1.0, "rotation": 0.0}


@dataclasses.dataclass
class InvarianceResult:
    """Feature distances and class probabilities per image and amount of one transformation.

    Attributes:
        transform: ``"translation"``, ``"scale"`` or ``"rotation"``.
        amounts: The amounts (A,): pixels, factors or degrees.
        layers: The layer names, as given.
        distances: For each layer, ``||f(T(x)) - f(x)||`` per image and amount (N, A).
        probability: Probability of each image's target class (N, A).
        targets: Each image's target class (N,).
        base_probability: The target's probability on each untransformed image (N,).
    """

    transform: str
    amounts: torch.Tensor
    layers: list[str]
    distances: dict[str, torch.Tensor]
    probability: torch.Tensor
    targets: torch.Tensor
    base_probability: torch.Tensor


def _check_transform(transform: str) -> str:
    if not isinstance(transform, str):
        raise InputTypeError(f"transform must be a str ({', '.join(TRANSFORMS)}), got {type(transform).__name__}")
    if transform not in TRANSFORMS:
        raise UserInputError(f"unknown transform '{transform}'; use one of {', '.join(TRANSFORMS)}")
    return transform


def check_amount(transform: str, amount: float, dtype: torch.dtype = torch.float32) -> float:
    """An amount of ``transform``, finite and representable in the images' dtype (a scale's inverse too,
    which the sampling grid holds), so that no output becomes NaN or infinite."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise InputTypeError(f"{transform} amounts must be finite numbers, got {amount!r}")
    amount = parse_number(amount, f"{transform} amount", dtype=dtype)
    if transform == "scale" and amount > 0 and not representable(1.0 / amount, dtype):
        raise UserInputError(f"scale factor {amount!r} is too small: its inverse is beyond the images' "
                             f"{str(dtype).replace('torch.', '')}")
    if transform == "translation" and amount != int(amount):
        raise UserInputError(f"translation amounts are whole pixels, got {amount}")
    if transform == "scale" and amount <= 0:
        raise UserInputError(f"scale factors must be positive, got {amount}")
    return float(amount)


def _fill_like(fill: float | torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``fill`` (a float or a (C,) tensor, checked) as a (1, C, 1, 1) tensor like ``images``."""
    fill = check_fill(fill, images.shape[1], images.dtype)
    value = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    return value.expand(images.shape[1]).reshape(1, -1, 1, 1)


def _affine(images: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Samples ``images`` at ``matrix @ (x, y)`` (pixel units about the centre), bilinear."""
    n, _, h, w = images.shape
    half = torch.tensor([w / 2.0, h / 2.0], dtype=images.dtype, device=images.device)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, :, :2] = matrix.to(images) * half[None, :] / half[:, None]  # D^-1 M D in normalised units
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def transform_images(
    images: torch.Tensor | ImageBatch, transform: str, amount: float, *, fill: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """Translates, scales or rotates a batch of images, keeping their size.

    Args:
        images: (N, C, H, W), or one image (C, H, W), floating point, in model input space, or the
            :class:`ImageBatch` that :func:`zfvis.load_images` returns.
        transform: ``"translation"`` (vertical, pixels, positive down), ``"scale"`` (factor,
            about the centre) or ``"rotation"`` (degrees, counter-clockwise as displayed).
        amount: How much.
        fill: Value of the pixels that come from outside the image: a float or a (C,) tensor.

    Returns:
        The transformed images, shaped as given (a copy; the identity returns an exact copy).

    Raises:
        ValueError: Unknown transform, a fractional shift, a factor that is not positive,
            an amount or fill that is not finite or not representable in the images' dtype.
        TypeError: Images that are not a floating-point tensor.
    """
    images = _as_batch(images)
    if not isinstance(images, torch.Tensor):
        raise InputTypeError(f"images must be a torch.Tensor (N, C, H, W) or a zfvis.ImageBatch, got {type(images).__name__}")
    _check_transform(transform)
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        return transform_images(images[None], transform, amount, fill=fill)[0]
    images = _check_images(images)
    amount = check_amount(transform, amount, images.dtype)
    fill = _fill_like(fill, images)
    if amount == _IDENTITY[transform] or (transform == "rotation" and amount % 360 == 0):
        return images.clone()
    if transform == "translation":
        shift, h = int(amount), images.shape[-2]
        out = fill.expand_as(images).clone()
        if abs(shift) < h:
            src = images[..., max(0, -shift) : h - max(0, shift), :]
            out[..., max(0, shift) : max(0, shift) + src.shape[-2], :] = src
        return out
    if transform == "scale":
        matrix = torch.eye(2) / amount
    else:  # counter-clockwise as displayed (y points down): sample the input at R(-angle) p
        a = math.radians(amount)
        matrix = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return _affine(images, matrix.to(torch.float64), fill)


def _as_batch(images: torch.Tensor | ImageBatch) -> torch.Tensor:
    """The tensor of images read by :func:`zfvis.load_images` (an :class:`ImageBatch`)."""
    return images.batch if isinstance(images, ImageBatch) else images


def _check_images(images: torch.Tensor | ImageBatch) -> torch.Tensor:
    images = _as_batch(images)
    if not isinstance(images, torch.Tensor):
        hint = " (an ImageBatch: pass its .batch)" if hasattr(images, "batch") else ""
        raise InputTypeError(f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}{hint}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[0] == 0:
        raise UserInputError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputTypeError(f"images must be a floating-point tensor, got {images.dtype} (convert, e.g. "
                             "images.float() / 255, and preprocess as the model expects)")
    return images


def _targets(targets: Sequence[int] | torch.Tensor | None, logits: object) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserInputError(f"the model's output is {shape}; invariance needs class scores (N, classes)")
    n, classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1).cpu()
    values = targets.tolist() if isinstance(targets, torch.Tensor) else targets
    values = [values] if isinstance(values, int) else values
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputTypeError(f"targets must be class indices (ints), got {targets!r}")
    t = torch.tensor(values, dtype=torch.long).reshape(-1)
    if len(t) == 1:
        t = t.expand(n).clone()
    if len(t) != n:
        raise UserInputError(f"got {len(t)} targets for {n} images; give one per image or one for all")
    bad = [int(v) for v in t if not 0 <= int(v) < classes]
    if bad:
        raise UserInputError(f"target class {bad[0]} is out of range: the model has {classes} classes (0..{classes - 1})")
    return t


def invariance(
    model: nn.Module,
    images: torch.Tensor | ImageBatch,
    transform: str,
    amounts: Sequence[float],
    layers: Sequence[str],
    *,
    targets: Sequence[int] | torch.Tensor | None = None,
    fill: float | torch.Tensor = 0.0,
    batch_size: int = 64,
    progress: bool = False,
) -> InvarianceResult:
    """Feature distances and class probabilities of transformed images (ZF Fig. 5).

    Args:
        model: A classifier returning (N, classes) scores; run in eval mode.
        images: Preprocessed images (N, C, H, W) (or one, (C, H, W)), or the
            :class:`ImageBatch` that :func:`zfvis.load_images` returns.
        transform: ``"translation"``, ``"scale"`` or ``"rotation"`` (see
            :func:`transform_images`).
        amounts: The amounts to apply (pixels, factors or degrees).
        layers: Layer names or aliases whose feature vectors are compared.
        targets: The true class of each image (or one for all); by default each
            untransformed image's most probable class.
        fill: Value of pixels that come from outside the image (model input space): a
            float or a (C,) tensor.
        batch_size: Transformed images per forward pass.
        progress: Show a progress bar over the images.

    Returns:
        An :class:`InvarianceResult`; distances are float64, on the CPU.

    Raises:
        ValueError: Unknown transform or layer, bad amounts or targets, no amounts or layers.
        TypeError: Arguments of the wrong type.
    """
    _check_transform(transform)
    check_model(model)
    images = _check_images(images)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else images.dtype
    amounts = [check_amount(transform, a, dtype) for a in amounts]
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not amounts or not layers:
        raise UserInputError("give at least one amount and one layer")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive int, got {batch_size!r}")
    dn = Deconvnet(model)
    for layer in layers:
        dn.resolve(layer)
    param = next(model.parameters(), None)
    if param is not None:
        images = images.to(device=param.device, dtype=param.dtype)
    fill = _fill_like(fill, images)
    with eval_mode(model), torch.no_grad():
        try:
            logits = model(images)
        except RuntimeError as err:
            if is_out_of_memory(err):
                raise
            raise forward_failure(err, model, images) from err
        target = _targets(targets, logits)
        job = _Job(dn, transform, amounts, layers, fill, batch_size)
        return _measure(job, images, target, progress)


@dataclasses.dataclass
class _Job:
    """The checked settings of one :func:`invariance` call."""

    dn: Deconvnet
    transform: str
    amounts: list[float]
    layers: list[str]
    fill: torch.Tensor
    batch_size: int


def _measure(job: _Job, images: torch.Tensor, target: torch.Tensor, progress: bool) -> InvarianceResult:
    """Each chunk of transformed images runs in one batch with its original, so the
    identity gives exactly the original's features (batch size changes rounding)."""
    n, a = images.shape[0], len(job.amounts)
    dist = {layer: torch.zeros(n, a, dtype=torch.float64) for layer in job.layers}
    prob = torch.zeros(n, a, dtype=torch.float64)
    base = torch.zeros(n, dtype=torch.float64)
    with _progress.progress(n, job.transform, "image", show=progress) as bar:
        for i in range(n):
            moved = torch.cat([transform_images(images[i : i + 1], job.transform, v, fill=job.fill)
                               for v in job.amounts])
            for start in range(0, a, job.batch_size):
                chunk = torch.cat([images[i : i + 1], moved[start : start + job.batch_size]])
                cols = slice(start, start + len(chunk) - 1)
                probs = torch.softmax(job.dn.model(chunk), dim=1)[:, int(target[i])].double().cpu()
                base[i], prob[i, cols] = probs[0], probs[1:]
                feats = job.dn.forward_outputs(chunk, job.layers)
                for layer in job.layers:
                    flat = feats[layer].reshape(len(chunk), -1).double()
                    dist[layer][i, cols] = (flat[1:] - flat[:1]).norm(dim=1).cpu()
            bar.update(1)
    cause = ("the fill or the amounts drive the model's values beyond its dtype; use a fill within the images' "
             "range (0 is the data set's mean colour) and moderate amounts")
    for name, values in [*((f"the distances at '{k}'", v) for k, v in dist.items()), ("the class probability", prob)]:
        check_finite_result(values, name, cause)
    amounts = torch.tensor(job.amounts, dtype=torch.float64)
    return InvarianceResult(job.transform, amounts, job.layers, dist, prob, target, base)
