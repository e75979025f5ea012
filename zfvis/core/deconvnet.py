"""The deconvnet: choose activations, run them back down to pixel space.

A :class:`Deconvnet` wraps a model made of supported layers. :meth:`Deconvnet.project`
records one forward pass (stopping at the requested layer), picks the seed activations
(the strongest of a channel, the k strongest, a given position, or a whole feature map),
and runs every seed back to the pixels through the reverse layers of :mod:`zfvis.core.reverse`,
batched, each seed computing only over its cone of influence.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

from ..io.checks import check_model
from ..io.errors import InputTypeError, UnsupportedModelError, UserInputError
from .aliases import layer_aliases
from .cone import ReceptiveField, StepCost, Window, group_seeds, plan, receptive_field
from .graph import GraphNode, ModelGraph, trace_model
from .layers import LayerNames
from .ops import OPS, RULES, Site
from .record import Recording, Step, record
from .reverse import ReverseStack, ReverseStep
from .seeds import Patches, Seeds, check_position, select_seeds, widen

__all__ = ["Deconvnet", "Seeds", "Patches"]

Position = tuple[int, int]

#: How seeds are batched for the reverse pass (:func:`zfvis.core.cone.group_seeds`), in
#: multiply-adds: what a step costs per element of signal it only reads and writes, the
#: fixed cost of running one step for a batch, and the largest signal a batch may have
#: (elements) so that its steps work in the processor's cache.
_MEMORY_WORK = 8.0
_STEP_OVERHEAD = 3e6
_BATCH_ELEMENTS = 8_000_000

#: Ops that may stand between a convolution and the layer name that means it (``conv3``).
_AFTER_CONV = ("batch_norm", "relu", "relu6")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _step(site: Site, layer: nn.Module, *, name: str | None = None, out_shape: tuple[int, ...] | None = None) -> ReverseStep:
    """The reverse step of a site (``name`` and ``out_shape``: of a node folded into it)."""
    op = site.op
    params = op.params(site) if site.cone == "spatial" and op.params is not None else None
    if site.cone == "resample":  # a resampling's weights, recorded (zfvis.core.resampling)
        params = site.state
    work = op.work(site) if op.work is not None else None
    in_shapes, own_shape = site.reverse_shapes or (site.in_shapes, site.out_shape)  # channels first, where held so
    return ReverseStep(name or site.node.name, [p.name for p in site.live], layer, site.cone, in_shapes,
                       own_shape if out_shape is None else out_shape, site.state, params, work)


class Deconvnet:
    """Deconvnet projections for any CNN whose operations the op table knows.

    The model is traced once with torch.fx (:mod:`zfvis.core.graph`): chains (ZF Net, VGG),
    residual (ResNet), branching (GoogLeNet), concatenating (DenseNet) and depthwise
    (MobileNetV2) models alike, including functional calls in ``forward()``.

    Args:
        model: The network. It is never modified: no hook survives a call, modes and
            ``inplace`` flags are kept.
        aliases: Extra layer names mapped to layer names. By default a zoo
            architecture's paper names (``conv1``, ``conv3_3``, ``layer3``, ...).
        chunk_size: Seeds per batched reverse pass (bounds memory).
        windowed: Compute each reverse layer only over the region the seed can reach
            (exactly equal to the dense computation, and much cheaper for low layers);
            ``False`` runs every reverse layer over whole maps.
        rule: How a ReLU passes the signal back: ``"deconvnet"`` (rectify it, Zeiler &
            Fergus), ``"guided"`` (guided backpropagation: rectify, and zero where the
            forward input was not positive) or ``"gradient"`` (the plain gradient).

    Raises:
        UnsupportedModelError: The model's ``forward()`` cannot be traced.

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
        rule: str = "deconvnet",
    ) -> None:
        check_model(model)
        if not _is_int(chunk_size) or chunk_size < 1:
            raise UserInputError(f"chunk_size must be at least 1, got {chunk_size}")
        self.rule = _check_rule(rule)
        self.model = model
        self.chunk_size = chunk_size
        self.windowed = windowed
        self.graph: ModelGraph = trace_model(model)
        # the zoo's aliases of the model's architecture that fit it (a subclass may have a module of
        # its own named conv1): aliases the caller never gave never refuse a model; given ones are checked
        given = dict(aliases) if aliases is not None else LayerNames.fitting(self.graph, layer_aliases(model))
        self.layers = LayerNames(self.graph, given)
        self.aliases = self.layers.aliases

    # ----------------------------------------------------------------- layers
    def layer_names(self, *, aliases: bool = True) -> list[str]:
        """Names accepted as ``layer`` (:meth:`zfvis.core.layers.LayerNames.names`)."""
        return self.layers.names(aliases=aliases)

    def resolve(self, layer: str) -> str:
        """The graph node name for a layer name or alias.

        A module name means the module's output (for a container, the value its
        ``forward`` returns); a module called several times means its last call.

        Raises:
            ValueError: Unknown name; the message lists the closest valid names.
        """
        return self.layers.node(layer).name

    def _node(self, layer: str) -> GraphNode:
        return self.layers.node(layer)

    def convolution(self, layer: str) -> tuple[str, nn.Conv2d]:
        """The convolution module a layer stands for: the convolution itself, or its
        output after batch norm and ReLU (what ``conv3`` names), found through the graph.

        Returns:
            (its ``named_modules()`` name, the module).

        Raises:
            UserInputError: The layer is something else (a pool, a linear layer, ...).
        """
        node = self._node(layer)
        while node.op is not None and node.op.name in _AFTER_CONV:
            live = [p for p in node.inputs if p.carries]
            if len(live) != 1:
                break
            node = live[0]
        if isinstance(node.module, nn.Conv2d) and node.module_name is not None:
            return node.module_name, node.module
        convs = [a for a in self.aliases if a.startswith("conv")] or [
            n.module_name for n in self.graph.nodes if isinstance(n.module, nn.Conv2d)]
        shown = ", ".join(str(c) for c in convs[:8]) + (", ..." if len(convs) > 8 else "")
        raise UserInputError(f"layer '{layer}' is a {node.kind}, not a convolution; filters exist for "
                             f"convolutions: {shown}")

    def trace(self, input_shape: Sequence[int]) -> list[Step]:
        """Every node that carries the signal, with shapes and receptive fields, for
        inputs of ``input_shape`` (C, H, W). Runs one forward pass on zeros."""
        targets = [n for n in self.graph.nodes if n.carries and not n.users and n is not self.graph.input]
        _, sites, problems, _ = record(self.graph, torch.zeros(1, *input_shape), targets)
        fields = receptive_field(self._steps(list(sites.values())[::-1], fold=False), self.graph.input.name)
        return [
            Step(s.node.name, s.node.module, s.in_shapes[0] if s.in_shapes else (), s.out_shape, s.node.kind,
                 fields.get(s.node.name))
            for s in sites.values()
        ]

    def receptive_field(self, layer: str, input_shape: Sequence[int]) -> ReceptiveField | None:
        """The receptive field of ``layer`` for inputs of ``input_shape`` (C, H, W);
        ``None`` for layers that see the whole input (after a flatten)."""
        rec = self._record(torch.zeros(1, *input_shape), self._node(layer), "deconvnet")
        stack = self.reverse_stack(rec)
        return receptive_field(stack.steps, self.graph.input.name).get(rec.layer or "")

    def receptive_window(self, layer: str, position: Position, input_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the input pixels activation ``position`` of
        ``layer`` depends on (exact: clipped at every layer's border)."""
        rec = self._record(torch.zeros(1, *input_shape), self._node(layer), "deconvnet")
        out = tuple(rec.output.shape[1:])
        if len(out) != 3:
            return (0, 0, int(input_shape[-2]), int(input_shape[-1]))
        y, x = check_position(position, out)
        top = Window.points(torch.tensor([y]), torch.tensor([x]), (out[1], out[2]))
        wins = self._plan(rec, self.reverse_stack(rec), top, 1, torch.device("cpu"))
        bottom = wins[self.graph.input.name]
        if bottom is None:  # pragma: no cover - the input is an image batch
            raise UnsupportedModelError("the model's input is not an image batch (N, C, H, W)")
        return tuple(int(c[0]) for c in bottom.cone)  # type: ignore[return-value]

    def reverse_stack(self, recording: Recording) -> ReverseStack:
        """The reverse layers of a recording's path, an inspectable ``nn.Module``.

        Raises:
            UnsupportedModelError: A node on the path has no reverse (its name, op and
                source line are in the message).
        """
        seed = self.graph.by_name[recording.layer] if recording.layer else None
        if seed is None:  # pragma: no cover - recordings always name their node
            raise UserInputError("the recording has no layer")
        path = self.graph.signal_path(seed)
        for node in path[1:]:
            if node.problem is not None:
                raise UnsupportedModelError(node.problem)
            if node.name in recording.problems:
                raise recording.problems[node.name]
        sites = [recording.sites[n.name] for n in path[1:]]
        steps = self._steps([s for s in sites[::-1] if s.cone != "bundle"])
        return ReverseStack(steps, seed.name, self.graph.input.name)

    @staticmethod
    def _steps(sites: list, *, fold: bool = True) -> list[ReverseStep]:
        """Reverse steps for sites in reverse execution order (with ``fold``, a node whose op
        ``folds_into`` its producer's, a producer that feeds nothing else, is absorbed by
        the producer's reverse layer: BatchNorm2d after a convolution)."""
        steps: list[ReverseStep] = []
        folded: set[str] = set()
        by_node = {s.node.name: s for s in sites}
        for site in sites:
            node = site.node
            if node.name in folded:
                continue
            producer = by_node.get(site.live[0].name) if site.live else None
            if (fold and site.op.folds_into is not None and node.module is not None and producer is not None
                    and producer.op is OPS[site.op.folds_into] and len(producer.node.users) == 1):
                layer = producer.op.build(producer)
                layer.fold(node.module, node.module_name or node.name)  # type: ignore[operator]
                folded.add(producer.node.name)
                steps.append(_step(producer, layer, name=node.name, out_shape=site.out_shape))
                continue
            steps.append(_step(site, site.op.build(site)))
        return steps

    # -------------------------------------------------------------- recording
    def record(self, images: torch.Tensor, layer: str, *, rule: str | None = None) -> Recording:
        """One forward pass up to ``layer``, recording what its reverse pass needs.

        Args:
            images: A batch (N, C, H, W), preprocessed as the model expects.
            layer: A layer name or alias.
            rule: The ReLU rule the recording is for (default: the Deconvnet's).

        Raises:
            UnsupportedModelError: The layer's path runs through an operation that has no
                reverse, or the model has backward hooks.
        """
        images = self._check_images(images)
        node = self._node(layer)
        rule = _check_rule(self.rule if rule is None else rule)
        rec = self._record(images, node, rule)
        # the path as the recording's check left it (an integer result, an argmax, carries no signal)
        for n in self.graph.signal_path(node)[1:]:
            if n.problem is not None:
                raise UnsupportedModelError(n.problem)
            if n.name in rec.problems:
                raise rec.problems[n.name]
        return rec

    def _record(self, images: torch.Tensor, node: GraphNode, rule: str) -> Recording:
        outputs, sites, problems, shape = record(self.graph, images, [node], rule)
        return Recording(node.name, self._one_tensor(outputs, node), shape, sites, rule, self.graph, problems)

    @staticmethod
    def _one_tensor(outputs: dict[str, torch.Tensor], node: GraphNode) -> torch.Tensor:
        """A layer's output, or a refusal naming the tensors a layer returning a tuple holds."""
        if node.name in outputs:
            return outputs[node.name]
        items = [u.name for u in node.users if u.fx_node.target is operator.getitem]
        which = f"; choose one of its items: {', '.join(items)}" if items else ""
        raise UnsupportedModelError(f"layer '{node.name}' does not output one tensor (a tuple or list){which}")

    def output(self, images: torch.Tensor, layer: str) -> torch.Tensor:
        """The output of ``layer`` (a forward pass only: the layer need not be projectable)."""
        return self.forward_outputs(images, [layer])[layer]

    def forward_outputs(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The outputs of several layers from one forward pass (it stops once the
        deepest has run); keys are the names as given."""
        images = self._check_images(images)
        nodes = {layer: self._node(layer) for layer in layers}
        outputs, _, _, _ = record(self.graph, images, list(nodes.values()))
        return {layer: self._one_tensor(outputs, node) for layer, node in nodes.items()}

    @staticmethod
    def _check_images(images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise InputTypeError(f"images must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
        if images.dim() != 4:
            hint = " (add a batch dimension: images.unsqueeze(0))" if images.dim() == 3 else ""
            raise UserInputError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}{hint}")
        if not images.is_floating_point():
            raise InputTypeError(f"images must be a floating-point tensor, got {images.dtype}")
        if images.is_meta:
            raise InputTypeError("images are on the meta device (a shape without values); give a tensor that holds "
                                 "pixel values (on the CPU or a GPU)")
        if images.shape[0] == 0:
            raise UserInputError("images is an empty batch (N = 0); give at least one image")
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(images, FakeTensor):  # a shapes-only pass: no values to check
            return images
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            nans = int(torch.isnan(images).sum())
            raise UserInputError(f"images hold {nans} NaN and {int((~finite).sum()) - nans} infinite value(s) (the "
                                 f"first at index {tuple(bad)}); every pixel must be a finite number")
        return images

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
        return select_seeds(recording.output, recording.layer, channel, position, top_k)

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
        stack = self.reverse_stack(recording)
        batches = self._batches(recording, stack, seeds)
        with torch.inference_mode(False):  # layers reversed by autograd need it, whatever the caller's mode
            parts = [self._reverse_chunk(recording, stack, seeds[torch.tensor(b, device=seeds.image.device)])
                     for b in batches]
        if len(parts) == 1:
            return parts[0]
        # a window's size depends on the seeds of its batch: bring every batch to the
        # largest (the projection is zero outside each seed's cone), in the seeds' order
        h = max(p.pixels.shape[-2] for p in parts)
        w = max(p.pixels.shape[-1] for p in parts)
        wide = [widen(p, h, w) for p in parts]
        order = torch.argsort(torch.tensor([i for b in batches for i in b])).to(parts[0].pixels.device)
        return Patches(
            torch.cat([p.pixels for p in wide])[order],
            torch.cat([p.top for p in wide])[order],
            torch.cat([p.left for p in wide])[order],
            torch.cat([p.box for p in wide])[order],
            parts[0].image_size,
        )

    def _batches(self, recording: Recording, stack: ReverseStack, seeds: Seeds) -> list[list[int]]:
        """Seeds grouped into the batches that are reversed together (at most
        ``chunk_size`` each): seeds whose cones are alike, few enough to work in cache."""
        n, out = len(seeds), recording.output
        if n <= 1 or not self.windowed or seeds.whole_map or out.dim() != 4:
            return [list(range(i, min(i + self.chunk_size, n))) for i in range(0, n, self.chunk_size)]
        top = Window.points(seeds.y, seeds.x, (out.shape[2], out.shape[3]))
        wins = self._plan(recording, stack, top, n, out.device)
        costs = []
        for step in stack.steps:
            win = wins.get(step.node)
            if win is None or len(step.out_shape) != 3:
                continue
            work = step.work if step.work is not None else _MEMORY_WORK * step.out_shape[0]
            costs.append(StepCost(win, work, int(step.out_shape[0])))
        return group_seeds(n, costs, overhead=_STEP_OVERHEAD * len(stack.steps), max_elements=_BATCH_ELEMENTS,
                           max_size=self.chunk_size)

    def _plan(self, recording: Recording, stack: ReverseStack, top: Window | None, b: int,
              dev: torch.device) -> dict[str, Window | None]:
        return plan(stack.steps, stack.seed, top, stack.image_node, tuple(recording.input_shape[1:]), batch=b,
                    device=dev)

    def _reverse_chunk(self, recording: Recording, stack: ReverseStack, seeds: Seeds) -> Patches:
        out = recording.output
        b = len(seeds)
        dev = out.device
        rows = torch.arange(b, device=dev)
        if out.dim() == 2:
            top = None
            signal = out.new_zeros(b, out.shape[1])
            signal[rows, seeds.channel] = 1.0
        elif out.dim() != 4:
            raise UnsupportedModelError(f"layer '{recording.layer}' outputs shape {tuple(out.shape)}; zfvis projects "
                                        "(N, C, H, W) maps and (N, F) vectors")
        elif seeds.whole_map:
            top = Window.whole(b, (out.shape[2], out.shape[3]), dev)
            signal = out.new_zeros(b, *out.shape[1:])
            signal[rows, seeds.channel] = out[seeds.image, seeds.channel]
        elif self.windowed:
            top = Window.points(seeds.y, seeds.x, (out.shape[2], out.shape[3]))
            signal = out.new_zeros(b, out.shape[1], 1, 1)
            signal[rows, seeds.channel, 0, 0] = 1.0
        else:
            top = Window.whole(b, (out.shape[2], out.shape[3]), dev)
            signal = out.new_zeros(b, *out.shape[1:])
            signal[rows, seeds.channel, seeds.y, seeds.x] = 1.0
        wins = self._plan(recording, stack, top, b, dev)
        if not self.windowed:
            wins = {k: (None if w is None else Window.whole(b, w.map_size, dev)) for k, w in wins.items()}
            wins[stack.seed] = top
        bottom = wins.get(stack.image_node)
        if bottom is None:
            raise UnsupportedModelError("the model's input is not an image batch (N, C, H, W)")
        with torch.no_grad():
            pixels = stack.run(signal, wins, seeds.image, recording.rule)
            if not seeds.whole_map:
                # the reverse pass is positively homogeneous: a unit seed scaled by the
                # activation's value equals the value seeded (and is exact for negative ones)
                pixels = pixels * seeds.value.to(pixels.dtype).view(-1, 1, 1, 1)
        box = torch.stack(bottom.cone, dim=1)
        return Patches(pixels.contiguous(), bottom.top, bottom.left, box, bottom.map_size)

    def project(
        self,
        images: torch.Tensor,
        layer: str,
        channel: int | Sequence[int],
        position: Position | str | None = None,
        *,
        top_k: int | None = None,
        rule: str | None = None,
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
            rule: ``"deconvnet"``, ``"guided"`` or ``"gradient"`` (default: the Deconvnet's).

        Returns:
            (N, C, H, W); with a channel list (N, m, C, H, W); with ``top_k``
            (N, k, C, H, W); with both (N, m, k, C, H, W).
        """
        rec = self.record(images, layer, rule=rule)
        seeds = self.select(rec, channel, position, top_k)
        full = self.reverse(rec, seeds).full()
        n = images.shape[0]
        shape: list[int] = [n]
        if not _is_int(channel):
            shape.append(len(full) // n // (top_k or 1))
        if top_k is not None:
            shape.append(top_k)
        return full.reshape(*shape, *full.shape[1:])


def _check_rule(rule: object) -> str:
    if rule not in RULES:
        raise UserInputError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    return str(rule)
