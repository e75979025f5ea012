"""``zfvis project``: project the strongest activations of a layer for one image."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import RULES, CLIError, add_config_arg, add_model_args, add_output_args, command_parser, whole
from .outputs import check_output, write_settings

if TYPE_CHECKING:  # torch loads when the command runs, not for --help
    import torch

    from ..core.deconvnet import Deconvnet

__all__ = ["SMALL_MODEL_INPUT", "MAX_PANELS", "add_parser", "default_layer", "run"]

#: Input side used for a model whose preprocessing is 32x32: large enough that a
#: middle layer's receptive field covers a part of the photo, not all of it.
SMALL_MODEL_INPUT = 96
MAX_PANELS = 32


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "project",
        "Projects activations of one layer back to pixel space with a deconvnet and writes a figure: "
        "the input, each projection, and both cropped to the activation's receptive field. Projections are shown "
        "with zero as mid-grey, scaled by their largest absolute value.",
        ["zfvis project -o zfvis_project.png                 # the shipped model and photo: conv3's 9 strongest channels",
         "zfvis project --layer conv2 --channel 5 --top-k 4 --rule all -o p.png   # 4 activations, each rule"],
    )
    p.add_argument("image", nargs="?", help="image file (default: the photo shipped with zfvis)")
    add_model_args(p)
    p.add_argument("--layer", help="layer name or alias (see `zfvis layers`; default: the middle conv layer)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--channel", type=whole, action="append", help="channel to project (repeatable)")
    group.add_argument(
        "--top-channels", type=whole, default=None, help="project the N channels most active in this image (default 9)"
    )
    p.add_argument("--top-k", type=whole, default=1, help="strongest positions per channel (default 1)")
    p.add_argument("--position", help="project the activation at Y,X instead of the strongest")
    p.add_argument("--input-size", type=whole, help="side of the square model input (default: the model's own; 96 for 32x32 models)")
    p.add_argument("--rule", default="deconvnet", choices=[*RULES, "all"],
                   help="how ReLUs pass the signal back: deconvnet (Zeiler & Fergus, the default), guided "
                   "(guided backpropagation), gradient; all: the three side by side")
    add_output_args(p, "zfvis_project.png")
    add_config_arg(p)
    p.set_defaults(func=run)


def default_layer(dn: Deconvnet) -> str:
    """The middle feature-map layer (``conv3`` of ZF Net, ``conv3_3`` of VGG16, ``layer2``
    of a ResNet; a model without paper names: its middle convolution)."""
    from .models import feature_layers

    maps, _ = feature_layers(dn)
    if not maps:
        raise CLIError("the model has no convolution; pass --layer")
    return maps[len(maps) // 2]


def _after_flatten(dn: Deconvnet, layer: str, own: int) -> bool:
    """Whether a layer sees the whole input (such layers need the model's own input size)."""
    return dn.receptive_field(layer, (3, own, own)) is None


def _parse_position(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise CLIError(f"--position must be Y,X (two integers), got '{text}'") from None
    return y, x


def _check_args(args: argparse.Namespace) -> tuple[int, int] | None:
    """The checks that need no model; returns the position, if any."""
    from ..io.checks import check_int

    check_int("--top-k", args.top_k, 1, MAX_PANELS)
    if args.top_channels is not None:
        check_int("--top-channels", args.top_channels, 1, MAX_PANELS)
    for c in args.channel or []:
        check_int("--channel", c, 0)
    position = _parse_position(args.position) if args.position else None
    if position is not None and args.top_k != 1:
        raise CLIError("give either --position or --top-k, not both")
    if args.channel and len(args.channel) * args.top_k > MAX_PANELS:
        raise CLIError(f"{len(args.channel)} channels x top-k {args.top_k} is more than {MAX_PANELS} panels; ask for fewer")
    return position


def _choose_channels(args: argparse.Namespace, out_map: torch.Tensor, layer: str) -> list[int]:
    from ..io.checks import check_channels
    from ..viz.projection import strongest_channels

    n_channels = out_map.shape[1]
    if args.channel:
        return check_channels(list(dict.fromkeys(args.channel)), n_channels, layer)
    return strongest_channels(out_map, min(args.top_channels or 9, MAX_PANELS // args.top_k))


def _check_seeds(out_map: torch.Tensor, layer: str, position: tuple[int, int] | None, top_k: int) -> None:
    """Position and top-k against the layer's map, before the engine sees them."""
    if out_map.dim() != 4:
        if position is not None or top_k != 1:
            raise CLIError(f"layer '{layer}' outputs a vector: it has no positions (drop --position and --top-k)")
        return
    h, w = out_map.shape[2], out_map.shape[3]
    if position is not None and not (0 <= position[0] < h and 0 <= position[1] < w):
        raise CLIError(f"--position {position[0]},{position[1]} is outside the {h}x{w} feature map of "
                       f"'{layer}' (0..{h - 1}, 0..{w - 1})")
    if top_k > h * w:
        raise CLIError(f"--top-k {top_k} exceeds the {h}x{w} = {h * w} positions of layer '{layer}'")


def run(args: argparse.Namespace) -> int:
    from ..core.deconvnet import Deconvnet
    from ..io.images import default_image, load_image
    from ..models.zoo import get_spec
    from ..viz.projection import Selection, projection_figure, rules_figure
    from .models import fit_input_size, load_zoo_model, resolve_device, resolve_layer

    device = resolve_device(args.device)
    out = check_output(args.output, overwrite=args.overwrite)
    position = _check_args(args)
    image_path = Path(args.image) if args.image else default_image()
    if image_path.resolve() == out.resolve():
        raise CLIError(f"-o {out} would replace the input image; choose another output file")
    image = load_image(image_path)
    model, preprocess = load_zoo_model(args.model, args.weights, device)
    dn = Deconvnet(model)
    layer = default_layer(dn) if args.layer is None else args.layer  # '' is a name to refuse, not the default
    resolve_layer(dn, layer)
    own = preprocess.crop or 224
    size = args.input_size
    if size is None and own <= 64 and not _after_flatten(dn, layer, own):
        size = SMALL_MODEL_INPUT
    if size is not None:
        fit_input_size(dn, model, layer, size, own, args.model)
        preprocess = preprocess.with_size(size)
    x = preprocess(image).unsqueeze(0).to(device)
    rule = None if args.rule == "all" else args.rule
    rec = dn.record(x, layer, rule=rule)
    channels = _choose_channels(args, rec.output, layer)
    _check_seeds(rec.output, layer, position, args.top_k)
    selection = Selection(channels, args.top_k, position)
    weights = args.weights or get_spec(args.model).default_weights
    title = f"{args.model} ({weights}) / {layer} / {image_path.name} at {x.shape[-2]}x{x.shape[-1]}"
    if rule is None:
        rules_figure(dn, x, layer, selection, show=preprocess.denormalize, title=f"{title} / each rule", path=out)
    else:
        projection_figure(dn, x, layer, selection, rule=rule, show=preprocess.denormalize,
                          title=f"{title} / {rule}", path=out)
    n = len(channels) * (1 if position is not None or rec.output.dim() == 2 else args.top_k)
    settings = dict(vars(args))
    settings.update(image=str(image_path), layer=layer, channels=channels, input_size=list(x.shape[-2:]),
                    weights=weights, output=str(out))
    write_settings(out.with_suffix(".json"), settings)
    print(f"wrote {out} ({n} projections of {args.model} {layer}, rule {args.rule}; "
          f"settings in {out.with_suffix('.json').name})")
    return 0
