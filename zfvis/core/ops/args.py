"""Reading an op's arguments from a recorded site: geometry, and the node as a function."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .site import Live, Pair, Site

if TYPE_CHECKING:
    from ..graph import GraphNode

__all__ = ["target_name", "live_call"]

# --------------------------------------------------------------------------- arguments


def _pair(v: Any) -> Pair:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) else (1, 1)
    return (int(v), int(v))


def _conv_args(site: Site) -> dict[str, Any]:
    m = site.node.module
    if m is not None:
        return dict(weight=m.weight, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                    padding_mode=m.padding_mode)
    return dict(weight=site.arg(1, "weight"), stride=site.arg(3, "stride", 1), padding=site.arg(4, "padding", 0),
                dilation=site.arg(5, "dilation", 1), groups=site.arg(6, "groups", 1), padding_mode="zeros")


def _conv_params(site: Site) -> tuple[Pair, Pair, Pair, Pair]:
    a = _conv_args(site)
    k = (int(a["weight"].shape[-2]), int(a["weight"].shape[-1]))
    s, d = _pair(a["stride"]), _pair(a["dilation"])
    if isinstance(a["padding"], str):
        p = (0, 0) if a["padding"] == "valid" else (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    else:
        p = _pair(a["padding"])
    return k, s, p, d


def _pool_args(site: Site) -> dict[str, Any]:
    m = site.node.module
    if m is not None:
        return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=getattr(m, "dilation", 1), ceil_mode=m.ceil_mode,
                    return_indices=getattr(m, "return_indices", False))
    return dict(kernel_size=site.arg(1, "kernel_size"), stride=site.arg(2, "stride", None),
                padding=site.arg(3, "padding", 0), dilation=site.arg(4, "dilation", 1),
                ceil_mode=site.arg(5, "ceil_mode", False), return_indices=site.arg(6, "return_indices", False))


def _pool_params(site: Site) -> tuple[Pair, Pair, Pair, Pair]:
    a = _pool_args(site)
    k = _pair(a["kernel_size"])
    stride = a["stride"]
    s = k if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(stride)
    d = (1, 1) if site.node.op is not None and site.node.op.name == "avg_pool2d" else _pair(a["dilation"])
    return k, s, _pair(a["padding"]), d


def _adaptive_params(site: Site) -> tuple[Pair, Pair, Pair, Pair]:
    (h_in, w_in), (h_out, w_out) = site.in_shapes[0][-2:], site.out_shape[-2:]
    k = (h_in // h_out, w_in // w_out)
    return k, k, (0, 0), (1, 1)


def _live_only(site: Site, k: int = 0) -> Callable[..., torch.Tensor]:
    """The node's own operation as a function of its k-th live input (other arguments fixed).
    Given each seed's image, a tensor argument with a batch of its own (one item, or one per
    recorded image: ``torch.cat([x, torch.zeros_like(x)], 1)``) is taken per seed."""
    fxn = site.node.fx_node
    module = site.node.module

    def fill(v: Any, t: torch.Tensor, image: torch.Tensor | None) -> Any:
        if isinstance(v, Live):
            return t
        if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            return type(v)(fill(e, t, image) for e in v)
        return per_seed(v, image, site.batched)

    def fn(t: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        args = fill(site.args, t, image)
        kwargs = {key: fill(v, t, image) for key, v in site.kwargs.items()}
        if module is not None:  # its forward alone: the reverse pass runs no hooks of the model
            return module.forward(*args, **kwargs)
        if fxn.op == "call_method":
            return getattr(args[0], fxn.target)(*args[1:], **kwargs)
        return fxn.target(*args, **kwargs)

    return fn



def target_name(node: GraphNode) -> str:
    """The name of what a node calls (a function's ``__name__``, a method's name)."""
    target = node.fx_node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))



@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    """Eval semantics for a module's call (batch statistics and dropout off), every flag restored."""
    flags = [(m, m.training) for m in module.modules() if m.training]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def per_seed(v: Any, image: torch.Tensor | None, batched: frozenset[int]) -> Any:
    """A recorded argument for seeds of images ``image``: one the recording found to have the
    batch first (:attr:`Site.batched`) is taken per seed (a tensor: one item per recorded image,
    or one for all; a shape, ``t.expand(x.shape)``: the number of seeds first); anything else (a
    weight, and everything where ``image`` is ``None``) as it is."""
    if image is None or id(v) not in batched:
        return v
    if isinstance(v, torch.Size):
        return torch.Size((len(image), *v[1:]))
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return v
    return v.expand(len(image), *v.shape[1:]) if v.shape[0] == 1 else v[image]


def live_call(site: Site) -> Callable[..., torch.Tensor]:
    """The node's own operation as a function of all its live inputs, in order (other
    arguments as recorded); a module runs its ``forward`` alone (no hooks of the model),
    except a hooked leaf (:attr:`GraphNode.hooked`), whose hooks are part of what it
    computes. A module runs with eval semantics (every flag restored), as it was recorded.
    Given ``image=`` (each seed's image), other tensor arguments are taken per seed
    (:func:`per_seed`)."""
    fxn = site.node.fx_node
    module = site.node.module
    hooked = site.node.hooked

    def fill(v: Any, ts: tuple[torch.Tensor, ...], image: torch.Tensor | None = None) -> Any:
        if isinstance(v, Live):
            return ts[v.k]
        if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            return type(v)(fill(e, ts, image) for e in v)
        if isinstance(v, dict):
            return {key: fill(e, ts, image) for key, e in v.items()}
        return per_seed(v, image, site.batched)

    # an in-place call into a tensor that holds no signal (``z.index_add_(1, i, x)``): into a copy
    # of it each time, as it was recorded before the call
    copied = site.node.writes and bool(site.args) and isinstance(site.args[0], torch.Tensor)

    def fn(*ts: torch.Tensor, image: torch.Tensor | None = None) -> Any:
        args = fill(site.args, ts, image)
        if copied:
            args = (args[0].clone(), *args[1:])
        kwargs = {key: fill(v, ts, image) for key, v in site.kwargs.items()}
        if module is not None:
            with _eval(module):
                return module(*args, **kwargs) if hooked else module.forward(*args, **kwargs)
        if fxn.op == "call_method":
            return getattr(args[0], str(fxn.target))(*args[1:], **kwargs)
        return fxn.target(*args, **kwargs)  # type: ignore[operator]

    return fn
