"""The explorer's model side: layers, recordings, feature maps and projections.

One :class:`Explorer` wraps a model in a :class:`zfvis.Deconvnet` (traced once) and
answers the page's questions about it. The forward pass of an image up to a layer is
recorded once and kept in a least-recently-used cache bounded in bytes, so every click
on that image and layer only runs the reverse pass. Model calls hold one lock: requests
are served concurrently, the model runs one call at a time.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.deconvnet import Deconvnet
from ..core.ops import RULES
from ..io.errors import UserInputError
from . import encode
from .cache import LRUCache, nbytes
from .errors import BadRequest, NotFound
from .images import ImageStore

__all__ = ["Explorer", "LayerInfo", "MapGrid", "Projection", "RULES"]

#: The rules a projection may use.
RULES = tuple(RULES)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A layer as the page lists it.

    Attributes:
        name: Its name in addresses: the paper's name where the model has one, else the
            graph node's.
        node: The graph node's name.
        kind: Its module type or function.
        shape: Its output shape without the batch, (C, H, W) or (F,).
        receptive_field: ``{"size", "jump", "offset"}`` or ``None`` (the whole input).
    """

    name: str
    node: str
    kind: str
    shape: tuple[int, ...]
    receptive_field: dict[str, list[int]] | None

    def info(self) -> dict[str, Any]:
        """The JSON the API gives."""
        return {"name": self.name, "node": self.node, "kind": self.kind, "shape": list(self.shape),
                "receptive_field": self.receptive_field}


@dataclasses.dataclass
class MapGrid:
    """A layer's feature maps for one image.

    Attributes:
        maxima: Each channel's largest activation.
        argmax: Each channel's (y, x) of that activation (``None`` for a vector layer).
        sprite: The maps as one image (:func:`zfvis.explorer.encode.sprite`).
        maps: The maps (C, H, W), on the CPU (a vector layer's units are (F, 1, 1)).
    """

    maxima: list[float]
    argmax: list[list[int]] | None
    sprite: encode.MapSprite
    maps: torch.Tensor


@dataclasses.dataclass
class Projection:
    """One activation projected to pixel space.

    Attributes:
        array: The projection at the input's size, float32 (C, H, W).
        value: The activation's value.
        position: Its (y, x) in the layer's map (``None`` for a vector layer).
        box: (top, left, bottom, right) of its receptive field in the input, clipped.
    """

    array: np.ndarray
    value: float
    position: tuple[int, int] | None
    box: tuple[int, int, int, int]
    _png: bytes | None = None

    @property
    def png(self) -> bytes:
        """The projection as the figures show it (zero mid-grey), a PNG."""
        if self._png is None:
            self._png = encode.projection_png(torch.from_numpy(self.array))
        return self._png


def _recording_bytes(rec: Any) -> int:
    sites = rec.sites.values()
    return nbytes(rec.output) + nbytes([s.state for s in sites]) + nbytes([s.args for s in sites])


def _rf_json(rf: Any) -> dict[str, list[int]] | None:
    if rf is None:
        return None
    return {"size": list(rf.size), "jump": list(rf.jump), "offset": list(rf.offset)}


