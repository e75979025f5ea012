"""Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7): does the network look at the object?

A square of a constant colour (the occluder) slides over the image. At each position the
model runs on the occluded image, and :func:`occlusion` records the probability of a
target class, the most probable class and, for a chosen layer, the total activation of
one of its feature maps.

Two methods give the same numbers:

* ``"full"``: occlude, run the whole model and take the softmax, batched over positions.
* ``"incremental"``: the model is traced with :mod:`torch.fx` and the unoccluded forward
  pass is cached. An occluder changes only the part of each layer's input inside its
  forward cone, so for each position only that window of each layer is recomputed (from
  the window of its input that the kernel reads, the halo), batched across positions,
  until the window covers the whole map; from there the batch runs as ordinary inference.
  Convolutions, max- and average-pooling, batch norm (eval), ReLU and other pointwise
  activations, dropout, identity, local response normalisation, elementwise arithmetic
  (``x + y`` of residual blocks) and channel concatenation have incremental rules. Any
  other operation switches the batch to full recomputation from that operation on, so
  the result stays exact. This is Krypton's incremental inference (Nakandala et al.,
  SIGMOD 2019).

``"auto"`` (the default) uses the incremental method where the model can be traced and
the full one otherwise.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .engine import Deconvnet
from .errors import UserInputError
from .graph import eval_mode

__all__ = ["OcclusionResult", "occlusion", "occlude", "occluder_positions", "METHODS"]

#: Accepted values of ``method``.
METHODS = ("auto", "incremental", "full")
#: Positions per batch when ``batch_size`` is not given.
DEFAULT_BATCH = 32

Box = tuple[int, int, int, int]
_BIG = 1 << 40  # an empty region is (BIG, -BIG, BIG, -BIG): unions with min/max just work


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
        raise TypeError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise UserInputError(f"{name} must be at least {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_image(image: object) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor (C, H, W), got {type(image).__name__}")
    if image.dim() != 3:
        hint = " (pass one image: images[0])" if image.dim() == 4 else ""
        raise UserInputError(f"image must have shape (C, H, W), got {tuple(image.shape)}{hint}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating-point tensor, got {image.dtype}")
    return image


def _check_fill(fill: float | torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The occluder colour as a (C,) tensor like the image."""
    c = image.shape[0]
    if isinstance(fill, torch.Tensor):
        if fill.dim() > 1 or fill.numel() not in (1, c):
            raise UserInputError(f"fill must be a float or a ({c},) tensor, got shape {tuple(fill.shape)}")
        return fill.detach().to(image).reshape(-1).expand(c).clone()
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise TypeError(f"fill must be a float or a (C,) tensor, got {type(fill).__name__}")
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
    """
    boxes = [tuple(int(v) for v in b) for b in (boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes)]
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


def _totals(out: torch.Tensor, channel: int) -> torch.Tensor:
    """Per image, the sum of feature map ``channel`` (or the unit's value for a vector)."""
    return out[:, channel].reshape(out.shape[0], -1).sum(dim=1)


def _strongest(out: torch.Tensor) -> int:
    """The channel with the largest activation anywhere in image 0's output."""
    return int(out[0].reshape(out.shape[1], -1).amax(dim=1).argmax())


# ----------------------------------------------------------------------------- API


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
            output is not (N, classes); ``method="incremental"`` on a model torch.fx
            cannot trace.
        TypeError: Arguments of the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    image = _check_image(image)
    param = next(model.parameters(), None)
    if param is not None:
        image = image.to(device=param.device, dtype=param.dtype)
    tops, lefts = occluder_positions(image.shape, patch, stride)
    patch_hw, stride_hw = _pair(patch, "patch", 1), _pair(stride, "stride", 1)
    colour = _check_fill(fill, image)
    batch = DEFAULT_BATCH if batch_size is None else batch_size
    if not _is_int(batch) or batch < 1:
        raise UserInputError(f"batch_size must be a positive int, got {batch_size!r}")
    if method not in METHODS:
        raise UserInputError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    dn = Deconvnet(model) if layer is not None else None  # the engine names layers; not needed without one
    layer_name = dn.resolve(layer) if dn is not None else None
    grid = torch.cartesian_prod(tops, lefts).to(image.device)
    with eval_mode(model), torch.no_grad():
        try:
            runner = _make_runner(model, dn, image, layer_name, grid, patch_hw, colour, method)
        except RuntimeError as err:  # the unoccluded pass: shapes that do not fit the model
            if "out of memory" in str(err).lower():
                raise
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserInputError(f"the forward pass failed on an image of shape {tuple(image.shape)}: {first} "
                                 "(does the model expect another input size or channel count?)") from err
        logits, acts, channel, target = _run_all(runner, grid, batch, target, channel, layer, progress)
    return _result(runner, logits, acts, tops, lefts, patch_hw, stride_hw, target, layer, channel, image)


def _check_target(target: int | None, base_logits: Any) -> int:
    if not isinstance(base_logits, torch.Tensor) or base_logits.dim() != 2 or base_logits.shape[0] != 1:
        shape = tuple(base_logits.shape) if isinstance(base_logits, torch.Tensor) else type(base_logits).__name__
        raise UserInputError(f"the model's output for one image is {shape}; occlusion needs class scores (1, classes)")
    n = base_logits.shape[1]
    if target is None:
        return int(base_logits[0].argmax())
    if not _is_int(target):
        raise TypeError(f"target must be a class index (int), got {type(target).__name__}")
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
        raise TypeError(f"channel must be an int, got {type(channel).__name__}")
    count = base_layer.shape[1]
    if not 0 <= channel < count:
        raise UserInputError(f"channel {channel} is out of range: layer '{layer}' has {count} channels (0..{count - 1})")
    return int(channel)


def _run_all(
    runner: _FullRunner | _Incremental,
    grid: torch.Tensor,
    batch: int,
    target: int | None,
    channel: int | None,
    layer: str | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, int | None, int]:
    """Runs every position batch; returns logits (P, K), activations (P,), channel, target."""
    from tqdm.auto import tqdm

    target = _check_target(target, runner.base_logits)
    channel = _check_channel(channel, runner.base_layer, layer)
    logits, acts = [], []
    with tqdm(total=len(grid), unit="pos", desc="occlusion", disable=not progress, leave=False) as bar:
        for start in range(0, len(grid), batch):
            idx = torch.arange(start, min(start + batch, len(grid)), device=grid.device)
            out, act = runner.run(idx, channel)
            logits.append(out)
            if act is not None:
                acts.append(act)
            bar.update(len(idx))
    return torch.cat(logits), (torch.cat(acts) if acts else None), channel, target


def _result(
    runner: _FullRunner | _Incremental,
    logits: torch.Tensor,
    acts: torch.Tensor | None,
    tops: torch.Tensor,
    lefts: torch.Tensor,
    patch: tuple[int, int],
    stride: tuple[int, int],
    target: int,
    layer: str | None,
    channel: int | None,
    image: torch.Tensor,
) -> OcclusionResult:
    rows, cols = len(tops), len(lefts)
    probs = torch.softmax(logits, dim=1)
    top_prob, top_class = probs.max(dim=1)
    base_probs = torch.softmax(runner.base_logits, dim=1)[0]
    base_act = None
    if runner.base_layer is not None and channel is not None:
        base_act = float(_totals(runner.base_layer, channel)[0])
    return OcclusionResult(
        class_prob=probs[:, target].reshape(rows, cols).cpu(),
        top_class=top_class.reshape(rows, cols).cpu(),
        top_prob=top_prob.reshape(rows, cols).cpu(),
        activation=None if acts is None else acts.reshape(rows, cols).cpu(),
        tops=tops,
        lefts=lefts,
        patch=patch,
        stride=stride,
        target=target,
        layer=layer,
        channel=channel,
        base_prob=float(base_probs[target]),
        base_class=int(base_probs.argmax()),
        base_activation=base_act,
        method=runner.method,
        image_size=(int(image.shape[-2]), int(image.shape[-1])),
    )


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[fx.Node, str]]:
    """The model's fx graph and each node's name as the engine names layers
    (torchvision's ``get_graph_node_names`` names: ``layer1.0.add``, ``layer1.0.relu_1``)."""
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer()
    graph = tracer.trace(model)
    return graph, dict(tracer.node_to_qualname)


