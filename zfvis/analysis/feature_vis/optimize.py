"""Feature visualization by optimization: :func:`feature_vis`, images that maximise units.

Starting from near-grey images, Adam changes the parameters of a batch of images
(:mod:`.param`) so that each maximises its unit's objective (:mod:`.objectives`) at the
layer, under random jitter, scaling and rotation (:mod:`.transforms`). All units of a call
are optimised together, ``batch_size`` images at a time. The model runs in eval mode and
is left exactly as it was given (parameters, buffers, gradients, modes, hooks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...core.deconvnet import Deconvnet
from ...core.graph import eval_mode
from ...io import progress as _progress
from ...io.checks import check_int, check_model, check_number, forward_failure
from ...io.errors import InputTypeError, UserInputError, is_out_of_memory
from ...models import aliases as _aliases  # noqa: F401 - registers the zoo's layer names (conv3, conv5_3, ...)
from .objectives import Objective, diversity_penalty
from .param import PARAMS, ImageParam
from .tap import LayerTap, redirected_relu
from .transforms import Robustness
from .units import make_objective

__all__ = ["REDIRECT_STEPS", "FeatureVisResult", "FeatureVisSettings", "feature_vis"]

#: Steps at the start (at most a quarter of them) in which a ReLU layer passes the gradient of units
#: that are off (:func:`.tap.redirected_relu`; Lucid's 16).
REDIRECT_STEPS = 16


@dataclasses.dataclass
class FeatureVisResult:
    """Synthetic images and how their objectives rose.

    Attributes:
        images: The images (N, 3, H, W) in [0, 1] RGB (before the model's normalisation), on the CPU;
            ``images_per_unit`` consecutive images per unit.
        units: The unit of each image (N): a channel or class number, or a direction's index.
        layer: The layer as given (``None`` for class logits).
        objective: ``"channel"``, ``"unit"``, ``"direction"`` or ``"logit"``.
        values: The objective of each image at each step, as optimised (transformed) (steps, N).
        final: The objective of each final image, untransformed (N,).
        param: ``"fourier"`` or ``"pixel"``.
        seed: The seed.
        position: For ``objective="unit"``: the (row, column) in the feature map.
    """

    images: torch.Tensor
    units: list[int]
    layer: str | None
    objective: str
    values: torch.Tensor
    final: torch.Tensor
    param: str
    seed: int
    position: tuple[int, int] | None = None

    def summary(self) -> str:
        """One line: what was optimised and how the objective rose (first step, last step, final images)."""
        v = self.values
        n = len(set(self.units))
        noun = "class" if self.objective == "logit" else self.objective
        what = f"{n} {noun}{'' if n == 1 else 'es' if noun == 'class' else 's'}"
        where = f"layer {self.layer}" if self.layer is not None else "the logits"
        return (f"{what} of {where}, {v.shape[0]} steps ({self.param}): objective mean {float(v[0].mean()):.3g} at "
                f"step 1, {float(v[-1].mean()):.3g} at the last step; final images min {float(self.final.min()):.3g}, "
                f"median {float(self.final.median()):.3g}, max {float(self.final.max()):.3g}")


@dataclasses.dataclass(frozen=True)
class FeatureVisSettings:
    """How the images are optimised (the arguments of :func:`feature_vis` after the units)."""

    steps: int = 256
    size: tuple[int, int] = (224, 224)
    batch_size: int = 32
    images_per_unit: int = 1
    seed: int = 0
    param: str = "fourier"
    transforms: Robustness | None = dataclasses.field(default_factory=Robustness)
    diversity: float = 0.0
    lr: float = 0.05
    decay: float = 1.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    progress: bool = True


def feature_vis(
    model: nn.Module | Deconvnet,
    layer: str | None = None,
    channels: Any = None,
    *,
    objective: str = "channel",
    position: tuple[int, int] | None = None,
    direction: torch.Tensor | None = None,
    steps: int = 256,
    size: int | tuple[int, int] | None = None,
    batch_size: int = 32,
    images_per_unit: int = 1,
    seed: int = 0,
    param: str = "fourier",
    transforms: bool | Robustness = True,
    diversity: float = 0.0,
    lr: float = 0.05,
    decay: float = 1.0,
    preprocess: Any = None,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> FeatureVisResult:
    """Synthetic images that maximise units of a layer (Olah et al., Distill 2017).

    Args:
        model: The network (any ``nn.Module`` zfvis traces), or its :class:`~zfvis.Deconvnet`.
        layer: A layer name or alias (``conv3``, ``features.10``, ``layer2``); ``None`` with
            ``objective="logit"`` (the model's output).
        channels: The channels (or classes) to visualise: an int, a list, or a spec like ``"0-15,32"``;
            ``None``: all. Ignored for ``direction``.
        objective: ``"channel"`` (mean of the channel's map), ``"unit"`` (the channel at ``position``),
            ``"direction"`` (the map's dot product with ``direction``, averaged over positions) or
            ``"logit"`` (a class's output).
        position: For ``unit``: (row, column) in the feature map (default its centre).
        direction: For ``direction``: a vector over the layer's channels (C,), or several (D, C).
        steps: Optimisation steps.
        size: Image side, or (H, W) (default: ``preprocess.crop``, else 224).
        batch_size: Images optimised together.
        images_per_unit: Images per unit (with ``diversity``, they are asked to differ).
        seed: Seeds the starting images and the transformations (the same seed, the same images on the CPU).
        param: ``"fourier"`` (decorrelated: scaled Fourier basis, colour decorrelation) or ``"pixel"``.
        transforms: Random jitter, scaling and rotation each step (``True``: the defaults of
            :class:`~zfvis.analysis.feature_vis.transforms.Robustness`; ``False``: none; or your own).
        diversity: Weight of the diversity penalty among a unit's images.
        lr: Adam's learning rate.
        decay: The Fourier scale's power of the frequency (1: 1/f).
        preprocess: The model's preprocessing (``zfvis.load_model``'s second value: its ``mean``, ``std`` and
            ``crop`` are used), a ``(mean, std)`` pair, or ``None`` (the model takes [0, 1] RGB).
        progress: Show a progress bar.
        on_step: Called after every step with (steps done, steps in all, over every batch); an
            exception it raises stops the optimisation and propagates (a caller's cancellation).

    Returns:
        The :class:`FeatureVisResult`.

    Raises:
        UserInputError: An unknown layer, channels out of range, a bad setting, an input size the
            model does not take (:class:`~zfvis.ForwardPassError`).
        InputTypeError: An argument of the wrong type.
    """
    dn = model if isinstance(model, Deconvnet) else Deconvnet(check_model(model))
    settings = _settings(steps=steps, size=size, batch_size=batch_size, images_per_unit=images_per_unit, seed=seed,
                         param=param, transforms=transforms, diversity=diversity, lr=lr, decay=decay,
                         preprocess=preprocess, progress=progress)
    if objective == "logit" and layer is not None:
        raise UserInputError("objective='logit' maximises the model's output; leave layer=None")
    tap = LayerTap(dn, layer)
    # autograd also when called under torch.no_grad() or torch.inference_mode()
    with eval_mode(dn.model), torch.inference_mode(False), torch.enable_grad():
        probe = _forward(tap, torch.full((1, 3, *settings.size), 0.5), settings, dn.model, probe=True)
        obj = make_objective(objective, probe, channels=channels, position=position, direction=direction,
                             layer=layer)
        obj.default_position(probe)
        obj.check(probe, layer or "output")
        return _optimize(tap, obj, settings, layer, on_step)


def _settings(**kw: Any) -> FeatureVisSettings:
    """The checked settings of one call."""
    for name in ("steps", "batch_size", "images_per_unit"):
        check_int(name, kw[name], 1)
    check_int("seed", kw["seed"], 0, 2**63 - 1)
    if kw["param"] not in PARAMS:
        raise UserInputError(f"param must be one of {', '.join(PARAMS)}, got {kw['param']!r}")
    for name in ("diversity", "decay"):
        check_number(name, kw[name], 0.0)
    check_number("lr", kw["lr"], 0.0, above=True)
    mean, std, crop = _normalisation(kw.pop("preprocess"))
    size = _size(kw.pop("size"), crop)
    t = kw.pop("transforms")
    if not isinstance(t, (bool, Robustness)):
        raise InputTypeError(f"transforms must be True, False or a Robustness, got {type(t).__name__}")
    robust = Robustness() if t is True else (t or None)
    return FeatureVisSettings(size=size, transforms=robust, mean=mean, std=std, **kw)


def _normalisation(preprocess: Any) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    if preprocess is None:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None
    if isinstance(preprocess, (tuple, list)) and len(preprocess) == 2:
        mean, std, crop = preprocess[0], preprocess[1], None
    elif hasattr(preprocess, "mean") and hasattr(preprocess, "std"):
        mean, std, crop = preprocess.mean, preprocess.std, getattr(preprocess, "crop", None)
    else:
        raise InputTypeError("preprocess must be zfvis.load_model's preprocessing, a (mean, std) pair or None, "
                             f"got {type(preprocess).__name__}")
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != 3 or len(std_t) != 3 or any(s <= 0 for s in std_t):
        raise UserInputError(f"preprocess needs 3 means and 3 positive standard deviations, got {mean_t}, {std_t}")
    return mean_t, std_t, crop if isinstance(crop, int) else None


def _size(size: Any, crop: int | None) -> tuple[int, int]:
    if size is None:
        side = crop or 224
        return side, side
    pair = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    if len(pair) != 2:
        raise UserInputError(f"size must be an int or (height, width), got {size!r}")
    return check_int("size", pair[0], 8, 4096), check_int("size", pair[1], 8, 4096)


def _model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None or not p.is_floating_point():
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


def _forward(tap: LayerTap, rgb: torch.Tensor, s: FeatureVisSettings, model: nn.Module, *,
             redirect: bool = False, probe: bool = False) -> torch.Tensor:  # fmt: skip
    """The layer's output for [0, 1] RGB images (normalised as the model expects); with ``redirect``,
    a layer's ReLU passes the gradient of units that are off (:func:`.tap.redirected_relu`). A failure
    of the ``probe`` (the first forward, on the settings as given) is the user's input's
    (:class:`~zfvis.ForwardPassError`); running out of memory is, always."""
    device, dtype = _model_place(model)
    rgb = rgb.to(device=device, dtype=dtype)
    mean = torch.tensor(s.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(s.std, device=device, dtype=dtype).view(1, 3, 1, 1)
    x = (rgb - mean) / std
    try:
        out = tap(x)
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - a forward failure on the user's settings (size, dtype)
        if is_out_of_memory(err):
            raise UserInputError(f"out of memory with a batch of {x.shape[0]} images of {x.shape[-2]}x"
                                 f"{x.shape[-1]}; pass a smaller batch_size") from None
        if not probe:
            raise
        raise forward_failure(err, model, x) from err
    if not isinstance(out, torch.Tensor):
        raise UserInputError(f"layer '{tap.layer or 'output'}' does not output one tensor")
    if tap.rectify:
        return redirected_relu(out) if redirect else torch.relu(out)
    return out


class _Steps:
    """A progress bar that also tells ``on_step`` how many steps are done."""

    def __init__(self, bar: Any, on_step: Callable[[int, int], None] | None, total: int) -> None:
        self.bar, self.on_step, self.total, self.done = bar, on_step, total, 0

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.on_step is not None:
            self.on_step(self.done, self.total)


def _optimize(tap: LayerTap, obj: Objective, s: FeatureVisSettings, layer: str | None,
              on_step: Callable[[int, int], None] | None = None) -> FeatureVisResult:  # fmt: skip
    """Every unit's images, ``batch_size`` at a time (a batch holds whole groups of a unit's images)."""
    k = s.images_per_unit
    rows = torch.arange(len(obj.units)).repeat_interleave(k)
    gen = torch.Generator().manual_seed(s.seed)
    device, dtype = _model_place(tap.model)
    start = ImageParam.random(s.param, len(rows), s.size, generator=gen, decay=s.decay, dtype=dtype, device=device)
    per_batch = max(k, s.batch_size - s.batch_size % k)
    chunks = [slice(i, min(i + per_batch, len(rows))) for i in range(0, len(rows), per_batch)]
    images, values, final = [], [], []
    desc = f"feature vis {layer or 'logits'}"
    with _progress.progress(len(chunks) * s.steps, desc, "step", show=s.progress) as shown:
        bar = _Steps(shown, on_step, len(chunks) * s.steps)
        for sl in chunks:
            param = ImageParam(s.param, start.params[sl].detach().clone().requires_grad_(True), s.size, s.decay)
            vals = _run_batch(tap, obj, param, rows[sl].to(device), s, gen=gen, bar=bar)
            with torch.no_grad():
                img = param.image()
                final.append(obj.values(_forward(tap, img, s, tap.model), rows[sl].to(device)).float().cpu())
            images.append(img.detach().float().cpu())
            values.append(vals)
    return FeatureVisResult(torch.cat(images), [obj.units[int(r)] for r in rows], layer, obj.kind,
                            torch.cat(values, 1), torch.cat(final), s.param, s.seed, obj.position)


def _run_batch(tap: LayerTap, obj: Objective, param: ImageParam, rows: torch.Tensor, s: FeatureVisSettings, *,
               gen: torch.Generator, bar: Any) -> torch.Tensor:  # fmt: skip
    """Optimises one batch; returns its objective values per step (steps, B)."""
    opt = torch.optim.Adam([param.params], lr=s.lr)
    values = torch.empty(s.steps, len(rows))
    redirect = min(REDIRECT_STEPS, s.steps // 4)
    for step in range(s.steps):
        img = param.image()
        if s.transforms is not None:
            img = s.transforms(img, gen)
        acts = _forward(tap, img, s, tap.model, redirect=step < redirect)
        v = obj.values(acts, rows)
        loss = -v.sum()
        if s.diversity > 0 and s.images_per_unit > 1:
            loss = loss + s.diversity * diversity_penalty(acts, s.images_per_unit)
        (grad,) = torch.autograd.grad(loss, [param.params])
        param.params.grad = grad
        opt.step()
        values[step] = v.detach().float().cpu()
        bar.update(1)
    param.params.grad = None
    return values

