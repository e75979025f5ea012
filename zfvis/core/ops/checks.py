"""Checks of a recorded site's arguments (``prepare``): what is refused, and each node's cone."""

from __future__ import annotations

from typing import Any

import torch

from .args import _conv_args, _pool_args, target_name
from .site import Live, Site

__all__ = ["DIVISIONS", "scale_operands"]

# --------------------------------------------------------------------------- checks


def _prepare_conv(site: Site) -> None:
    if _conv_args(site)["padding_mode"] != "zeros":  # reflect, replicate, circular: its true backward, whole maps
        site.hand_to = "vjp"


def _prepare_bn(site: Site) -> None:
    bn = site.node.module
    if bn is None or bn.running_var is None or bn.running_mean is None:
        raise site.fail(
            "BatchNorm2d without running statistics (track_running_stats=False) normalises with each batch's "
            "statistics even in eval mode, which is not a linear map of one image; zfvis cannot reverse it"
        )


def _prepare_maxpool(site: Site) -> None:
    if _pool_args(site)["return_indices"]:
        raise site.fail("max-pooling that returns its indices is not supported")


def _prepare_adaptive(site: Site) -> None:
    (h_in, w_in), (h_out, w_out) = site.in_shapes[0][-2:], site.out_shape[-2:]
    site.cone = "spatial" if h_in % h_out == 0 and w_in % w_out == 0 else "full"


def _spatial_same(site: Site) -> bool:
    """Whether every live input has the output's last two dims (a map window passes through)."""
    return len(site.out_shape) >= 2 and all(
        len(s) >= 2 and s[-2:] == site.out_shape[-2:] for s in site.in_shapes
    )


def _prepare_elementwise(site: Site) -> None:
    site.cone = "same" if all(s == site.out_shape for s in site.in_shapes) else "full"


#: Division's function and method names (the rest of the ``scale`` op multiplies).
DIVISIONS = frozenset({"truediv", "itruediv", "div", "div_"})


def scale_operands(site: Site) -> tuple[Any, Any]:
    """The two operands of a multiplication or division (``-x``: ``x`` and -1)."""
    if target_name(site.node) == "neg":
        return site.arg(0, "input"), -1.0
    return site.arg(0, "input"), site.arg(1, "other")


def _map_constant(v: Any) -> bool:
    """Whether a constant factor is the same at every (y, x) (a window can be scaled by it)."""
    if not isinstance(v, torch.Tensor):
        return True
    return v.numel() == 1 or (v.dim() >= 2 and tuple(v.shape[-2:]) == (1, 1))


def _prepare_scale(site: Site) -> None:
    name = target_name(site.node)
    if name in DIVISIONS and site.kwargs.get("rounding_mode", site.args[2] if len(site.args) > 2 else None):
        raise site.fail("division with a rounding_mode has no gradient (it is zero almost everywhere), so "
                        "nothing can be sent back through it")
    a, b = scale_operands(site)
    if isinstance(b, Live) and name in DIVISIONS:  # a quotient of input-dependent tensors: its gradient
        site.cone = "full"
    elif isinstance(a, Live) and isinstance(b, Live):  # the product rule
        site.cone = "same" if all(s == site.out_shape for s in site.in_shapes) else "full"
    else:
        site.cone = "same" if _map_constant(b if isinstance(a, Live) else a) else "full"


def _prepare_cat(site: Site) -> None:
    tensors = site.arg(0, "tensors")
    dim = site.arg(1, "dim", 0)
    ndim = len(site.out_shape) + 1
    dim = dim % ndim
    if dim == 0:
        raise site.fail("concatenation along the batch dimension is not supported")
    if any(not isinstance(t, Live) for t in tensors):
        site.cone = "full"
    else:
        site.cone = "same" if dim < ndim - 2 and _spatial_same(site) else "full"


def _prepare_reshape(site: Site) -> None:
    site.cone = "same" if _spatial_same(site) and len(site.in_shapes[0]) >= 2 else "full"


def _keeps_batch(index: tuple[Any, ...], spread: int) -> bool:
    """Whether a basic index keeps the batch as the first dimension, whole: the first
    element that indexes a dimension is ``:`` or an ``...`` that spans at least one
    (``spread`` dimensions), and no ``None`` comes before it."""
    for e in index:
        if e is None:
            return False
        if e is Ellipsis:
            return spread > 0
        return e == slice(None)
    return False


def _prepare_getitem(site: Site) -> None:
    index = site.args[1]
    index = index if isinstance(index, tuple) else (index,)
    for e in index:
        if not (e is None or e is Ellipsis or isinstance(e, (int, slice))):
            raise site.fail("indexing with tensors or lists is not supported (use slices)")
    explicit = [e for e in index if e is not None and e is not Ellipsis]
    in_dims = len(site.in_shapes[0]) + 1
    if not _keeps_batch(index, in_dims - len(explicit)):
        raise site.fail("indexing the batch dimension is not supported; index with [:, ...] or [..., k]")
    touches_map = Ellipsis in index or len(explicit) > in_dims - 2
    site.cone = "full" if touches_map or not _spatial_same(site) else "same"


def _prepare_hardtanh(site: Site) -> None:
    lo, hi = site.arg(1, "min_val", -1.0), site.arg(2, "max_val", 1.0)
    if (float(lo), float(hi)) != (0.0, 6.0):  # a capped rectifier or a clamp: which rule is not settled
        raise site.fail(f"hardtanh({lo}, {hi}) is not supported (only ReLU6 = hardtanh(0, 6))")




#: Dropout functions, and their ``training`` argument's position.
_DROPOUTS = {"dropout": 2, "dropout1d": 2, "dropout2d": 2, "dropout3d": 2, "alpha_dropout": 2,
             "feature_alpha_dropout": 2, "stochastic_depth": 3}


def _prepare_identity(site: Site) -> None:
    name = target_name(site.node)
    if site.node.module is None and name in _DROPOUTS and site.arg(_DROPOUTS[name], "training", True) is not False:
        raise site.fail(f"F.{name} with training=True (its default) drops values at random even in eval mode, "
                        "which zfvis cannot reverse. Hint: pass training=self.training, or use nn.Dropout")


def _prepare_batch_norm_function(site: Site) -> None:
    training = site.arg(5, "training", False)
    if training or site.arg(2, "running_var") is None:
        raise site.fail("batch norm with batch statistics (training=True or no running statistics) is not a "
                        "linear map of one image; zfvis cannot reverse it")
