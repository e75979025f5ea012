"""Draws docs/rules_efficientnet.png: the three rules on units of an EfficientNet-B0.

EfficientNet's rectifiers are SiLUs, so the deconvnet (relu of the signal), guided
backpropagation (f'(x) relu(signal)) and the gradient (f'(x) signal) differ there, as they
do at a VGG's ReLUs. Pretrained weights cannot be downloaded here: the network has seeded
random weights (pass a checkpoint path to use trained ones).

Usage: python scripts/make_rules_efficientnet_figure.py [IMAGE] [-o docs/rules_efficientnet.png] [--weights W.pt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import zfvis
from zfvis.viz.projection import Selection

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Draws the figure; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default=str(zfvis.default_image()), help="image (default: the shipped photo)")
    parser.add_argument("-o", "--out", default=str(ROOT / "docs" / "rules_efficientnet.png"),
                        help="PNG to write (default docs/rules_efficientnet.png)")
    parser.add_argument("--weights", default="random", help="random, DEFAULT (torchvision's), or a state dict file")
    parser.add_argument("--input-size", type=int, default=64, help="side of the model input (default 64)")
    args = parser.parse_args(argv)
    model, pre = zfvis.load_model("efficientnet_b0", weights=args.weights)
    pre = pre.with_size(args.input_size)
    x = pre(zfvis.load_image(args.image)).unsqueeze(0)
    dn = zfvis.Deconvnet(model)
    zfvis.rules_figure(dn, x, "stage3", Selection(top_channels=4), show=pre.denormalize,
                       title=f"EfficientNet-B0 ({args.weights} weights) stage3: deconvnet | guided | gradient",
                       path=args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