def _make_runner(
    model: nn.Module,
    dn: Deconvnet | None,
    image: torch.Tensor,
    layer: str | None,
    grid: torch.Tensor,
    patch: tuple[int, int],
    fill: torch.Tensor,
    method: str,
) -> _FullRunner | _Incremental:
    if method != "full":
        try:
            graph, names = _trace(model)
        except Exception as err:  # torch.fx raises many types on untraceable code
            if method == "incremental":
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UserInputError(f"torch.fx cannot trace the model ({first}); use method='full'") from err
        else:
            return _Incremental(model, graph, names, dn, image, layer, grid, patch, fill)
    return _FullRunner(model, dn, image, layer, grid, patch, fill)


# ----------------------------------------------------------------------------- full method


class _FullRunner:
    """Occlude, run the whole model (and the engine up to the layer), batched."""

    method = "full"

    def __init__(
        self,
        model: nn.Module,
        dn: Deconvnet | None,
        image: torch.Tensor,
        layer: str | None,
        grid: torch.Tensor,
        patch: tuple[int, int],
        fill: torch.Tensor,
    ) -> None:
        self.model, self.dn, self.image, self.layer = model, dn, image, layer
        self.grid, self.patch, self.fill = grid, patch, fill
        self.base_logits = model(image[None])
        self.base_layer = None if layer is None or dn is None else dn.output(image[None], layer)

    def run(self, idx: torch.Tensor, channel: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        ph, pw = self.patch
        boxes = [(t, l, t + ph, l + pw) for t, l in self.grid[idx].tolist()]
        x = occlude(self.image, boxes, self.fill)
        acts = None
        if self.layer is not None and channel is not None:
            acts = _totals(self.dn.output(x, self.layer), channel)  # type: ignore[union-attr]
        return self.model(x), acts


# ----------------------------------------------------------------------------- incremental method

_CONST, _BASE, _PATCH, _FULL = "const", "base", "patch", "full"


class _Patch(NamedTuple):
    """A node's values over one window per position: (B, C, h, w) at top-left offsets (B, 2)."""

    values: torch.Tensor
    offset: torch.Tensor


@dataclasses.dataclass
class _Need:
    """The window of one input a node reads, for every position.

    Attributes:
        node: The input node.
        offset: Top-left of the window in the input map, per position (P, 2); may lie
            outside the map (padding).
        size: (h, w) of the window.
        fill: Value outside the map (0 for convolution, -inf for max-pooling).
        pads: (top, bottom, left, right) padding that keeps every window inside.
    """

    node: fx.Node
    offset: torch.Tensor
    size: tuple[int, int]
    fill: float
    pads: tuple[int, int, int, int]


@dataclasses.dataclass
class _NodePlan:
    """How a node is computed for every position batch.

    ``mode`` is ``const`` (independent of the image), ``base`` (unchanged by every
    occluder: the cached value), ``patch`` (recomputed over a window per position) or
    ``full`` (recomputed whole, batched).
    """

    mode: str
    region: torch.Tensor | None = None  # (P, 4): rows [r0, r1), columns [c0, c1) the occluder changes
    offset: torch.Tensor | None = None  # (P, 2): the window's top-left
    size: tuple[int, int] = (0, 0)
    rule: _Rule | None = None
    needs: list[_Need] = dataclasses.field(default_factory=list)


def _empty_regions(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([_BIG, -_BIG, _BIG, -_BIG], device=device).repeat(n, 1)


def _union(regions: Sequence[torch.Tensor]) -> torch.Tensor:
    stack = torch.stack(list(regions))
    lo, hi = stack.amin(dim=0), stack.amax(dim=0)
    return torch.stack([lo[:, 0], hi[:, 1], lo[:, 2], hi[:, 3]], dim=1)


def _normalise_empty(regions: torch.Tensor) -> torch.Tensor:
    empty = (regions[:, 1] <= regions[:, 0]) | (regions[:, 3] <= regions[:, 2])
    if bool(empty.any()):
        regions = torch.where(empty[:, None], _empty_regions(len(regions), regions.device), regions)
    return regions


class _Rule:
    """An incremental rule: which outputs an input change reaches, and how to compute a window."""

    def changed(self, regions: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        """The (P, 4) output region changed, from the regions of the data inputs."""
        raise NotImplementedError

    def reads(self, offset: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], float]:
        """The input window (offset, size, fill outside the map) an output window needs."""
        return offset, size, 0.0

    def compute(
        self, engine: _Incremental, node: fx.Node, inputs: dict[fx.Node, torch.Tensor], offset: torch.Tensor
    ) -> torch.Tensor:
        """The output over the window, from each input node's window."""
        raise NotImplementedError


class _Pointwise(_Rule):
    """Elementwise operations and channel concatenation: output (y, x) needs input (y, x)."""

    def changed(self, regions: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        return _union(regions)

    def compute(
        self, engine: _Incremental, node: fx.Node, inputs: dict[fx.Node, torch.Tensor], offset: torch.Tensor
    ) -> torch.Tensor:
        args = fx.node.map_arg(node.args, lambda n: inputs[n] if n in inputs else engine.base[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: inputs[n] if n in inputs else engine.base[n])
        first = node.args[0] if node.args else None
        return engine.call(node, args, kwargs, owned=isinstance(first, fx.Node) and first in inputs)


@dataclasses.dataclass
class _Window(_Rule):
    """Sliding-window operations (convolution, pooling): kernel, stride, padding, dilation per axis."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    fill: float
    apply: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]

    def changed(self, regions: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        (region,) = regions
        cols = []
        for axis in range(2):
            k, s, p, d = self.kernel[axis], self.stride[axis], self.padding[axis], self.dilation[axis]
            a, b = region[:, 2 * axis], region[:, 2 * axis + 1]
            lo = -torch.div(-(a + p - d * (k - 1)), s, rounding_mode="floor")  # ceil
            hi = torch.div(b - 1 + p, s, rounding_mode="floor") + 1
            cols += [lo.clamp(0, out_hw[axis]), hi.clamp(0, out_hw[axis])]
        out = torch.stack(cols, dim=1)
        empty = (region[:, 1] <= region[:, 0]) | (region[:, 3] <= region[:, 2])
        return _normalise_empty(torch.where(empty[:, None], _empty_regions(len(out), out.device), out))

    def reads(self, offset: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], float]:
        s = torch.tensor(self.stride, device=offset.device)
        p = torch.tensor(self.padding, device=offset.device)
        span = tuple((size[a] - 1) * self.stride[a] + self.dilation[a] * (self.kernel[a] - 1) + 1 for a in range(2))
        return offset * s - p, span, self.fill  # type: ignore[return-value]

    def compute(
        self, engine: _Incremental, node: fx.Node, inputs: dict[fx.Node, torch.Tensor], offset: torch.Tensor
    ) -> torch.Tensor:
        (x,) = inputs.values()
        return self.apply(x, offset, engine.plans[node].size)


def _geometry(module: nn.Module) -> tuple[tuple[int, int], ...] | None:
    """(kernel, stride, padding, dilation) of a conv or pool module, ``None`` where unsupported."""
    from torch.nn.modules.utils import _pair as pair

    kernel = pair(module.kernel_size)
    stride = pair(module.stride if module.stride is not None else module.kernel_size)
    dilation = pair(getattr(module, "dilation", 1))
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":
            padding = tuple(dilation[a] * (kernel[a] - 1) // 2 for a in range(2))
        else:  # pragma: no cover - torch accepts no other string
            return None
    return kernel, stride, pair(padding), dilation


def _conv_rule(m: nn.Conv2d) -> _Window | None:
    if m.padding_mode != "zeros":
        return None
    k, s, p, d = _geometry(m)  # type: ignore[misc]

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)

    return _Window(k, s, p, d, 0.0, apply)


def _maxpool_rule(m: nn.MaxPool2d) -> _Window | None:
    if m.return_indices:
        return None
    k, s, p, d = _geometry(m)  # type: ignore[misc]

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.max_pool2d(x, k, s, 0, d)

    return _Window(k, s, p, d, float("-inf"), apply)


def _pool_counts(n_in: int, n_out: int, k: int, s: int, p: int, include_pad: bool) -> torch.Tensor:
    """Average-pooling divisor along one axis for every output index (as PyTorch counts)."""
    start = torch.arange(n_out) * s - p
    end = torch.minimum(start + k, torch.tensor(n_in + p))
    if not include_pad:
        return torch.minimum(end, torch.tensor(n_in)) - start.clamp(min=0)
    return end - start


def _avgpool_rule(m: nn.AvgPool2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> _Window:
    k, s, p, d = _geometry(m)  # type: ignore[misc]
    counts = [_pool_counts(in_hw[a], out_hw[a], k[a], s[a], p[a], m.count_include_pad) for a in range(2)]

    def apply(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        sums = F.avg_pool2d(x, k, s, 0, divisor_override=1)
        if m.divisor_override:
            return sums / m.divisor_override
        rows = counts[0].to(x.device)[offset[:, :1] + torch.arange(size[0], device=x.device)]
        cols = counts[1].to(x.device)[offset[:, 1:] + torch.arange(size[1], device=x.device)]
        return sums / (rows[:, :, None] * cols[:, None, :]).to(sums.dtype)[:, None]

    return _Window(k, s, p, d, 0.0, apply)


#: Modules that act on each (y, x) position on its own (in eval mode).
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Dropout,
    nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.LocalResponseNorm,
)  # fmt: skip
_POINTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.hardtanh, F.elu, F.gelu, F.silu, F.hardswish, F.sigmoid, F.tanh,
})  # fmt: skip
_POINTWISE_METHODS = frozenset(
    {"add", "add_", "sub", "mul", "mul_", "div", "relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "neg"}
)
_INPLACE_FUNCTIONS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_, F.relu_})


def _is_pointwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]  # type: ignore[index]
        if isinstance(m, nn.BatchNorm2d):
            return m.running_mean is not None  # batch statistics are not pointwise
        return isinstance(m, _POINTWISE_MODULES)
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    if node.op != "call_function":
        return False
    if node.target is F.dropout:  # the identity when not training
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return training is False
    if node.target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return dim in (1, -3)
    return node.target in _POINTWISE_FUNCTIONS


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the operation may overwrite its first argument."""
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True  # type: ignore[index]
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    if node.op == "call_function":
        return (
            node.target in _INPLACE_FUNCTIONS
            or kwargs.get("inplace") is True
            or (getattr(node.target, "__module__", "") == "torch.nn.functional" and any(a is True for a in args[1:]))
        )
    return False


def _fetch_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Incremental:
    """Incremental occlusion inference over a torch.fx graph of the model.

    Construction runs the unoccluded pass (caching every node's value) and plans, for
    every node, how it is computed for all positions; :meth:`run` computes one batch.
    """

    method = "incremental"

    def __init__(
        self,
        model: nn.Module,
        graph: fx.Graph,
        names: dict[fx.Node, str],
        dn: Deconvnet | None,
        image: torch.Tensor,
        layer: str | None,
        grid: torch.Tensor,
        patch: tuple[int, int],
        fill: torch.Tensor,
    ) -> None:
        self.model, self.graph, self.names, self.dn, self.image = model, graph, names, dn, image
        self.grid, self.patch, self.fill = grid, patch, fill
        self.modules = dict(model.named_modules())
        self.nodes = list(graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UserInputError(f"occlusion needs a model whose forward() takes one tensor; it takes {len(placeholders)}")
        self.input = placeholders[0]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.base: dict[fx.Node, Any] = {}
        self._base_pass()
        self.base_logits = self.base[self.output]
        self.layer_node = self._layer_node(layer)
        self.layer = layer
        self.base_layer = self._base_layer()
        self.plans: dict[fx.Node, _NodePlan] = {}
        for node in self.nodes:
            self.plans[node] = self._plan(node)
        order = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((order[u] for u in n.users), default=-1) for n in self.nodes}
        self._padded: dict[tuple[fx.Node, tuple[int, ...], float], torch.Tensor] = {}

    # ------------------------------------------------------------------ base pass
    def call(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], *, owned: bool = False) -> Any:
        """Runs one node's operation; an in-place one gets a copy of its first argument
        unless the caller ``owned`` it (no one reads it afterwards)."""
        if not owned and args and isinstance(args[0], torch.Tensor) and _is_inplace(node, self.modules, args, kwargs):
            args = (args[0].clone(), *args[1:])
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)  # type: ignore[index]
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        obj, *rest = args
        return getattr(obj, node.target)(*rest, **kwargs)  # type: ignore[arg-type]

    def _base_pass(self) -> None:
        for node in self.nodes:
            if node.op == "placeholder":
                value = self.image[None]
            elif node.op == "get_attr":
                value = _fetch_attr(self.model, node.target)  # type: ignore[arg-type]
            elif node.op == "output":
                value = fx.node.map_arg(node.args[0], lambda n: self.base[n])
            else:
                args = fx.node.map_arg(node.args, lambda n: self.base[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: self.base[n])
                value = self.call(node, args, kwargs)  # type: ignore[arg-type]
            self.base[node] = value

    def _layer_node(self, layer: str | None) -> fx.Node | None:
        """The node whose output is the engine's layer ``layer``; ``None``: not one node of
        this trace (a container's output), read with the engine instead."""
        if layer is None:
            return None
        calls = [n for n in self.nodes if self.names.get(n) == layer and n.op != "placeholder"]
        if not calls:
            calls = [n for n in self.nodes if n.op == "call_module" and n.target == layer]
        return calls[0] if len(calls) == 1 else None

    def _base_layer(self) -> torch.Tensor | None:
        if self.layer is None:
            return None
        if self.layer_node is not None:
            return self.base[self.layer_node]
        return self.dn.output(self.image[None], self.layer)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ planning
    def _plan(self, node: fx.Node) -> _NodePlan:
        if node.op == "placeholder":
            ph, pw = self.patch
            t, l = self.grid[:, 0], self.grid[:, 1]
            return self._window_plan(torch.stack([t, t + ph, l, l + pw], dim=1), self.base[node], None)
        inputs = node.all_input_nodes
        if node.op == "get_attr" or not any(self.plans[n].mode != _CONST for n in inputs):
            return _NodePlan(_CONST)
        if node.op == "output" or any(self.plans[n].mode == _FULL for n in inputs):
            return _NodePlan(_FULL)
        rule = self._rule(node)
        if rule is None:
            return _NodePlan(_FULL)
        data = [n for n in inputs if self.plans[n].mode != _CONST]
        region = rule.changed([self.plans[n].region for n in data], tuple(self.base[node].shape[-2:]))  # type: ignore[misc]
        plan = self._window_plan(region, self.base[node], rule)
        if plan.mode == _PATCH:
            plan.needs = self._needs(node, plan, rule)
        return plan

    def _window_plan(self, region: torch.Tensor, value: torch.Tensor, rule: _Rule | None) -> _NodePlan:
        """One window size for all positions, each window placed to hold its region."""
        h, w = value.shape[-2:]
        sizes = (region[:, 1::2] - region[:, 0::2]).clamp(min=0)
        wh, ww = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        if wh == 0 or ww == 0:
            return _NodePlan(_BASE, region=region)
        if wh >= h and ww >= w:
            return _NodePlan(_FULL, region=region)
        top = region[:, 0].clamp(0, h - wh)
        left = region[:, 2].clamp(0, w - ww)
        return _NodePlan(_PATCH, region, torch.stack([top, left], dim=1), (wh, ww), rule)

    def _needs(self, node: fx.Node, plan: _NodePlan, rule: _Rule) -> list[_Need]:
        """The window of every input (data, or a constant with a spatial extent) the node reads."""
        assert plan.offset is not None
        needs = []
        for n in node.all_input_nodes:
            if self.plans[n].mode == _CONST and not _spatial(self.base[n], self.base[node]):
                continue
            offset, size, fill = rule.reads(plan.offset, plan.size)
            hw = self.base[n].shape[-2:]
            pads = (
                max(0, -int(offset[:, 0].min())),
                max(0, int(offset[:, 0].max()) + size[0] - hw[0]),
                max(0, -int(offset[:, 1].min())),
                max(0, int(offset[:, 1].max()) + size[1] - hw[1]),
            )
            needs.append(_Need(n, offset, size, fill, pads))
        return needs

    def _rule(self, node: fx.Node) -> _Rule | None:
        """The node's incremental rule, or ``None`` (full recomputation from here)."""
        out = self.base[node]
        if not _is_map(out):
            return None
        inputs = node.all_input_nodes
        data = [self.base[n] for n in inputs if self.plans[n].mode != _CONST]
        consts = [self.base[n] for n in inputs if self.plans[n].mode == _CONST]
        if _is_pointwise(node, self.modules):
            same = all(_is_map(v) and v.shape[-2:] == out.shape[-2:] for v in data)
            usable = all(not isinstance(v, torch.Tensor) or _broadcasts(v, out) for v in consts)
            return _Pointwise() if same and usable else None
        if node.op != "call_module" or len(inputs) != 1 or not _is_map(data[0]):
            return None
        m = self.modules[node.target]  # type: ignore[index]
        if type(m) is nn.Conv2d:
            return _conv_rule(m)
        if type(m) is nn.MaxPool2d:
            return _maxpool_rule(m)
        if type(m) is nn.AvgPool2d:
            return _avgpool_rule(m, tuple(data[0].shape[-2:]), tuple(out.shape[-2:]))  # type: ignore[arg-type]
        return None

    # ------------------------------------------------------------------ batches
    def run(self, idx: torch.Tensor, channel: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, K) and the layer's channel totals (B,) for positions ``idx``."""
        env: dict[fx.Node, Any] = {}
        acts = logits = None
        for i, node in enumerate(self.nodes):
            if node.op == "output":
                logits = fx.node.map_arg(node.args[0], lambda n: self._full_value(n, env, len(idx)))
                break
            mode = self.plans[node].mode
            if node.op == "placeholder":
                ph, pw = self.patch
                values = self.fill.view(1, -1, 1, 1).expand(len(idx), -1, ph, pw)
                env[node] = _Patch(values, self.grid[idx])
                if mode == _FULL:
                    env[node] = self._materialise(node, env[node], len(idx))
            elif mode == _PATCH:
                env[node] = self._compute_patch(node, env, idx)
            elif mode == _FULL:
                env[node] = self._compute_full(node, env, len(idx), i)
            if node is self.layer_node and channel is not None:
                acts = self._layer_totals(node, env, len(idx), channel)
            for n in node.all_input_nodes:
                if self.last_use[n] == i:
                    env.pop(n, None)
        if self.layer is not None and self.layer_node is None and channel is not None:
            acts = self._recorded_totals(idx, channel)
        return logits, acts  # type: ignore[return-value]

    def _compute_full(self, node: fx.Node, env: dict[fx.Node, Any], batch: int, i: int) -> Any:
        """The node's operation on whole batched inputs (an owned first input may be overwritten)."""
        args = fx.node.map_arg(node.args, lambda n: self._full_value(n, env, batch))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._full_value(n, env, batch))
        first = node.args[0] if node.args else None
        owned = isinstance(first, fx.Node) and self.plans[first].mode == _FULL and self.last_use[first] == i
        return self.call(node, args, kwargs, owned=owned)  # type: ignore[arg-type]

    def _compute_patch(self, node: fx.Node, env: dict[fx.Node, Any], idx: torch.Tensor) -> _Patch:
        plan = self.plans[node]
        assert plan.rule is not None and plan.offset is not None
        inputs = {need.node: self._extract(need, env.get(need.node), idx) for need in plan.needs}
        offset = plan.offset[idx]
        return _Patch(plan.rule.compute(self, node, inputs, offset), offset)

    def _padded_base(self, need: _Need) -> torch.Tensor:
        key = (need.node, need.pads, need.fill)
        if key not in self._padded:
            t, b, l, r = need.pads
            base = self.base[need.node]
            self._padded[key] = F.pad(base, (l, r, t, b), value=need.fill) if any(need.pads) else base
        return self._padded[key]

    def _extract(self, need: _Need, value: Any, idx: torch.Tensor) -> torch.Tensor:
        """Each position's window of an input: the cached map with the position's patch pasted in."""
        base = self._padded_base(need)
        h, w = need.size
        offset = need.offset[idx]
        windows = base[0].unfold(1, h, 1).unfold(2, w, 1).permute(1, 2, 0, 3, 4)
        out = windows[offset[:, 0] + need.pads[0], offset[:, 1] + need.pads[2]]
        if isinstance(value, _Patch):
            _paste(out, value, offset)
        return out

    def _materialise(self, node: fx.Node, value: Any, batch: int, channels: slice = slice(None)) -> torch.Tensor:
        """A node's whole map for every position in the batch (B, C, H, W)."""
        base = self.base[node][:, channels]
        if not isinstance(value, _Patch):
            return base.expand(batch, *base.shape[1:])
        out = base.expand(batch, *base.shape[1:]).clone()
        _paste(out, _Patch(value.values[:, channels], value.offset), torch.zeros_like(value.offset))
        return out

    def _full_value(self, node: fx.Node, env: dict[fx.Node, Any], batch: int) -> Any:
        mode = self.plans[node].mode
        if mode == _CONST:
            return self.base[node]
        if mode == _FULL:
            return env[node]
        return self._materialise(node, env.get(node), batch)

    def _layer_totals(self, node: fx.Node, env: dict[fx.Node, Any], batch: int, channel: int) -> torch.Tensor:
        value = env.get(node)
        if self.plans[node].mode == _FULL:
            return _totals(value, channel)
        return _totals(self._materialise(node, value, batch, slice(channel, channel + 1)), 0)

    def _recorded_totals(self, idx: torch.Tensor, channel: int) -> torch.Tensor:
        ph, pw = self.patch
        boxes = [(t, l, t + ph, l + pw) for t, l in self.grid[idx].tolist()]
        x = occlude(self.image, boxes, self.fill)
        return _totals(self.dn.output(x, self.layer), channel)  # type: ignore[union-attr,arg-type]


def _is_map(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] == 1


def _spatial(const: Any, out: torch.Tensor) -> bool:
    """Whether a constant argument varies over (y, x) (then it is read over the window too)."""
    return isinstance(const, torch.Tensor) and const.dim() >= 2 and tuple(const.shape[-2:]) != (1, 1)


def _broadcasts(const: torch.Tensor, out: torch.Tensor) -> bool:
    """A constant usable in a windowed op: no (y, x) extent, or the output's whole map (1, C, H, W)."""
    if const.dim() < 2:
        return const.numel() == 1 or const.dim() == 1 and const.shape[0] != out.shape[-1]
    if tuple(const.shape[-2:]) == (1, 1):
        return True
    return const.dim() == 4 and const.shape[0] == 1 and const.shape[-2:] == out.shape[-2:]


def _paste(out: torch.Tensor, patch: _Patch, offset: torch.Tensor) -> None:
    """Writes each position's patch into its window ``out`` (B, C, h, w) at ``offset``, where they overlap."""
    h, w = out.shape[-2:]
    ph, pw = patch.values.shape[-2:]
    rel = patch.offset - offset
    groups, inverse = torch.unique(rel, dim=0, return_inverse=True)
    for g, (dr, dc) in enumerate(groups.tolist()):
        r0, r1, c0, c1 = max(0, dr), min(h, dr + ph), max(0, dc), min(w, dc + pw)
        if r0 >= r1 or c0 >= c1:
            continue
        src = patch.values[..., r0 - dr : r1 - dr, c0 - dc : c1 - dc]
        if len(groups) == 1:
            out[..., r0:r1, c0:c1] = src
        else:
            sel = (inverse == g).nonzero().squeeze(1)
            out[sel, :, r0:r1, c0:c1] = src[sel]
