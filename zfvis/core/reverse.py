"""The reverse layers, and the reverse pass that runs them over a model's graph.

Each reverse layer mirrors one forward node (the table in :mod:`zfvis.core.ops` says which
layer a node becomes). A layer takes the signal at its node's output and returns the
signal at each of the node's inputs that carry it. :class:`ReverseStack` holds the
layers of one projection's path, in reverse execution order, and runs them: where a
value fed several nodes, their signals are summed before its producer's layer runs
(as autograd accumulates gradients).

Every layer works on *windows*: per-seed rectangles of the last two dimensions of its
maps (see :mod:`zfvis.core.cone`), so a reverse pass started at one activation
computes only over the region that activation can reach. A window as large as the map
is the ordinary dense computation; ``None`` means a dense tensor without a map (a
vector).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cone import Window
from .pending import PendingSignals
from .reverse_conv import bn_scale, conv_axes, dense_transpose, transpose_conv
from .windows import crop_windows, cut, move, paste, shifted

__all__ = [
    "Frame",
    "ReverseLayer",
    "ReverseConv2d",
    "Unpool2d",
    "Rectify",
    "PassThrough",
    "Scale",
    "Multiply",
    "Distribute",
    "Split",
    "LinearMap",
    "ReverseLinear",
    "ReverseStep",
    "ReverseStack",
]


@dataclasses.dataclass
class Frame:
    """What one reverse layer needs besides the signal.

    Attributes:
        out_win: Windows of the forward node's output (``None``: dense).
        in_wins: Windows of each live input, which the layer must return.
        in_shapes: Shapes of the live inputs, without batch.
        out_shape: Shape of the output, without batch.
        image: For each seed, its image's index in the recorded batch (B,).
        state: What the forward pass recorded for this node (switches, masks), or ``None``.
        rule: The backward rule of ReLU-family nodes.
        owned: Whether nothing else refers to the signal (the layer may overwrite it).
    """

    out_win: Window | None
    in_wins: list[Window | None]
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...]
    image: torch.Tensor
    state: Any = None
    rule: str = "deconvnet"
    owned: bool = False


class ReverseLayer(nn.Module):
    """Base of the reverse layers; ``source`` names the forward module or node. A layer
    whose ``fresh`` is true returns new tensors (never its signal, a view of it, or a
    broadcast), which the reverse pass may then overwrite."""

    source: str
    fresh: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        # a plain value (a name, numbers, a function) is set as it is: nn.Module's bookkeeping
        # is for parameters, buffers and submodules, and a reverse pass builds hundreds of layers
        registered = name in self._parameters or name in self._buffers or name in self._modules
        if registered or isinstance(value, (torch.Tensor, nn.Module)):
            super().__setattr__(name, value)
        else:
            object.__setattr__(self, name, value)

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        return self.reverse(signal, frame)


class ReverseConv2d(nn.ConvTranspose2d):
    """Transposed convolution tied to a forward convolution: its ``weight`` *is* that
    convolution's Parameter, so later changes to the convolution show here too.

    Args:
        weight: The forward convolution's weight (out, in / groups, kh, kw).
        source: The forward module's (or node's) name.
        stride: Its stride.
        dilation: Its dilation.
        groups: Its groups.
        pre_pad: Its padding before the first row and column.
    """

    fresh = True
    source: str
    _pre_pad: tuple[int, int]
    _folded: list[tuple[nn.BatchNorm2d, str]]

    def __init__(self, weight: torch.Tensor, source: str, *, stride: tuple[int, int], dilation: tuple[int, int],
                 groups: int, pre_pad: tuple[int, int]) -> None:
        # the fields nn.ConvTranspose2d's methods read, set directly: there is no weight to
        # allocate or initialise (a reverse pass builds dozens of these layers)
        nn.Module.__init__(self)
        out_ch, in_per_group, kh, kw = weight.shape
        self.__dict__.update(
            in_channels=out_ch, out_channels=in_per_group * groups, kernel_size=(kh, kw), stride=tuple(stride),
            padding=(0, 0), dilation=tuple(dilation), transposed=True, output_padding=(0, 0), groups=groups,
            padding_mode="zeros", _reversed_padding_repeated_twice=[0, 0, 0, 0],
            source=source, _pre_pad=pre_pad, _folded=[],
        )
        self.register_parameter("bias", None)
        if isinstance(weight, nn.Parameter):
            self.weight = weight
        else:  # a functional convolution's weight tensor
            self.weight = weight  # type: ignore[assignment]

    def fold(self, bn: nn.BatchNorm2d, name: str) -> None:
        """Folds the BatchNorm2d ``name`` that follows the convolution into this layer."""
        self._folded = [(bn, name)]

    def extra_repr(self) -> str:
        folded = "".join(f", folds BatchNorm2d '{name}'" for _, name in self._folded)
        return f"{super().extra_repr()}, from '{self.source}', tied weight{folded}"

    def folded_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight times the folded BatchNorm's scale per output channel (scaling the
        few weights rather than every element of the signal)."""
        weight = self.weight.to(dtype)
        for bn, _ in self._folded:
            weight = weight * bn_scale(bn, dtype).view(-1, 1, 1, 1)
        return weight

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:  # type: ignore[override]
        out_win, in_win = frame.out_win, frame.in_wins[0]
        if out_win is None or in_win is None:
            raise RuntimeError(f"reverse convolution '{self.source}' needs map windows")
        weight = self.folded_weight(signal.dtype)
        if out_win.is_full and in_win.is_full:  # dense: the offsets are the same for every seed
            dense = dense_transpose(signal, weight, self, self._pre_pad, in_win.size)
            if dense is not None:
                return [dense]
        # where the full transposed output starts, relative to each seed's input window,
        # and how much of it lies past the window's end
        shifts, pads = [], []
        one = out_win.ints is not None and in_win.ints is not None  # one seed: in Python numbers
        for i, axis in enumerate(conv_axes(self, self._pre_pad)):
            length = axis.span(signal.shape[2 + i])
            wins = (in_win.ints, out_win.ints) if one else ((in_win.top, in_win.left), (out_win.top, out_win.left))
            start = wins[0][i] - axis.reads(wins[1][i], 1)[0]  # type: ignore[index]
            spare = length - start - in_win.size[i]
            # rows cut off on both sides are not computed at all (conv_transpose2d's padding)
            pad = max(0, min(start, spare) if one else min(int(start.min()), int(spare.min())))
            shifts.append(start - pad)
            pads.append(pad)
        full = transpose_conv(signal, weight, self, (pads[0], pads[1]))
        if one and full.shape[0] == 1:
            return [shifted(full, shifts[0], shifts[1], *in_win.size)]
        return [crop_windows(full, None, shifts[0], shifts[1], *in_win.size)]

    def forward(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:  # type: ignore[override]
        return self.reverse(signal, frame)


class Unpool2d(ReverseLayer):
    """Unpooling with switches: each value returns to its maximum's location; values that
    meet at one location (overlapping windows) add up.

    Args:
        source: The forward module's (or node's) name.
        params: The pooling's (kernel, stride, padding, dilation) pairs.
    """

    fresh = True

    def __init__(self, source: str, params: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.source = source
        self.params = params

    def extra_repr(self) -> str:
        return (f"(kernel, stride, padding, dilation)={self.params}, from '{self.source}', switches recorded in "
                "the forward pass")

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        out_win, in_win, switches = frame.out_win, frame.in_wins[0], frame.state
        if out_win is None or in_win is None or switches is None:
            raise RuntimeError(f"unpooling '{self.source}' needs map windows and switches")
        b, c, h, w = signal.shape
        (k0, k1), (s0, s1), (p0, p1), (d0, d1) = self.params
        # every switch lies in its pooling window, so in the rows and columns the output
        # window's pooling windows cover: (ly, lx) from (by, bx) on, for each seed
        ly, lx = (h - 1) * s0 + d0 * (k0 - 1) + 1, (w - 1) * s1 + d1 * (k1 - 1) + 1
        by, bx = out_win.top * s0 - p0, out_win.left * s1 - p1
        idx = crop_windows(switches, frame.image, out_win.top, out_win.left, h, w)  # r * width + c
        width = frame.in_shapes[0][-1]
        offset = (by * lx + bx).view(-1, 1, 1, 1)
        # (r - by) * lx + (c - bx), the switch's place in that region
        local = idx - offset if lx == width else idx + (idx // width) * (lx - width) - offset
        out = signal.new_zeros(b, c, ly * lx)
        out.scatter_add_(2, local.reshape(b, c, -1), signal.reshape(b, c, -1))
        return [crop_windows(out.view(b, c, ly, lx), None, in_win.top - by, in_win.left - bx, *in_win.size)]


class Rectify(ReverseLayer):
    """The backward of a pointwise activation, from what the forward pass recorded (its
    derivative f'(x) at the forward input, or a mask).

    For a rectifier (ReLU, ReLU6, LeakyReLU, ELU, SiLU, GELU, Hardswish, Mish) the rule
    decides: ``deconvnet`` rectifies the signal (ReLU6: and passes nothing where the
    forward input was >= 6), ``guided`` passes f'(x) * relu(signal), ``gradient`` passes
    f'(x) * signal. A gate (sigmoid, hard sigmoid, tanh) always passes f'(x) * signal.
    """

    fresh = True

    def __init__(self, source: str, *, relu6: bool, kind: str | None = None, by_rule: bool = True) -> None:
        super().__init__()
        self.source = source
        self.relu6 = relu6
        self.kind = kind or ("ReLU6" if relu6 else "ReLU")
        self.by_rule = by_rule

    def extra_repr(self) -> str:
        how = "by the rule" if self.by_rule else "by its derivative"
        return f"{self.kind} '{self.source}' {how}"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        if self.by_rule and frame.rule != "gradient":
            signal = F.relu_(signal) if frame.owned else F.relu(signal)
        mask = frame.state
        if mask is not None:
            if frame.out_win is None:
                mask = mask[frame.image]
            else:
                win = frame.out_win
                mask = crop_windows(mask, frame.image, win.top, win.left, *win.size)
            signal = signal * mask.to(signal.dtype)
        return [signal]


class PassThrough(ReverseLayer):
    """Passes the signal on unchanged (LocalResponseNorm, Dropout, Identity)."""

    def __init__(self, source: str, kind: str) -> None:
        super().__init__()
        self.source, self.kind = source, kind

    def extra_repr(self) -> str:
        return f"{self.kind} '{self.source}' passed through"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        return [signal]


class Scale(ReverseLayer):
    """A BatchNorm2d's per-channel scale (its linear part), where it does not follow a
    convolution it can be folded into."""

    fresh = True

    def __init__(self, bn: nn.BatchNorm2d, source: str) -> None:
        super().__init__()
        self.source = source
        self._bn = [bn]

    def extra_repr(self) -> str:
        return f"BatchNorm2d '{self.source}' scale"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        scale = bn_scale(self._bn[0], signal.dtype)
        return [signal * scale.view(1, -1, *([1] * (signal.dim() - 2)))]


class Multiply(ReverseLayer):
    """Multiplication by a constant (a number or a fixed tensor; ``per_image``: a tensor the
    recording found with the batch first, :attr:`zfvis.core.ops.Site.batched`, taken per seed)."""

    fresh = True

    def __init__(self, factor: float | torch.Tensor, source: str, *, per_image: bool = False) -> None:
        super().__init__()
        self.source = source
        self.factor = factor
        self.per_image = per_image

    def extra_repr(self) -> str:
        f = self.factor
        return f"by {f if not isinstance(f, torch.Tensor) else tuple(f.shape)}, from '{self.source}'"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        factor = self.factor
        if self.per_image and isinstance(factor, torch.Tensor) and factor.shape[0] > 1:
            factor = factor[frame.image]  # one per recorded image: each seed's image's
        out = signal * factor
        target = (signal.shape[0], *frame.in_shapes[0])
        if frame.out_win is None and tuple(out.shape) != target:
            out = out.sum_to_size(target)
        return [out]


class Distribute(ReverseLayer):
    """Addition and subtraction: each operand receives the signal times its coefficient
    (summed over broadcast dimensions)."""

    def __init__(self, coef: list[float], source: str) -> None:
        super().__init__()
        self.source = source
        self.coef = coef

    def extra_repr(self) -> str:
        return f"coefficients {self.coef}, from '{self.source}'"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        out = []
        for c, shape in zip(self.coef, frame.in_shapes):
            s = signal if c == 1.0 else signal * c
            target = (signal.shape[0], *shape)
            if frame.out_win is None and tuple(s.shape) != target:
                s = s.sum_to_size(target)
            out.append(s)
        return out


class Split(ReverseLayer):
    """Concatenation: the signal is split back between the inputs."""

    def __init__(self, dim: int, sizes: list[int], ks: list[int], n_live: int, source: str) -> None:
        super().__init__()
        self.source = source
        self.dim, self.sizes, self.ks, self.n_live = dim, sizes, ks, n_live

    def extra_repr(self) -> str:
        return f"dim {self.dim} into {self.sizes}, from '{self.source}'"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * self.n_live
        for k, part in zip(self.ks, torch.split(signal, self.sizes, dim=self.dim)):
            prev = out[k]
            out[k] = part if prev is None else prev + part
        return [o for o in out if o is not None]


class LinearMap(ReverseLayer):
    """The transpose of a linear operation with one live input (average pooling, a
    mean, slicing, ...), computed as that operation's gradient at zero."""

    def __init__(self, fn: Callable[..., torch.Tensor], source: str, kind: str, cone: str) -> None:
        super().__init__()
        self.source, self.kind, self.cone = source, kind, cone
        self._fn = fn

    def extra_repr(self) -> str:
        return f"{self.kind} '{self.source}' transposed"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        in_win = frame.in_wins[0]
        if self.cone == "same" and frame.out_win is not None:
            shape = (signal.shape[0], *frame.in_shapes[0][:-2], *frame.out_win.size)
        else:
            signal = paste(signal, frame.out_win)
            shape = (signal.shape[0], *frame.in_shapes[0])
        with torch.enable_grad():
            z = signal.new_zeros(shape, requires_grad=True)
            # on whole maps, a tensor argument with a batch of its own is taken per seed
            out = self._fn(z, frame.image) if self.cone != "same" else self._fn(z)
            (grad,) = torch.autograd.grad(out, z, signal)
        if self.cone != "same":
            grad = cut(grad, in_win)
        return [grad]


class ReverseLinear(ReverseLayer):
    """Multiplication by the transposed weight of a Linear layer (tied; no bias)."""

    fresh = True

    def __init__(self, weight: torch.Tensor, source: str) -> None:
        super().__init__()
        self.source = source
        self.weight = weight

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"{out_f} -> {in_f}, from '{self.source}', tied weight"

    def reverse(self, signal: torch.Tensor, frame: Frame) -> list[torch.Tensor]:
        return [signal @ self.weight.to(signal.dtype)]


@dataclasses.dataclass
class ReverseStep:
    """One reverse layer in a path: which node's signal it takes and where it sends it.

    Attributes:
        node: The node whose output signal the layer takes.
        inputs: The live inputs the layer returns signals for (node names, in order).
        layer: The reverse layer.
        cone: ``"same"``, ``"spatial"`` or ``"full"``.
        in_shapes: Shapes of those inputs, without batch.
        out_shape: Shape of the node's output, without batch.
        state: What the forward pass recorded for it.
        params: (kernel, stride, padding, dilation) for spatial layers.
        work: Multiply-adds per position of its output map (the op's ``work``; ``None``:
            it only reads and writes the signal).
    """

    node: str
    inputs: list[str]
    layer: nn.Module
    cone: str
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...]
    state: Any = None
    params: tuple[tuple[int, int], ...] | None = None
    work: float | None = None


class ReverseStack(nn.Module):
    """The reverse layers of one projection's path, from the seed node down to the pixels.

    Printing it shows each reverse layer with the forward module or node it mirrors.
    Attributes ``steps`` say what each layer takes and where its signal goes.
    """

    def __init__(self, steps: list[ReverseStep], seed: str, image_node: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList([s.layer for s in steps])
        self.steps = steps
        self.seed = seed
        self.image_node = image_node

    def run(self, signal: torch.Tensor, windows: dict[str, Window | None], image: torch.Tensor,
            rule: str) -> torch.Tensor:
        """Runs the seed signal (on ``windows[seed]``) down to the image's windows.

        Args:
            signal: The signal at the seed node's output, on its windows.
            windows: The planned window of every node's output (:func:`zfvis.core.cone.plan`).
            image: Each seed's image index in the recorded batch.
            rule: The ReLU rule.
        """
        pending = PendingSignals(self.seed, signal)
        for step in self.steps:
            s, mine = pending.pop(step.node)
            if s is None:
                continue  # nothing reaches this node (a branch the seed does not depend on)
            out_win = windows[step.node]
            in_wins = [windows[i] for i in step.inputs]
            if step.cone == "full":  # dense in, dense out
                pasted = paste(s, out_win)
                mine, s = mine or pasted is not s, pasted
                frame_out, frame_in = None, [None] * len(in_wins)
            else:
                frame_out, frame_in = out_win, in_wins
            frame = Frame(frame_out, frame_in, step.in_shapes, step.out_shape, image, step.state, rule, mine)
            results = step.layer(s, frame)
            fresh = getattr(step.layer, "fresh", False)
            once = [sum(o is r for o in results) == 1 for r in results]
            for name, r, win, single in zip(step.inputs, results, in_wins, once):
                # owned: a new tensor or the owned signal, handed to this input only
                new = single and ((r is s and mine) or (fresh and r is not s))
                if step.cone == "full":
                    r = cut(r, win)
                elif step.cone == "same":  # computed on the output's windows
                    r = move(r, out_win, win)
                pending.add(name, r, new)
        pixels, _ = pending.pop(self.image_node)
        if pixels is None:
            raise KeyError(self.image_node)
        return pixels

    def forward(self, signal: torch.Tensor, windows: dict[str, Window | None], image: torch.Tensor,
                rule: str) -> torch.Tensor:
        return self.run(signal, windows, image, rule)
