"""The deconvnet: choose activations, run them back down to pixel space.

A :class:`Deconvnet` wraps a model made of supported layers. :meth:`Deconvnet.project`
records one forward pass (stopping at the requested layer), picks the seed activations
(the strongest of a channel, the k strongest, a given position, or a whole feature map),
and runs every seed back to the pixels through the reverse layers of :mod:`zfvis.deconv`,
batched, each seed computing only over its cone of influence.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence

import torch
from torch import nn

from .deconv import Frame, ReverseStack, build_reverse_stack, crop_windows
from .receptive import ReceptiveField, Window, plan, receptive_fields
from .recording import Recording, Step, leaf_names, record
from .zoo import layer_aliases

__all__ = ["Deconvnet", "Seeds", "Patches"]

Position = tuple[int, int]


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


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Deconvnet:
    """Deconvnet projections for a chain of ReLU / max-pool / convolution layers.

    Args:
        model: The network. Its modules must run as one chain (each module's input the
            previous module's output; a flatten inside ``forward()`` is fine) and be of
            the types in :data:`zfvis.recording.SUPPORTED_TYPES`. It is never modified:
            hooks live only for the duration of a forward pass, modes and ``inplace``
            flags are restored.
        aliases: Extra layer names mapped to ``named_modules()`` names. By default a zoo
            architecture's paper names (``conv1``, ``conv3_3``, ``fc6``, ...).
        chunk_size: Seeds per batched reverse pass (bounds memory).
        windowed: Compute each reverse layer only over the region the seed can reach
            (exactly equal to the dense computation, and much cheaper for low layers);
            ``False`` runs every reverse layer over whole maps.

    Example:
        >>> model, preprocess = zfvis.load_model("zfnet-cifar10")
        >>> dn = zfvis.Deconvnet(model)
        >>> x = preprocess(zfvis.load_image("cat.png")).unsqueeze(0)
        >>> dn.project(x, "conv3", channel=[0, 1, 2], top_k=9).shape
        torch.Size([1, 3, 9, 3, 32, 32])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        aliases: dict[str, str] | None = None,
        chunk_size: int = 64,
        windowed: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.model = model
        self.aliases = dict(layer_aliases(model) if aliases is None else aliases)
        self.chunk_size = chunk_size
        self.windowed = windowed
        self._leaves = leaf_names(model)
        for alias, target in self.aliases.items():
            if target not in self._leaves:
                raise ValueError(f"alias '{alias}' names '{target}', which is not a leaf module of the model")

    # ----------------------------------------------------------------- layers
    def layer_names(self, *, aliases: bool = True) -> list[str]:
        """Names accepted as ``layer``: the aliases (if any), then every leaf module's
        dotted ``named_modules()`` name."""
        return (list(self.aliases) if aliases else []) + list(self._leaves)

    def resolve(self, layer: str) -> str:
        """The ``named_modules()`` name for a layer name or alias.

        Raises:
            ValueError: Unknown name; the message lists the closest valid names.
        """
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a str, got {type(layer).__name__}")
        if layer in self.aliases:
            return self.aliases[layer]
        if layer in self._leaves:
            return layer
        valid = self.layer_names()
        close = difflib.get_close_matches(layer, valid, n=4, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        kind = "a container module" if layer in dict(self.model.named_modules()) else "not present in the model"
        raise ValueError(
            f"layer '{layer}' is {kind}.{hint} Hint: use Deconvnet.layer_names() (or `zfvis layers`) for the valid names"
        )

    def trace(self, input_shape: Sequence[int]) -> list[Step]:
        """The whole chain of module calls for inputs of ``input_shape`` (C, H, W).

        Runs one forward pass on zeros, batch size 1.
        """
        x = torch.zeros(1, *input_shape)
        return record(self.model, x, None).steps

    def receptive_field(self, layer: str, input_shape: Sequence[int]) -> ReceptiveField | None:
        """The receptive field of ``layer`` for inputs of ``input_shape`` (C, H, W);
        ``None`` for layers that see the whole input (after a flatten)."""
        name = self.resolve(layer)
        steps = record(self.model, torch.zeros(1, *input_shape), name).steps
        return receptive_fields(steps)[-1]

    def receptive_window(self, layer: str, position: Position, input_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the input pixels activation ``position`` of
        ``layer`` depends on (exact: clipped at every layer's border)."""
        name = self.resolve(layer)
        steps = record(self.model, torch.zeros(1, *input_shape), name).steps
        out = steps[-1].out_shape
        if len(out) != 3:
            return (0, 0, int(input_shape[-2]), int(input_shape[-1]))
        y, x = self._check_position(position, out)
        top = Window.points(torch.tensor([y]), torch.tensor([x]), (out[1], out[2]))
        cone = plan(steps, top, batch=1, device=torch.device("cpu"))[0]
        assert cone is not None
        return tuple(int(c[0]) for c in cone.cone)  # type: ignore[return-value]

    def reverse_stack(self, recording: Recording) -> ReverseStack:
        """The reverse layers for a recording, an inspectable ``nn.Module``."""
        return build_reverse_stack(recording.steps)

    # -------------------------------------------------------------- recording
    def record(self, images: torch.Tensor, layer: str) -> Recording:
        """One forward pass up to ``layer``, recording switches and that layer's output."""
        images = self._check_images(images)
        return record(self.model, images, self.resolve(layer))

    @staticmethod
    def _check_images(images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
        if images.dim() != 4:
            hint = " (add a batch dimension: images.unsqueeze(0))" if images.dim() == 3 else ""
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}{hint}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        return images

    @staticmethod
    def _check_position(position: object, out_shape: tuple[int, ...]) -> tuple[int, int]:
        if (
            not isinstance(position, (tuple, list))
            or len(position) != 2
            or not all(_is_int(v) or (isinstance(v, torch.Tensor) and v.numel() == 1) for v in position)
        ):
            raise TypeError(f"position must be a (y, x) pair of ints, got {position!r}")
        y, x = (int(v) for v in position)
        h, w = out_shape[1], out_shape[2]
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"position ({y}, {x}) is outside the {h}x{w} feature map (0..{h - 1}, 0..{w - 1})")
        return y, x

    # -------------------------------------------------------------- selection
    def select(
        self,
        recording: Recording,
        channel: int | Sequence[int],
        position: Position | str | None = None,
        top_k: int | None = None,
    ) -> Seeds:
        """Chooses seed activations in the recorded layer's output.

        Args:
            recording: From :meth:`record`.
            channel: A channel, or a sequence of channels.
            position: ``None`` (the strongest activation of the channel), a (y, x) pair,
                or ``"all"`` (the whole feature map of the channel is the seed).
            top_k: The k strongest positions of the channel instead of one (ties: the
                smaller flat index first).

        Returns:
            Seeds ordered image-major, then channel, then rank.

        Raises:
            ValueError: Channel or position out of range, conflicting arguments.
            TypeError: Arguments of the wrong type.
        """
        out = recording.output
        n = out.shape[0]
        channels = self._check_channels(channel, out.shape[1], recording.layer)
        m = len(channels)
        dev = out.device
        ch = torch.tensor(channels, device=dev, dtype=torch.long)
        if top_k is not None:
            if not _is_int(top_k) or top_k < 1:
                raise ValueError(f"top_k must be a positive int, got {top_k!r}")
            if position is not None:
                raise ValueError("give either position or top_k, not both")
        vector = out.dim() == 2
        if vector:
            if position is not None or (top_k is not None and top_k != 1):
                raise ValueError(
                    f"layer '{recording.layer}' outputs a vector; it has no positions (leave position and top_k unset)"
                )
            img = torch.arange(n, device=dev).repeat_interleave(m)
            chs = ch.repeat(n)
            minus = torch.full_like(img, -1)
            return Seeds(img, chs, minus, minus, out[img, chs])
        h, w = out.shape[2], out.shape[3]
        maps = out[:, ch].reshape(n, m, h * w)
        if isinstance(position, str):
            if position != "all":
                raise ValueError(f"position must be (y, x), None or 'all', got {position!r}")
            img = torch.arange(n, device=dev).repeat_interleave(m)
            chs = ch.repeat(n)
            minus = torch.full_like(img, -1)
            return Seeds(img, chs, minus, minus, maps.amax(dim=2).reshape(-1), whole_map=True)
        if position is not None:
            y, x = self._check_position(position, tuple(out.shape[1:]))
            flat = torch.full((n, m, 1), y * w + x, device=dev, dtype=torch.long)
        else:
            k = 1 if top_k is None else top_k
            if k > h * w:
                raise ValueError(f"top_k={k} exceeds the {h}x{w}={h * w} positions of layer '{recording.layer}'")
            flat = torch.sort(maps, dim=2, descending=True, stable=True).indices[:, :, :k]
        k = flat.shape[2]
        values = torch.gather(maps, 2, flat).reshape(-1)
        img = torch.arange(n, device=dev).view(n, 1, 1).expand(n, m, k).reshape(-1)
        chs = ch.view(1, m, 1).expand(n, m, k).reshape(-1)
        flat = flat.reshape(-1)
        return Seeds(img, chs, flat // w, flat % w, values)

    @staticmethod
    def _check_channels(channel: int | Sequence[int], count: int, layer: str | None) -> list[int]:
        if _is_int(channel):
            channels = [int(channel)]  # type: ignore[arg-type]
        elif isinstance(channel, (list, tuple, range)) or (isinstance(channel, torch.Tensor) and channel.dim() == 1):
            channels = [int(c) for c in channel]
            if not all(_is_int(c) or isinstance(c, torch.Tensor) for c in channel):
                raise TypeError(f"channels must be ints, got {list(channel)!r}")
            if not channels:
                raise ValueError("channel list is empty")
        else:
            raise TypeError(f"channel must be an int or a sequence of ints, got {type(channel).__name__}")
        for c in channels:
            if not 0 <= c < count:
                raise ValueError(f"channel {c} is out of range: layer '{layer}' has {count} channels (0..{count - 1})")
        return channels

    # ---------------------------------------------------------------- reverse
    def reverse(self, recording: Recording, seeds: Seeds) -> Patches:
        """Projects seeds to pixel space, each only over its receptive field.

        Args:
            recording: The forward pass the seeds come from.
            seeds: From :meth:`select` (or built by hand).

        Returns:
            The projections cropped to each seed's window; ``Patches.full()`` gives them
            at the input size.
        """
        stack = build_reverse_stack(recording.steps)
        parts = [self._reverse_chunk(recording, stack, seeds[i : i + self.chunk_size]) for i in range(0, len(seeds), self.chunk_size)]
        if len(parts) == 1:
            return parts[0]
        # windows of seeds from different chunks have the same size: the size depends on
        # the layer, not on the seed, except for whole-map seeds, which are full-size.
        return Patches(
            torch.cat([p.pixels for p in parts]),
            torch.cat([p.top for p in parts]),
            torch.cat([p.left for p in parts]),
            torch.cat([p.box for p in parts]),
            parts[0].image_size,
        )

    def _reverse_chunk(self, recording: Recording, stack: ReverseStack, seeds: Seeds) -> Patches:
        steps = recording.steps
        out = recording.output
        b = len(seeds)
        dev = out.device
        if out.dim() == 2:
            top = None
            signal = out.new_zeros(b, out.shape[1])
            signal[torch.arange(b, device=dev), seeds.channel] = 1.0
        elif seeds.whole_map:
            top = Window.whole(b, (out.shape[2], out.shape[3]), dev)
            signal = out.new_zeros(b, *out.shape[1:])
            signal[torch.arange(b, device=dev), seeds.channel] = out[seeds.image, seeds.channel]
        elif self.windowed:
            top = Window.points(seeds.y, seeds.x, (out.shape[2], out.shape[3]))
            signal = out.new_zeros(b, out.shape[1], 1, 1)
            signal[torch.arange(b, device=dev), seeds.channel, 0, 0] = 1.0
        else:
            top = Window.whole(b, (out.shape[2], out.shape[3]), dev)
            signal = out.new_zeros(b, *out.shape[1:])
            signal[torch.arange(b, device=dev), seeds.channel, seeds.y, seeds.x] = 1.0
        wins = plan(steps, top, batch=b, device=dev)
        frames = []
        for first, last in stack.spans:
            out_win = wins[last + 1] if last + 1 < len(steps) else top
            frames.append(
                Frame(out_win, wins[first], steps[first].in_shape, seeds.image, recording.switches.get(last))
            )
        with torch.no_grad():
            pixels = stack.run(signal, frames)
            if not seeds.whole_map:
                # the reverse pass is positively homogeneous: a unit seed scaled by the
                # activation's value equals the value seeded (and is exact for negative ones)
                pixels = pixels * seeds.value.to(pixels.dtype).view(-1, 1, 1, 1)
        bottom = wins[0]
        if bottom is None:
            raise ValueError("the model's input is not an image batch (N, C, H, W)")
        box = torch.stack(bottom.cone, dim=1)
        return Patches(pixels, bottom.top, bottom.left, box, bottom.map_size)

    def project(
        self,
        images: torch.Tensor,
        layer: str,
        channel: int | Sequence[int],
        position: Position | str | None = None,
        *,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Projects activations of ``layer`` back to pixel space.

        The seed is the activation's own value with every other activation of the layer
        zero; it runs down through unpooling (with this image's switches), rectification
        and transposed convolution with the model's own filters.

        Args:
            images: A batch (N, C, H, W), preprocessed as the model expects.
            layer: A module name from ``named_modules()`` or an alias (``conv5``).
            channel: A channel, or a sequence of m channels.
            position: ``None`` for the channel's strongest activation in each image, a
                (y, x) pair, or ``"all"`` to project the whole feature map at once.
            top_k: Project the k strongest activations of each channel.

        Returns:
            (N, C, H, W); with a channel list (N, m, C, H, W); with ``top_k``
            (N, k, C, H, W); with both (N, m, k, C, H, W).
        """
        rec = self.record(images, layer)
        seeds = self.select(rec, channel, position, top_k)
        full = self.reverse(rec, seeds).full()
        n = images.shape[0]
        shape: list[int] = [n]
        if not _is_int(channel):
            shape.append(len(full) // n // (top_k or 1))
        if top_k is not None:
            shape.append(top_k)
        return full.reshape(*shape, *full.shape[1:])
