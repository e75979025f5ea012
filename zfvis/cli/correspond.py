"""``zfvis correspond``: does the network relate the same part across images? (ZF Fig. 8, Table 1)"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from ._analysis import FILL_HELP, parse_fill, parse_layers, write_results
from ._common import CLIError, add_config_arg, add_model_args, add_output_args, command_parser, whole
from .outputs import add_inputs, check_output

if TYPE_CHECKING:  # torch loads when the command runs, not for --help
    from ..analysis.correspondence import CorrespondenceResult, PartImages
    from ..core.deconvnet import Deconvnet

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "correspond",
        "Occludes the same part (given as boxes per image in a JSON file: image -> part name -> "
        "[top, left, bottom, right]) in every image, and a box of the same size at a random place as a baseline, "
        "and measures how consistently the feature vectors change: Delta, the sum over image pairs of the "
        "normalised Hamming distance between the signs of the changes (lower: more consistent). Prints the "
        "table, writes it as CSV and JSON, and draws the parts and scores.",
        ["zfvis correspond -o zfvis_correspondence.csv       # the shipped faces: eyes, nose, mouth; conv5 and fc7",
         "zfvis correspond zfvis/assets/faces.json --layers conv3,fc6 --no-random -o parts.csv"
         "   # other layers, no baseline"],
    )
    p.add_argument("boxes", nargs="?", metavar="BOXES.json",
                   help="part boxes (default: the three faces shipped with zfvis)")
    add_model_args(p)
    p.add_argument("--layers",
                   help="comma-separated layers (default: the last conv layer and fc7, as the paper's layers 5 and 7)")
    p.add_argument("--fill", default="mean", help=FILL_HELP)
    p.add_argument("--seed", type=whole, default=0, help="seed of the random baseline boxes (default 0)")
    p.add_argument("--no-random", action="store_true", help="leave out the random baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_args(p, "zfvis_correspondence.csv", "CSV table to write",
                    beside="the results and settings (.json) and the figure (.png) go beside it")
    add_config_arg(p)
    p.set_defaults(func=run)


def _default_layers(dn: Deconvnet) -> list[str]:
    from .models import feature_layers

    convs, fcs = feature_layers(dn)
    if "fc7" in fcs and convs:
        return [convs[-1], "fc7"]
    names = convs + fcs
    return names[-2:]


def run(args: argparse.Namespace) -> int:
    from ..analysis.correspondence import correspondence, default_parts_file, load_parts, read_parts
    from ..core.deconvnet import Deconvnet
    from ..io.parse import check_seed
    from ..models.zoo import get_spec
    from ..viz.analysis import correspondence_figure
    from .models import load_zoo_model, resolve_device, resolve_layer

    device = resolve_device(args.device)
    seed = check_seed(args.seed, "--seed")
    if Path(args.output).suffix.lower() != ".csv":
        raise CLIError(f"-o must name a .csv file (the JSON and PNG go beside it), got '{args.output}'")
    boxes = Path(args.boxes) if args.boxes else default_parts_file()
    images = read_parts(boxes)  # before the outputs are checked: its images are inputs too
    add_inputs([boxes.parent / name for name in images], f"an image the part file '{boxes}' names")
    out = check_output(args.output, overwrite=args.overwrite, also=(".png",))
    layers_given = parse_layers(args.layers, [])
    model, preprocess = load_zoo_model(args.model, args.weights, device)
    dn = Deconvnet(model)
    layers = layers_given or _default_layers(dn)
    for layer in layers:
        resolve_layer(dn, layer)
    parts = load_parts(boxes, preprocess)
    fill = parse_fill(args.fill, preprocess)
    result = correspondence(model, parts.images.to(device), parts.boxes, layers, fill=fill,
                            seed=seed,
                            random_baseline=not args.no_random, progress=not args.no_progress)
    weights = args.weights or get_spec(args.model).default_weights
    print(f"Correspondence: {args.model} ({weights}), {len(parts.names)} images ({', '.join(parts.names)}), "
          f"Delta = sum over {len(parts.names) * (len(parts.names) - 1)} ordered pairs of the fraction of units whose "
          "change differs in sign; mean ± std over pairs")
    print(result.format_table())
    _write_csv(out, result)
    _write_json(out.with_suffix(".json"), args, result, parts, boxes=boxes, layers=layers, weights=weights)
    shown = [preprocess.denormalize(img) for img in parts.images]
    title = f"Correspondence: {args.model} ({weights}), occluding each part in {len(parts.names)} images"
    correspondence_figure(result, shown, parts.names, title=title, path=out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.json').name} and {out.with_suffix('.png').name}")
    return 0


def _write_csv(path: Path, result: CorrespondenceResult) -> None:
    from ..io.atomic import atomic_write_text

    buf = io.StringIO()
    records = result.records()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(path, buf.getvalue())


def _write_json(path: Path, args: argparse.Namespace, result: CorrespondenceResult, parts: PartImages, *,
                boxes: Path, layers: list[str], weights: str) -> None:  # fmt: skip
    settings = dict(vars(args))
    settings.update(boxes=str(boxes), layers=layers, weights=weights, output=str(path.with_suffix(".csv")))
    boxes_out = {label: [list(b) for b in per_image] for label, per_image in result.boxes.items()}
    pairs = {label: {layer: s.pairs.tolist() for layer, s in scores.items()} for label, scores in result.rows.items()}
    write_results(path, settings, images=parts.names, rows=result.records(), boxes=boxes_out, pairs=pairs)

