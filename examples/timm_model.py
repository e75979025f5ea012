"""A timm model, offline: MobileNetV3-Small with random weights (Hardswish, squeeze-and-excitation), under the three rules.

    pip install -e '.[timm]'          # from a checkout: timm is an optional extra
    python examples/timm_model.py

Writes ``mobilenetv3_rules.png``.
"""

import re

import torch

import zfvis

torch.manual_seed(0)
model, preprocess = zfvis.load_model("timm:mobilenetv3_small_100", weights="random")
preprocess = preprocess.with_size(64)                                 # small and quick; any size works
x = preprocess(zfvis.load_image(zfvis.default_image())).unsqueeze(0)

dn = zfvis.Deconvnet(model)
print([name for name in dn.layer_names() if re.fullmatch(r"blocks\.\d+", name)])  # its stages
for rule in zfvis.RULES:                                              # deconvnet, guided, gradient
    p = dn.project(x, "blocks.2", channel=0, rule=rule)
    print(f"{rule:>9}: {float(p.abs().sum()):.4g}")

zfvis.rules_figure(dn, x, "blocks.2", zfvis.Selection(top_channels=2), show=preprocess.denormalize,
                   title="timm:mobilenetv3_small_100 (random weights) / blocks.2", path="mobilenetv3_rules.png")
print("wrote mobilenetv3_rules.png")
