"""``zfvis project``: project the strongest activations of a layer for one image."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import default_image
from ..data import load_image
from ..engine import Deconvnet
from ..render import project_figure
from ..zoo import get_spec, load_model
from ._common import CLIError, add_config_arg, add_model_args, check_output, resolve_device, write_settings

#: Input side used for a model whose preprocessing is 32x32: large enough that a
#: middle layer's receptive field covers a part of the photo, not all of it.
SMALL_MODEL_INPUT = 96
MAX_PANELS = 32


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "project",
        help="project a layer's strongest activations for an image to pixel space (the default command)",
        description="Projects activations of one layer back to pixel space with a deconvnet and writes a figure: "
        "the input, each projection, and both cropped to the activation's receptive field. Projections are shown "
        "with zero as mid-grey, scaled by their largest absolute value.",
    )
    p.add_argument("image", nargs="?", help="image file (default: the photo shipped with zfvis)")
    add_model_args(p)
    p.add_argument("--layer", help="layer name or alias (see `zfvis layers`; default: the middle conv layer)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--channel", type=int, action="append", help="channel to project (repeatable)")
    group.add_argument(
        "--top-channels", type=int, default=None, help="project the N channels most active in this image (default 9)"
    )
    p.add_argument("--top-k", type=int, default=1, help="strongest positions per channel (default 1)")
    p.add_argument("--position", help="project the activation at Y,X instead of the strongest")
    p.add_argument("--input-size", type=int, help="side of the square model input (default: the model's own; 96 for 32x32 models)")
    p.add_argument("-o", "--output", default="zfvis_project.png", help="PNG file to write (default zfvis_project.png)")
    add_config_arg(p)
    p.set_defaults(func=run)


def default_layer(dn: Deconvnet) -> str:
    """The middle convolutional layer (by alias where the model has them)."""
    convs = [a for a in dn.aliases if a.startswith("conv")]
    if convs:
        return convs[len(convs) // 2]
    names = [n for n, m in dn.model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if not names:
        raise CLIError("the model has no convolution; pass --layer")
    return names[len(names) // 2]


def _after_flatten(dn: Deconvnet, layer: str) -> bool:
    """Whether a layer sees the whole input (fc layers need the model's own input size)."""
    target = dn.resolve(layer)
    for name, module in dn.model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Flatten)):
            return True
        if name == target:
            return False
    return False


def _parse_position(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise CLIError(f"--position must be Y,X (two integers), got '{text}'") from None
    return y, x


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    out = check_output(args.output)
    if args.top_k < 1:
        raise CLIError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_channels is not None and args.top_channels < 1:
        raise CLIError(f"--top-channels must be at least 1, got {args.top_channels}")
    spec = get_spec(args.model)
    image_path = Path(args.image) if args.image else default_image()
    image = load_image(image_path)
    model, preprocess = load_model(args.model, weights=args.weights, device=device)
    dn = Deconvnet(model)
    layer = args.layer or default_layer(dn)
    size = args.input_size
    if size is None and (preprocess.crop or 224) <= 64 and not _after_flatten(dn, layer):
        size = SMALL_MODEL_INPUT
    if size is not None:
        preprocess = preprocess.with_size(size)
    x = preprocess(image).unsqueeze(0).to(device)
    rec = dn.record(x, layer)
    out_map = rec.output
    n_channels = out_map.shape[1]
    position = _parse_position(args.position) if args.position else None
    if position is not None and args.top_k != 1:
        raise CLIError("give either --position or --top-k, not both")
    if args.channel:
        channels = list(args.channel)
    else:
        count = min(args.top_channels or 9, n_channels)
        strength = out_map[0].reshape(n_channels, -1).amax(dim=1)
        order = torch.sort(strength, descending=True, stable=True).indices
        channels = [int(c) for c in order[:count]]
    if len(channels) * args.top_k > MAX_PANELS:
        raise CLIError(f"{len(channels)} channels x top-k {args.top_k} is more than {MAX_PANELS} panels; ask for fewer")
    seeds = dn.select(rec, channels, position, top_k=args.top_k if position is None and out_map.dim() == 4 else None)
    patches = dn.reverse(rec, seeds)
    full = patches.full().cpu()
    shown = preprocess.denormalize(x[0].cpu().float())
    boxes = [tuple(int(v) for v in b) for b in patches.box.cpu()]
    titles = []
    for i in range(len(seeds)):
        where = f" @ ({int(seeds.y[i])}, {int(seeds.x[i])})" if int(seeds.y[i]) >= 0 else ""
        titles.append(f"ch {int(seeds.channel[i])}{where}\nact {float(seeds.value[i]):.3g}")
    weights = args.weights or spec.default_weights
    suptitle = f"{args.model} ({weights}) / layer {layer} / {image_path.name} at {x.shape[-2]}x{x.shape[-1]}"
    project_figure(
        shown,
        [p.float() for p in full],
        boxes,
        titles,
        suptitle,
        out,
        note="deconvnet projections: zero is grey, scaled by each projection's largest |value|; "
        "boxes: receptive field of the activation",
    )
    settings = dict(vars(args))
    settings.update(image=str(image_path), layer=layer, channels=channels, input_size=list(x.shape[-2:]),
                    weights=weights, output=str(out))
    write_settings(out.with_suffix(".json"), settings)
    print(f"wrote {out} ({len(seeds)} projections of {args.model} {layer}; settings in {out.with_suffix('.json').name})")
    return 0
