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

import torch
import torchvision

import zfvis
from zfvis.viz.projection import Selection

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default=str(ROOT.parent / "shared" / "data" / "images" / "chelsea.png"))
    parser.add_argument("-o", "--out", default=str(ROOT / "docs" / "rules_efficientnet.png"))
    parser.add_argument("--weights", default=None, help="a state_dict saved with torch.save (loaded weights_only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None).eval()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    pre = torchvision.transforms.Compose([
        torchvision.transforms.Resize(160), torchvision.transforms.CenterCrop(160), torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = pre(zfvis.load_image(args.image)).unsqueeze(0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    dn = zfvis.Deconvnet(model)
    zfvis.rules_figure(dn, x, "features.3.1", Selection(top_channels=4),
                       show=lambda t: (t * std + mean).clamp(0, 1),
                       title="EfficientNet-B0 (random weights) features.3.1: deconvnet | guided | gradient",
                       path=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
