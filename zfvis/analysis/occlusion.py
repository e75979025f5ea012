"""Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7): does the network look at the object?

A square of a constant colour (the occluder) slides over the image. At each position the
model runs on the occluded image, and :func:`occlusion` records the probability of a
target class, the most probable class and, for a chosen layer, the total activation of
one of its feature maps.

Two methods give the same numbers:

* ``"full"``: occlude, run the whole model and take the softmax, batched over positions.
* ``"incremental"``: the engine's torch.fx graph of the model runs once on the
  unoccluded image, caching every layer. An occluder changes only the part of each
  layer's input inside its forward cone, so for each position only that window of each
  layer is recomputed (from the window of its input that the kernel reads, the halo),
  batched across positions, until the window covers the whole map; from there the batch
  runs as ordinary inference. Which operations have incremental rules is the op table's
  knowledge, the same the deconvnet's windows follow (:mod:`zfvis.core.ops`): every
  operation of one position (activations, batch norm in eval mode, dropout, identity,
  local response normalisation, elementwise arithmetic such as ``x + y`` of residual
  blocks, channel concatenation) and every sliding window (convolutions, max-, average-
  and adaptive average-pooling, as modules or functions); any other operation switches
  the batch to full recomputation from that operation on, so the result stays exact
  (:mod:`zfvis.analysis.incremental`). This is
  Krypton's incremental inference (Nakandala et al., SIGMOD 2019).

``"auto"`` (the default) uses the incremental method where the engine can trace the
model (and the model does not overwrite in place a tensor it reads again), the full one
otherwise.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.deconvnet import Deconvnet
from ..core.graph import eval_mode
from ..core.model_state import kept_buffers
from ..io import progress as _progress
from ..io.checks import check_model
from ..io.errors import InputTypeError, UnsupportedModelError, UserInputError
from ..io.parse import check_fill, check_finite_result
from .incremental import IncrementalOcclusion, NotIncremental, map_totals

__all__ = ["OcclusionResult", "occlusion", "occlude", "occluder_positions", "check_boxes", "METHODS"]

#: Accepted values of ``method``.
METHODS = ("auto", "incremental", "full")
#: Positions per batch when ``batch_size`` is not given.
DEFAULT_BATCH = 32

Box = tuple[int, int, int, int]


@dataclasses.dataclass
class OcclusionResult:
    """What :func:`occlusion` measured, one value per occluder position.

    Maps are ``(rows, cols)`` tensors on the CPU: entry ``[i, j]`` belongs to the occluder
    whose top-left corner is ``(tops[i], lefts[j])``.

    Attributes:
        class_prob: Softmax probability of ``target`` (float).
        top_class: The most probable class (long).
        top_prob: Its probability (float).
        activation: Total activation of feature map ``channel`` of ``layer`` (the sum over
            the map; the unit's value for a vector layer), or ``None`` without a layer.
        tops: Occluder top rows (rows,).
        lefts: Occluder left columns (cols,).
        patch: Occluder (height, width).
        stride: Step between positions (rows, columns).
        target: The class whose probability ``class_prob`` holds.
        layer: The layer name as given, or ``None``.
        channel: The feature map of ``layer``, or ``None``.
        base_prob: Probability of ``target`` on the unoccluded image.
        base_class: Most probable class on the unoccluded image.
        base_activation: The feature map's total activation on the unoccluded image.
        method: ``"incremental"`` or ``"full"``: how it was computed.
        image_size: (H, W) of the image.
    """

    class_prob: torch.Tensor
    top_class: torch.Tensor
    top_prob: torch.Tensor
    activation: torch.Tensor | None
    tops: torch.Tensor
    lefts: torch.Tensor
    patch: tuple[int, int]
    stride: tuple[int, int]
    target: int
    layer: str | None
    channel: int | None
    base_prob: float
    base_class: int
    base_activation: float | None
    method: str
    image_size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the maps."""
        return (len(self.tops), len(self.lefts))

    def box(self, i: int, j: int) -> Box:
        """(top, left, bottom, right) of the occluder at map entry ``[i, j]``."""
        t, l = int(self.tops[i]), int(self.lefts[j])
        return (t, l, t + self.patch[0], l + self.patch[1])


# ----------------------------------------------------------------------------- checks


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, each at least ``minimum``."""
    pair = (value, value) if _is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_is_int(v) for v in pair):
        raise InputTypeError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise UserInputError(f"{name} must be at least {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_image(image: object) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise InputTypeError(f"image must be a torch.Tensor (C, H, W), got {type(image).__name__}")
    if image.dim() != 3:
        hint = " (pass one image: images[0])" if image.dim() == 4 else ""
        raise UserInputError(f"image must have shape (C, H, W), got {tuple(image.shape)}{hint}")
    if not image.is_floating_point():
        raise InputTypeError(f"image must be a floating-point tensor, got {image.dtype}")
    return image


def _check_fill(fill: float | torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The occluder colour as a (C,) tensor like the image."""
    c = image.shape[0]
    fill = check_fill(fill, c, image.dtype)
    if isinstance(fill, torch.Tensor):
        return fill.detach().to(image).reshape(-1).expand(c).clone()
    return torch.full((c,), float(fill), dtype=image.dtype, device=image.device)


def occluder_positions(
    image_size: Sequence[int], patch: int | Sequence[int], stride: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top rows and left columns of the occluder: ``i * stride`` for i = 0 .. (H - patch) // stride.

    Args:
        image_size: (H, W).
        patch: Occluder side, or (height, width).
        stride: Step, or (rows, columns).

    Returns:
        ``(tops, lefts)``, long tensors.

    Raises:
        ValueError: A patch larger than the image, or a stride below 1.
        TypeError: Arguments that are not ints or pairs of ints.
    """
    ph, pw = _pair(patch, "patch", 1)
    sh, sw = _pair(stride, "stride", 1)
    h, w = int(image_size[-2]), int(image_size[-1])
    if ph > h or pw > w:
        raise UserInputError(f"patch {ph}x{pw} is larger than the {h}x{w} image")
    return torch.arange(0, h - ph + 1, sh), torch.arange(0, w - pw + 1, sw)


def _is_integral(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _kind(value: object) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def check_boxes(boxes: object) -> list[Box]:
    """Boxes as lists of four ints (a tensor (N, 4) or a sequence of 4-sequences)."""
    rows = boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes
    if not isinstance(rows, (list, tuple)):
        raise InputTypeError(f"boxes must be a sequence of (top, left, bottom, right), got {type(boxes).__name__}")
    for b in rows:
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(_is_integral(v) for v in b):
            raise InputTypeError(f"each box must be 4 ints (top, left, bottom, right), got {b!r}")
    return [tuple(int(v) for v in b) for b in rows]  # type: ignore[misc]


def occlude(images: torch.Tensor, boxes: Sequence[Box] | torch.Tensor, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Copies of ``images`` with box ``k`` of image ``k`` set to ``fill``.

    Args:
        images: (N, C, H, W), or one image (C, H, W) to occlude once per box.
        boxes: N boxes (top, left, bottom, right), bottom/right exclusive.
        fill: A float or a (C,) tensor, in the images' (model input) space.

    Returns:
        The occluded images (N, C, H, W); ``images`` is not changed.

    Raises:
        ValueError: A box outside the image, or box and image counts that differ.
        TypeError: Images that are not a floating-point tensor, boxes that are not 4 ints.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise InputTypeError(f"images must be a floating-point torch.Tensor, got {_kind(images)}")
    boxes = check_boxes(boxes)
    if not boxes:
        raise UserInputError("boxes is empty: give at least one box (top, left, bottom, right)")
    if images.dim() == 3:
        images = images.unsqueeze(0).expand(len(boxes), -1, -1, -1)
    if images.dim() != 4 or len(boxes) != images.shape[0]:
        raise UserInputError(f"got {len(boxes)} boxes for images of shape {tuple(images.shape)}")
    colour = _check_fill(fill, images[0]).view(-1, 1, 1)
    out = images.clone()
    h, w = images.shape[-2:]
    for k, (t, l, b, r) in enumerate(boxes):
        if not (0 <= t < b <= h and 0 <= l < r <= w):
            raise UserInputError(f"box {(t, l, b, r)} (top, left, bottom, right) is outside the {h}x{w} image or empty")
        out[k, :, t:b, l:r] = colour
    return out


def _strongest(out: torch.Tensor) -> int:
    """The channel with the largest activation anywhere in image 0's output."""
    return int(out[0].reshape(out.shape[1], -1).amax(dim=1).argmax())


# ----------------------------------------------------------------------------- API


@dataclasses.dataclass
class _Job:
    """The checked arguments of one :func:`occlusion` call.

    Attributes:
        model: The classifier.
        dn: The engine on the model, or ``None`` where it cannot trace the model.
        image: The image (C, H, W) on the model's device and dtype.
        tops: Occluder top rows (rows,).
        lefts: Occluder left columns (cols,).
        patch: Occluder (height, width).
        stride: Step (rows, columns).
        fill: Occluder colour (C,).
        batch: Positions per batch.
        method: ``auto``, ``incremental`` or ``full``.
        layer: The layer as given, or ``None``.
        node: The engine's name for it.
    """

    model: nn.Module
    dn: Deconvnet | None
    image: torch.Tensor
    tops: torch.Tensor
    lefts: torch.Tensor
    patch: tuple[int, int]
    stride: tuple[int, int]
    fill: torch.Tensor
    batch: int
    method: str
    layer: str | None
    node: str | None

    @property
    def grid(self) -> torch.Tensor:
        """Every occluder's top-left corner (P, 2), row by row, on the image's device."""
        return torch.cartesian_prod(self.tops, self.lefts).to(self.image.device)


def occlusion(
    model: nn.Module,
    image: torch.Tensor,
    *,
    patch: int | Sequence[int],
    stride: int | Sequence[int],
    fill: float | torch.Tensor = 0.0,
    target: int | None = None,
    layer: str | None = None,
    channel: int | None = None,
    batch_size: int | None = None,
    method: str = "auto",
    progress: bool = False,
) -> OcclusionResult:
    """Slides an occluder over ``image`` and measures the model at every position.

    Args:
        model: A classifier returning (N, classes) scores; run in eval mode, not changed.
        image: One preprocessed image (C, H, W) (moved to the model's device and dtype).
        patch: Occluder side, or (height, width), in pixels.
        stride: Step between positions, or (rows, columns). Top-left corners are
            ``(i * stride, j * stride)`` for i = 0 .. (H - patch) // stride, and likewise
            for columns.
        fill: Occluder colour in the model's input space: a float or a (C,) tensor (0.0
            is the data set's mean colour after normalisation).
        target: Class whose probability is mapped; by default the unoccluded image's most
            probable class.
        layer: A layer name or alias (see :meth:`zfvis.Deconvnet.layer_names`) whose
            feature map's total activation is mapped too.
        channel: That feature map; by default the one with the strongest activation on
            the unoccluded image.
        batch_size: Positions per batch (default 32).
        method: ``"auto"``, ``"incremental"`` or ``"full"`` (see the module's docstring).
        progress: Show a progress bar over the positions.

    Returns:
        An :class:`OcclusionResult`.

    Raises:
        ValueError: A patch larger than the image, a stride or batch size below 1, a
            target or channel out of range, an unknown layer or method, or a model whose
            output is not (N, classes); ``method="incremental"`` (or a ``layer``) on a
            model the engine cannot trace, or ``method="incremental"`` on one that
            overwrites in place a tensor it reads again.
        TypeError: Arguments of the wrong type.
    """
    job = _check(model, image, patch=patch, stride=stride, fill=fill, batch_size=batch_size, method=method, layer=layer)
    with eval_mode(model), torch.no_grad(), kept_buffers(job.model):  # a forward may count its calls in a buffer
        runner = _make_runner(job)
        target = _check_target(target, runner.base_logits)
        channel = _check_channel(channel, runner.base_layer, layer)
        logits, acts = _run_all(runner, job, channel, progress)
    return _result(runner, job, logits, acts, target, channel)


def _check(model: object, image: object, *, patch: object, stride: object, fill: object, batch_size: object,
           method: object, layer: object) -> _Job:  # fmt: skip
    """Checks the arguments of :func:`occlusion` (all but those the unoccluded pass decides)."""
    model = check_model(model)
    image = _check_image(image)
    _check_per_image(model)
    param = next(model.parameters(), None)
    if param is not None:
        image = image.to(device=param.device, dtype=param.dtype)
    tops, lefts = occluder_positions(image.shape, patch, stride)  # type: ignore[arg-type]
    batch = DEFAULT_BATCH if batch_size is None else batch_size
    if not _is_int(batch) or batch < 1:  # type: ignore[operator]
        raise UserInputError(f"batch_size must be a positive int, got {batch_size!r}")
    if method not in METHODS:
        raise UserInputError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    if layer is not None and not isinstance(layer, str):
        raise InputTypeError(f"layer must be a str, got {type(layer).__name__}")
    dn = _engine(model, method, layer)  # type: ignore[arg-type]
    node = dn.resolve(layer) if dn is not None and layer is not None else None
    return _Job(model, dn, image, tops, lefts, _pair(patch, "patch", 1), _pair(stride, "stride", 1),
                _check_fill(fill, image), batch, method, layer, node)  # type: ignore[arg-type]


def _check_per_image(model: nn.Module) -> None:
    """Refuses a model whose eval-mode output for one image depends on the rest of its batch
    (batch norm without running statistics): each position's result would depend on ``batch_size``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise UnsupportedModelError(
                f"module '{name}' ({type(m).__name__}) has no running statistics (track_running_stats=False): it "
                "normalises with each batch's statistics even in eval mode, so occlusion results would depend on "
                "batch_size. Hint: use a model whose batch norms track running statistics"
            )


def _engine(model: nn.Module, method: str, layer: str | None) -> Deconvnet | None:
    """The engine on ``model`` (it names the layers and holds the graph the incremental
    method runs), or ``None`` where it cannot trace the model and neither needs it."""
    try:
        return Deconvnet(model)
    except UnsupportedModelError as err:
        if layer is not None or method == "incremental":
            need = "method='incremental'" if layer is None else f"layer='{layer}'"
            raise UserInputError(f"{need} needs a model the engine can trace: {str(err).splitlines()[0]}") from None
        return None


def _check_target(target: int | None, base_logits: Any) -> int:
    if not isinstance(base_logits, torch.Tensor) or base_logits.dim() != 2 or base_logits.shape[0] != 1:
        shape = tuple(base_logits.shape) if isinstance(base_logits, torch.Tensor) else type(base_logits).__name__
        raise UserInputError(f"the model's output for one image is {shape}; occlusion needs class scores (1, classes)")
    n = base_logits.shape[1]
    if target is None:
        return int(base_logits[0].argmax())
    if not _is_int(target):
        raise InputTypeError(f"target must be a class index (int), got {type(target).__name__}")
    if not 0 <= target < n:
        raise UserInputError(f"target class {target} is out of range: the model has {n} classes (0..{n - 1})")
    return int(target)


def _check_channel(channel: int | None, base_layer: torch.Tensor | None, layer: str | None) -> int | None:
    if base_layer is None:
        if channel is not None:
            raise UserInputError("channel needs a layer: pass layer= too")
        return None
    if channel is None:
        return _strongest(base_layer)
    if not _is_int(channel):
        raise InputTypeError(f"channel must be an int, got {type(channel).__name__}")
    count = base_layer.shape[1]
    if not 0 <= channel < count:
        raise UserInputError(f"channel {channel} is out of range: layer '{layer}' has {count} channels (0..{count - 1})")
    return int(channel)


def _make_runner(job: _Job) -> _FullRunner | IncrementalOcclusion:
    """Runs the unoccluded pass with the method ``job.method`` asks for."""
    try:
        if job.method != "full" and job.dn is not None:
            try:
                return IncrementalOcclusion(job.dn.graph, job.image, job.node, job.grid, job.patch, job.fill)
            except NotIncremental as err:
                if job.method == "incremental":
                    raise UserInputError(f"{err}; use method='full'") from None
        return _FullRunner(job)
    except RuntimeError as err:  # the unoccluded pass: shapes that do not fit the model
        if "out of memory" in str(err).lower():
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserInputError(f"the forward pass failed on an image of shape {tuple(job.image.shape)}: {first} "
                             "(does the model expect another input size or channel count?)") from err


def _run_all(runner: _FullRunner | IncrementalOcclusion, job: _Job, channel: int | None, progress: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Runs every position batch; returns logits (P, K) and activations (P,)."""
    grid = job.grid
    logits, acts = [], []
    with _progress.progress(len(grid), "occlusion", "pos", show=progress) as bar:
        for start in range(0, len(grid), job.batch):
            idx = torch.arange(start, min(start + job.batch, len(grid)), device=grid.device)
            out, act = runner.run(idx, channel)
            logits.append(out)
            if act is not None:
                acts.append(act)
            bar.update(len(idx))
    return torch.cat(logits), (torch.cat(acts) if acts else None)


def _result(runner: _FullRunner | IncrementalOcclusion, job: _Job, logits: torch.Tensor, acts: torch.Tensor | None,
            target: int, channel: int | None) -> OcclusionResult:  # fmt: skip
    rows, cols = len(job.tops), len(job.lefts)
    cause = "the fill drives the model's values beyond its dtype; use a fill within the image's range"
    check_finite_result(logits, "the occluded images' class scores", cause)
    if acts is not None:
        check_finite_result(acts, "the feature map's totals", cause)
    probs = torch.softmax(logits, dim=1)
    top_prob, top_class = probs.max(dim=1)
    base_probs = torch.softmax(runner.base_logits, dim=1)[0]
    base_act = None
    if runner.base_layer is not None and channel is not None:
        base_act = float(map_totals(runner.base_layer, channel)[0])
    return OcclusionResult(
        class_prob=probs[:, target].reshape(rows, cols).cpu(),
        top_class=top_class.reshape(rows, cols).cpu(),
        top_prob=top_prob.reshape(rows, cols).cpu(),
        activation=None if acts is None else acts.reshape(rows, cols).cpu(),
        tops=job.tops,
        lefts=job.lefts,
        patch=job.patch,
        stride=job.stride,
        target=target,
        layer=job.layer,
        channel=channel,
        base_prob=float(base_probs[target]),
        base_class=int(base_probs.argmax()),
        base_activation=base_act,
        method=runner.method,
        image_size=(int(job.image.shape[-2]), int(job.image.shape[-1])),
    )


class _FullRunner:
    """Occlude, run the whole model (and the engine up to the layer), batched."""

    method = "full"

    def __init__(self, job: _Job) -> None:
        self.job = job
        image = job.image[None]
        self.base_logits = job.model(image)
        self.base_layer = None if job.node is None else job.dn.output(image, job.node)  # type: ignore[union-attr]

    def run(self, idx: torch.Tensor, channel: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, K) and the layer's channel totals (B,) for positions ``idx``."""
        job = self.job
        ph, pw = job.patch
        boxes = [(t, l, t + ph, l + pw) for t, l in job.grid[idx].tolist()]
        x = occlude(job.image, boxes, job.fill)
        acts = None
        if job.node is not None and channel is not None:
            acts = map_totals(job.dn.output(x, job.node), channel)  # type: ignore[union-attr]
        return job.model(x), acts
