"""``zfvis occlude``: occlusion sensitivity of one image (ZF Fig. 7)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._analysis import (
    FILL_HELP,
    class_names,
    fill_rgb,
    format_probability,
    no_class_names,
    parse_fill,
    parse_target,
    write_results,
)
from ._common import CLIError, add_config_arg, add_model_args, add_output_args, command_parser, whole
from .outputs import check_output

if TYPE_CHECKING:  # torch loads when the command runs, not for --help
    import torch

    from ..analysis.occlusion import OcclusionResult
    from ..core.deconvnet import Deconvnet

__all__ = ["TOP_K", "add_parser", "run"]

TOP_K = 4


# ----------------------------------------------------------------------------- the command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "occlude",
        "Slides an occluder over the image and maps, per position, the total activation of one "
        "feature map, the probability of the target class and the most probable class; draws the figure of "
        "Zeiler & Fergus Fig. 7 with that feature map's strongest activations projected to pixel space.",
        ["zfvis occlude -o zfvis_occlusion.png               # the shipped cat and model: conv5, patch 8, stride 2",
         "zfvis occlude --patch 12 --stride 4 --target cat --fill gray -o occ.png   # a larger grey occluder"],
    )
    p.add_argument("image", nargs="?", help="image file (default: the photo shipped with zfvis)")
    add_model_args(p)
    p.add_argument("--layer", help="layer whose feature map is mapped (default: the last conv layer)")
    p.add_argument("--channel", type=whole, help="feature map of --layer (default: the strongest on the image)")
    p.add_argument("--patch", type=whole, help="occluder side in pixels (default: a quarter of the input side)")
    p.add_argument("--stride", type=whole, help="step between positions in pixels (default: a quarter of the patch)")
    p.add_argument("--fill", default="mean", help=FILL_HELP)
    p.add_argument("--target", help="class number or name whose probability is mapped (default: the top class)")
    p.add_argument("--batch-size", type=whole, default=32, help="positions per batch (default 32)")
    p.add_argument("--method", choices=("auto", "incremental", "full"), default="auto",
                   help="incremental (only the occluder's cone is recomputed) or full re-inference (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_args(p, "zfvis_occlusion.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def _geometry(args: argparse.Namespace, side: int) -> tuple[int, int]:
    patch = args.patch if args.patch is not None else max(1, round(side / 4))
    stride = args.stride if args.stride is not None else max(1, patch // 4)
    if patch < 1 or stride < 1:
        raise CLIError(f"--patch and --stride must be at least 1, got {patch} and {stride}")
    if patch > side:
        raise CLIError(f"--patch {patch} is larger than the {side}x{side} model input")
    return patch, stride


def _projections(dn: Deconvnet, x: torch.Tensor, layer: str, channel: int, shown: torch.Tensor
                 ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:  # fmt: skip
    """The channel's strongest activations on the image, projected, beside their patches."""
    rec = dn.record(x, layer)
    top_k = None if rec.output.dim() == 2 else min(TOP_K, rec.output[0, 0].numel())
    seeds = dn.select(rec, channel, top_k=top_k)
    patches = dn.reverse(rec, seeds)
    pairs = [(crop.float(), shown[:, t:b, l:r]) for crop, (t, l, b, r) in zip(patches.crops(), patches.boxes())]
    labels = [f"{float(v):.3g} at ({int(y)}, {int(x_)})" if int(y) >= 0 else f"{float(v):.3g}"
              for v, y, x_ in zip(seeds.value, seeds.y, seeds.x)]
    return pairs, labels


def run(args: argparse.Namespace) -> int:
    from ..analysis.occlusion import occlusion
    from ..core.deconvnet import Deconvnet
    from ..io.images import default_image, load_image
    from ..models.zoo import get_spec
    from ..viz.analysis import occlusion_figure
    from .models import feature_layers, load_zoo_model, resolve_device, resolve_layer

    device = resolve_device(args.device)
    out = check_output(args.output, overwrite=args.overwrite)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    image_path = Path(args.image) if args.image else default_image()
    if image_path.resolve() == out.resolve():
        raise CLIError(f"-o {out} would replace the input image; choose another output file")
    image = load_image(image_path)
    model, preprocess = load_zoo_model(args.model, args.weights, device)
    names = class_names(args.model, args.weights)
    target = parse_target(args.target, names, why=no_class_names(args.model, args.weights))
    fill = parse_fill(args.fill, preprocess)
    dn = Deconvnet(model)
    layer = args.layer if args.layer is not None else feature_layers(dn)[0][-1]  # '' is refused, not the default
    resolve_layer(dn, layer)
    x = preprocess(image).to(device)
    patch, stride = _geometry(args, min(x.shape[-2:]))
    res = occlusion(model, x, patch=patch, stride=stride, fill=fill, target=target, layer=layer, channel=args.channel,
                    batch_size=args.batch_size, method=args.method, progress=not args.no_progress)
    shown = preprocess.denormalize(x.cpu().float())
    try:
        pairs, labels = _projections(dn, x[None], layer, res.channel, shown)  # type: ignore[arg-type]
        note = (f"(c): deconvnet projections of the {len(pairs)} strongest activations of map {res.channel} on the "
                "unoccluded image (0 is grey), with their values and positions (row, column) in the feature map")
    except ValueError as err:  # the engine cannot project this model or layer
        pairs, labels, note = [], [], f"(c) not drawn: {str(err).splitlines()[0][:150]}"
    weights = args.weights or get_spec(args.model).default_weights
    title = (f"Occlusion: {args.model} ({weights}), {image_path.name} at {x.shape[-1]}x{x.shape[-2]}, "
             f"patch {patch}, stride {stride}, fill {args.fill}")
    occlusion_figure(res, shown, projections=pairs, projection_labels=labels, class_names=names,
                     fill_rgb=fill_rgb(fill, preprocess), title=title,
                     note=note + f"; computed with the {res.method} method", path=out)
    _write_json(out.with_suffix(".json"), args, res, names, image_path=image_path, layer=layer, patch=patch,
                stride=stride, weights=weights)
    _summary(res, names, out)
    return 0


def _write_json(path: Path, args: argparse.Namespace, res: OcclusionResult, names: list[str] | None, *,
                image_path: Path, layer: str, patch: int, stride: int, weights: str) -> None:  # fmt: skip
    settings: dict[str, Any] = dict(vars(args))
    settings.update(image=str(image_path), layer=layer, channel=res.channel, patch=patch, stride=stride, weights=weights,
                    target=res.target, output=str(path.with_suffix(".png")))
    write_results(path, settings, result={
        "target": res.target, "target_name": names[res.target] if names else None, "base_prob": res.base_prob,
        "tops": res.tops.tolist(), "lefts": res.lefts.tolist(), "class_prob": res.class_prob.tolist(),
        "top_class": res.top_class.tolist(), "activation": None if res.activation is None else res.activation.tolist(),
        "method": res.method,
    })  # fmt: skip


def _summary(res: OcclusionResult, names: list[str] | None, out: Path) -> None:
    label = names[res.target] if names else f"class {res.target}"
    i, j = divmod(int(res.class_prob.argmin()), res.shape[1])
    t, l, _, _ = res.box(i, j)
    print(f"p({label}) = {format_probability(res.base_prob)} unoccluded; lowest "
          f"{format_probability(float(res.class_prob[i, j]))} with the occluder's top left at row {t}, column {l}; "
          f"{res.shape[0]}x{res.shape[1]} positions ({res.method})")
    print(f"wrote {out} (maps and settings in {out.with_suffix('.json').name})")