class Explorer:
    """What the explorer computes, for one model.

    Args:
        model: The network (never changed; its calls run one at a time).
        preprocess: PIL image -> model input (C, H, W); a zfvis ``Preprocess`` also
            gives ``denormalize`` for display.
        images: Image files (or PIL images) to offer.
        cache_bytes: The most bytes the recorded forward passes may hold together.
        show: Model input -> [0, 1] RGB (default: ``preprocess.denormalize`` if any).
    """

    def __init__(self, model: nn.Module, preprocess: Callable[..., torch.Tensor],
                 images: Sequence[Any] = (), *, cache_bytes: int = 512 << 20,
                 show: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:  # fmt: skip
        self.model = model
        self.dn = Deconvnet(model)
        self.lock = threading.RLock()
        self.images = ImageStore(preprocess, show or getattr(preprocess, "denormalize", None))
        self.images.add_files(images)
        self.images.on_forget = self.forget
        self.recordings: LRUCache[Any] = LRUCache(cache_bytes, max_items=64, size=_recording_bytes)
        self.grids: LRUCache[MapGrid] = LRUCache(cache_bytes // 4, max_items=64)
        self.projections: LRUCache[Projection] = LRUCache(64 << 20, max_items=256)
        self._layers: list[LayerInfo] | None = None
        self._input_shape: tuple[int, ...] | None = None

    # ----------------------------------------------------------------- layers
    def input_shape(self) -> tuple[int, ...]:
        """The model input's shape (C, H, W), that of the first image (or 3x224x224)."""
        if self._input_shape is None:
            first = self.images.all()
            side = getattr(self.images.preprocess, "crop", None) or 224
            self._input_shape = tuple(first[0].x.shape) if first else (3, side, side)
        return self._input_shape

    def layers(self) -> list[LayerInfo]:
        """Every layer that carries the signal, in graph order (traced once, on zeros)."""
        if self._layers is None:
            alias_of: dict[str, str] = {}
            for alias in self.dn.aliases:
                alias_of.setdefault(self.dn.resolve(alias), alias)
            with self.lock:
                steps = self.dn.trace(self.input_shape())
            self._layers = [LayerInfo(alias_of.get(s.name, s.name), s.name, s.kind, tuple(s.out_shape),
                                      _rf_json(s.receptive_field)) for s in steps]
        return self._layers

    def layer(self, name: str) -> LayerInfo:
        """The layer a name or alias means.

        Raises:
            NotFound: Unknown layer (the message names the closest).
        """
        if not isinstance(name, str) or not name:
            raise BadRequest("give a layer (GET /api/layers lists them)")
        try:
            node = self.dn.resolve(name)
        except UserInputError as err:
            raise NotFound(str(err).replace("Deconvnet.layer_names() (or `zfvis layers`)", "GET /api/layers")) from None
        found = next((layer for layer in self.layers() if layer.node == node), None)
        if found is None:
            raise NotFound(f"layer '{name}' does not carry the image's signal; GET /api/layers lists the layers")
        return found

    # -------------------------------------------------------------- recording
    def recording(self, image_id: str, layer: LayerInfo, rule: str) -> Any:
        """The recorded forward pass of an image up to a layer (cached)."""
        key = (image_id, layer.node, rule)
        with self.lock:
            rec = self.recordings.get(key)
            if rec is None:
                x = self.images.get(image_id).x
                rec = self.recordings.put(key, self.dn.record(x[None], layer.node, rule=rule))
        return rec

    def maps(self, image_id: str, layer: LayerInfo, rule: str = "deconvnet") -> MapGrid:
        """The layer's feature maps for an image, with each channel's maximum."""
        key = (image_id, layer.node)
        grid = self.grids.get(key)
        if grid is not None:
            return grid
        out = self.recording(image_id, layer, check_rule(rule)).output[0].detach().cpu().float()
        out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        if out.dim() == 1:
            maps = out.reshape(-1, 1, 1)
            grid = MapGrid(out.tolist(), None, encode.sprite(maps), maps)
        elif out.dim() == 3:
            flat = out.flatten(1)
            peak, where = flat.max(dim=1)
            w = out.shape[2]
            argmax = torch.stack([where // w, where % w], dim=1).tolist()
            grid = MapGrid(peak.tolist(), argmax, encode.sprite(out), out)
        else:
            raise BadRequest(f"layer '{layer.name}' outputs shape {tuple(out.shape)}; the explorer shows "
                             "(C, H, W) maps and (F,) vectors")
        return self.grids.put(key, grid)

    # ------------------------------------------------------------- projecting
    def project(self, image_id: str, layer: LayerInfo, channel: int, position: tuple[int, int] | None,
                rule: str) -> Projection:  # fmt: skip
        """Projects one activation: the channel's strongest, or the one at ``position``.

        Raises:
            BadRequest: A channel or position out of range, an unknown rule.
        """
        rule = check_rule(rule)
        key = (image_id, layer.node, channel, position, rule)
        found = self.projections.get(key)
        if found is not None:
            return found
        self.images.get(image_id)
        _check_unit(layer, channel, position)
        with self.lock:
            rec = self.recording(image_id, layer, rule)
            _check_position(layer, position, tuple(rec.output.shape[1:]))
            seeds = self.dn.select(rec, channel, position)
            patches = self.dn.reverse(rec, seeds)
            full = patches.full()[0]
        y, x = int(seeds.y[0]), int(seeds.x[0])
        proj = Projection(full.detach().cpu().float().numpy(), float(seeds.value[0]),
                          None if y < 0 else (y, x), patches.boxes()[0])
        return self.projections.put(key, proj)

    def output_layer(self) -> LayerInfo | None:
        """The model's output, where it is a vector (class scores); else ``None``."""
        layers = self.layers()
        return layers[-1] if layers and len(layers[-1].shape) == 1 else None

    def predict(self, image_id: str, k: int = 5) -> list[dict[str, Any]] | None:
        """The image's ``k`` strongest outputs: rank, class index, softmax probability, score
        (``None`` where the model's output is not a vector)."""
        out = self.output_layer()
        if out is None:
            return None
        scores = torch.tensor(self.maps(image_id, out).maxima, dtype=torch.float64)
        probs = torch.softmax(scores, dim=0)
        top = torch.argsort(scores, descending=True, stable=True)[:k].tolist()
        return [{"rank": r + 1, "class": c, "probability": float(probs[c]), "score": float(scores[c])}
                for r, c in enumerate(top)]

    def forget(self, image_id: str) -> None:
        """Drops the cached results of an image."""
        for cache in (self.recordings, self.grids, self.projections):
            cache.discard(lambda key: isinstance(key, tuple) and key[0] == image_id)


def check_rule(rule: object) -> str:
    """A rule name, checked."""
    if rule not in RULES:
        raise BadRequest(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    return str(rule)


def _check_unit(layer: LayerInfo, channel: int, position: tuple[int, int] | None) -> None:
    count = layer.shape[0] if layer.shape else 0
    if not 0 <= channel < count:
        raise BadRequest(f"channel {channel} is out of range: layer '{layer.name}' has {count} channels "
                         f"(0..{count - 1})")
    if position is not None and len(layer.shape) != 3:
        raise BadRequest(f"layer '{layer.name}' outputs a vector: it has no positions (leave out y and x)")


def _check_position(layer: LayerInfo, position: tuple[int, int] | None, shape: tuple[int, ...]) -> None:
    if position is None or len(shape) != 3:
        return
    h, w = shape[1], shape[2]
    y, x = position
    if not (0 <= y < h and 0 <= x < w):
        raise BadRequest(f"position ({y}, {x}) is outside the {h}x{w} map of layer '{layer.name}' "
                         f"(0..{h - 1}, 0..{w - 1})")
