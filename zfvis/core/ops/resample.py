"""The ``interpolate`` op: ``F.interpolate`` and ``nn.Upsample`` (and its nearest and bilinear
subclasses) in modes nearest, nearest-exact, bilinear and bicubic, reversed on windows.

Each call's weights along rows and columns are measured once per recording by running the
interpolation itself on one-hot inputs (:mod:`zfvis.core.resampling`); its reverse is their
transpose on each seed's window, and its cone maps an output window to the input rows and
columns with a non-zero weight. Other modes, and maps that are not (N, C, H, W), are reversed
by the generic layer (their vector-Jacobian product, on whole maps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import reverse as deconv
from ..resampling import Resampling, probe
from ..reverse_shape import Resample
from .grad import build_vjp, record_vjp
from .site import Site

__all__ = ["SEPARABLE_MODES", "build_interpolate", "prepare_interpolate", "record_interpolate", "resampling"]

#: Modes whose weights factor into rows and columns (each output reads a box of inputs).
SEPARABLE_MODES = frozenset({"nearest", "nearest-exact", "bilinear", "bicubic"})

_NAMES = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_DEFAULTS: dict[str, Any] = {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
                             "recompute_scale_factor": None, "antialias": False}


def _arguments(site: Site) -> dict[str, Any]:
    """The call's arguments by name (a module's from its attributes)."""
    m = site.node.module
    if m is not None:
        return {k: getattr(m, k, v) for k, v in _DEFAULTS.items()}
    return {k: site.arg(i, k, _DEFAULTS[k]) for i, k in enumerate(_NAMES) if k != "input"}


def _along(value: Any, dim: int, other: Any) -> Any:
    """A size or scale argument for a probe along ``dim``: its value there, ``other`` for the other dimension."""
    if value is None:
        return None
    mine = value[dim] if isinstance(value, (list, tuple)) else value
    return (mine, other) if dim == 0 else (other, mine)


def _prober(a: dict[str, Any], dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The call along one dimension, with the other one of size 1 mapped to size 1."""
    size, scale = _along(a["size"], dim, 1), _along(a["scale_factor"], dim, 1.0)
    return lambda x: F.interpolate(x, size=size, scale_factor=scale, mode=a["mode"], align_corners=a["align_corners"],
                                   recompute_scale_factor=a["recompute_scale_factor"], antialias=a["antialias"])


def prepare_interpolate(site: Site) -> None:
    """Windows pass through a separable mode on (N, C, H, W) maps; anything else is generic."""
    maps = len(site.live) == 1 and len(site.in_shapes[0]) == 3 and len(site.out_shape) == 3
    site.cone = "resample" if maps and _arguments(site)["mode"] in SEPARABLE_MODES else "full"


def resampling(site: Site, like: torch.Tensor) -> Resampling:
    """The weights of the site's interpolation, measured in ``like``'s dtype and device."""
    a = _arguments(site)
    (h_in, w_in) = site.in_shapes[0][-2:]
    with torch.no_grad():
        return Resampling(probe(_prober(a, 0), h_in, 0, like), probe(_prober(a, 1), w_in, 1, like))


def record_interpolate(site: Site, inputs: list[torch.Tensor], out: torch.Tensor, rule: str) -> Any:
    """The weights; checked against the forward output (else the generic layer takes over)."""
    if site.cone == "resample":
        r = resampling(site, inputs[0])
        if r.rows.shape[0] == out.shape[-2] and r.cols.shape[0] == out.shape[-1]:
            again = r.rows @ inputs[0].to(r.rows.dtype) @ r.cols.T
            scale = float(out.abs().max()) if out.numel() else 0.0
            if torch.allclose(again, out, rtol=1e-4, atol=1e-5 * scale + 1e-30):
                return r
        site.cone = "full"
    return record_vjp(site, inputs, out, rule)


def build_interpolate(site: Site) -> deconv.ReverseLayer:
    if site.cone != "resample":
        return build_vjp(site)
    return Resample(site.state, site.node.module_name or site.node.name, site.node.kind,
                    str(_arguments(site)["mode"]))
