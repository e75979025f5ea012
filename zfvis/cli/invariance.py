"""``zfvis invariance``: feature distances and class probability under translation, scaling
and rotation (ZF Fig. 5)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.errors import UserInputError
from ._analysis import (
    class_names,
    no_class_names,
    parse_fill,
    parse_layers,
    parse_target,
    write_results,
)
from ._common import CLIError, add_config_arg, add_model_args, add_output_args, command_parser
from .outputs import check_output

if TYPE_CHECKING:  # torch loads when the command runs, not for --help
    import torch

    from ..analysis.invariance import InvarianceResult
    from ..core.deconvnet import Deconvnet

__all__ = [
    "DEFAULT_RANGES",
    "TRANSFORMS",
    "add_parser",
    "run",
]

#: The transformations (:data:`zfvis.analysis.invariance.TRANSFORMS`, which loads torch; a test keeps them equal).
TRANSFORMS = ("translation", "scale", "rotation")

#: Default ranges (start, stop, step; stop included). Translation is a fraction of the side.
DEFAULT_RANGES = {"translation": (-0.27, 0.27, None), "scale": (1.0, 1.8, 0.05), "rotation": (0.0, 360.0, 15.0)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "invariance",
        "Translates (vertically), scales and rotates each image over a range and plots, per "
        "transformation, the Euclidean distance between the transformed and the original image's feature vector "
        "at a low and a high layer, and the probability of the image's class: one curve per image.",
        ["zfvis invariance -o zfvis_invariance.png           # the three faces shipped with zfvis, conv1 and fc7",
         "zfvis invariance zfvis/assets/chelsea.png --transform rotation --rotations 0:360:30 -o rot.png"
         "   # one image, one transform"],
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (default: the three faces shipped with zfvis)")
    add_model_args(p)
    p.add_argument("--transform", default=",".join(TRANSFORMS),
                   help=f"comma-separated, from {', '.join(TRANSFORMS)} (default: all)")
    p.add_argument("--layers", help="a low and a high layer, e.g. conv1,fc7 "
                   "(default: the first conv layer and fc7, or the first and last layers)")
    p.add_argument("--translations", help="vertical shifts START:STOP:STEP in pixels, e.g. --translations=-8:8:2 "
                   "(default: about ±27%% of the side)")
    p.add_argument("--scales", help="scale factors START:STOP:STEP (default 1:1.8:0.05)")
    p.add_argument("--rotations", help="angles START:STOP:STEP in degrees (default 0:360:15)")
    p.add_argument("--target", action="append", help="class number or name of the images (once for all, or once "
                   "per image; default: each image's top class)")
    p.add_argument("--fill", default="mean", help="colour of the pixels a transformation uncovers: mean (the data "
                   "set's mean colour), gray, black, or a VALUE in model input space (default mean)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_args(p, "zfvis_invariance.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def _amounts(args: argparse.Namespace, transform: str, side: int) -> list[float]:
    from ..io.parse import parse_range

    given = {"translation": args.translations, "scale": args.scales, "rotation": args.rotations}[transform]
    if given is not None:
        return _parse_amounts(given, transform)
    start, stop, step = DEFAULT_RANGES[transform]
    if transform == "translation":
        reach = max(1, round(side * stop))
        step = max(1, round(reach / 8))
        return [float(v) for v in range(-reach, reach + 1, step)]
    return parse_range(f"{start}:{stop}:{step}", transform)


def _parse_amounts(text: str, transform: str) -> list[float]:
    """``--translations``/``--scales``/``--rotations``: a range or list (:func:`zfvis.io.parse.parse_range`),
    each amount checked as the transformation needs it (whole pixels, positive factors)."""
    from ..analysis.invariance import check_amount
    from ..io.parse import parse_range

    option = f"--{transform}s"
    values = parse_range(text, option)
    try:
        for v in values:
            check_amount(transform, v)
    except UserInputError as err:
        raise CLIError(f"{option} {text!r}: {err}") from None
    return values


def _default_images() -> list[Path]:
    from ..analysis.correspondence import default_parts_file
    from ..io.images import default_image

    folder = default_parts_file().parent
    return [default_image(), folder / "astronaut_face.jpg", folder / "grace_hopper_face.jpg"]


def _default_layers(dn: Deconvnet) -> list[str]:
    from .models import feature_layers

    convs, fcs = feature_layers(dn)
    if "fc7" in fcs and convs:
        return [convs[0], "fc7"]
    names = convs + fcs
    return [names[0], names[-1]] if len(names) > 1 else names


def _examples(x: torch.Tensor, transform: str, amounts: list[float], denorm: Any, fill: Any) -> list[tuple[str, torch.Tensor]]:
    from ..analysis.invariance import transform_images

    picks = [amounts[round(k * (len(amounts) - 1) / 3)] for k in range(4)] if len(amounts) >= 4 else amounts
    unit = {"translation": " px", "scale": "x", "rotation": "°"}[transform]
    return [(f"{v:g}{unit}", denorm(transform_images(x[None], transform, v, fill=fill)[0])) for v in picks]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.invariance import invariance
    from ..core.deconvnet import Deconvnet
    from ..io.images import load_image
    from ..io.parse import parse_names
    from ..models.zoo import get_spec
    from ..viz.analysis import invariance_figure
    from .models import load_zoo_model, resolve_device, resolve_layer

    device = resolve_device(args.device)
    out = check_output(args.output, overwrite=args.overwrite)
    transforms = parse_names(args.transform, "--transform", example=",".join(TRANSFORMS))
    bad = [t for t in transforms if t not in TRANSFORMS]
    if bad:
        raise CLIError(f"unknown transform '{bad[0]}'; use {', '.join(TRANSFORMS)}")
    for transform, given in (("translation", args.translations), ("scale", args.scales), ("rotation", args.rotations)):
        if given is not None:
            _parse_amounts(given, transform)  # bad ranges fail before anything loads
    paths = [Path(p) for p in args.images] or _default_images()
    pictures = [load_image(p) for p in paths]
    model, preprocess = load_zoo_model(args.model, args.weights, device)
    dn = Deconvnet(model)
    layers = parse_layers(args.layers, _default_layers(dn))
    for layer in layers:
        resolve_layer(dn, layer)
    names = class_names(args.model, args.weights)
    targets = [parse_target(t, names, why=no_class_names(args.model, args.weights)) for t in args.target] if args.target else None
    if targets is not None and len(targets) not in (1, len(paths)):
        raise CLIError(f"give --target once for all images or once per image ({len(paths)}), not {len(targets)} times")
    fill = parse_fill(args.fill, preprocess)
    x = torch.stack([preprocess(p) for p in pictures]).to(device)
    results, examples = [], []
    for transform in transforms:
        amounts = _amounts(args, transform, min(x.shape[-2:]))
        results.append(invariance(model, x, transform, amounts, layers, targets=targets, fill=fill,
                                  progress=not args.no_progress))
        examples.append(_examples(x[0].cpu(), transform, amounts, preprocess.denormalize, fill))
    weights = args.weights or get_spec(args.model).default_weights
    title = f"Invariance: {args.model} ({weights}), {len(paths)} images at {x.shape[-1]}x{x.shape[-2]}"
    invariance_figure(results, [p.name for p in paths], examples=examples, class_names=names, title=title, path=out)
    _write_json(out.with_suffix(".json"), args, results, paths, layers=layers, names=names, weights=weights)
    print(f"wrote {out} ({', '.join(transforms)}; layers {', '.join(layers)}; data and settings in "
          f"{out.with_suffix('.json').name})")
    return 0


def _write_json(path: Path, args: argparse.Namespace, results: list[InvarianceResult], paths: list[Path], *,
                layers: list[str], names: list[str] | None, weights: str) -> None:  # fmt: skip
    settings = dict(vars(args))
    settings.update(images=[str(p) for p in paths], layers=layers, weights=weights, output=str(path.with_suffix(".png")))
    write_results(path, settings, results=[
        {
            "transform": r.transform, "amounts": r.amounts.tolist(), "targets": r.targets.tolist(),
            "target_names": [names[t] for t in r.targets.tolist()] if names else None,
            "distances": {k: v.tolist() for k, v in r.distances.items()}, "probability": r.probability.tolist(),
        }
        for r in results
    ])  # fmt: skip
