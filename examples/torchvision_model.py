"""A torchvision model, offline: ResNet-18 with random weights, projected and drawn.

    python examples/torchvision_model.py

Pretrained weights need a network once (``weights="DEFAULT"``); untrained, the model shows the
architecture at work but no learned features. Writes ``resnet18_layer3.png``.
"""

import torch

import zfvis

torch.manual_seed(0)
model, preprocess = zfvis.load_model("resnet18", weights="random")   # torchvision's ResNet-18, its preprocessing
preprocess = preprocess.with_size(112)                                # quicker than its own 224; any size works
x = preprocess(zfvis.load_image(zfvis.default_image())).unsqueeze(0)  # the shipped photo, (1, 3, 112, 112)

dn = zfvis.Deconvnet(model)
print(dn.receptive_field("layer3", tuple(x.shape[1:])))
projection = dn.project(x, "layer3", channel=[0, 1], top_k=2)         # (1, 2 channels, 2 positions, 3, 112, 112)
print("projection", tuple(projection.shape))

zfvis.projection_figure(dn, x, "layer3", zfvis.Selection(top_channels=4), show=preprocess.denormalize,
                        title="resnet18 (random weights) / layer3", path="resnet18_layer3.png")
print("wrote resnet18_layer3.png")
