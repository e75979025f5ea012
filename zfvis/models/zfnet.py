"""ZF Net: the network of Zeiler & Fergus (2014), Fig. 3, and its 32x32 variant (``zfnet-cifar10``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ZFNet", "build_zfnet", "build_zfnet_cifar10"]


class ZFNet(nn.Module):
    """The network of Zeiler & Fergus (2014), Fig. 3, and its 32x32 variant.

    ImageNet version (224x224 input): conv1 96 7x7/2, 3x3/2 max-pool, contrast
    normalisation, conv2 256 5x5/2, pool, normalisation, conv3 384 3x3, conv4 384 3x3,
    conv5 256 3x3, pool, fc6 4096, fc7 4096, fc8 ``num_classes``; pools use
    ``ceil_mode`` so the map sizes are the paper's 110, 55, 26, 13, 13, 13, 6.

    Args:
        num_classes: Number of outputs of fc8.
        widths: Output channels of conv1..conv5.
        kernels: Kernel sizes of conv1..conv5.
        strides: Strides of conv1 and conv2.
        fc_width: Width of fc6 and fc7.
        batch_norm: Put a BatchNorm2d after every convolution (the 32x32 variant trains
            with it; the deconvnet folds it into the convolution).
        small_input: The 32x32 layout: "same" padding, 3x3 stride-2 pools padded by 1,
            so conv5's pool leaves 4x4 maps for a 32x32 input.
        dropout: Dropout probability before fc7 and fc8.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        widths: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256),
        kernels: tuple[int, int, int, int, int] = (7, 5, 3, 3, 3),
        strides: tuple[int, int] = (2, 2),
        fc_width: int = 4096,
        batch_norm: bool = False,
        small_input: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        pool_after = {0, 1, 4}
        for i, (out_ch, k) in enumerate(zip(widths, kernels)):
            stride = strides[i] if i < 2 else 1
            if small_input:
                pad = k // 2
            else:
                pad = 1 if i == 0 else (0 if i == 1 else 1)
            layers.append(nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            if i in pool_after:
                if small_input:
                    layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                else:
                    layers.append(nn.MaxPool2d(3, stride=2, ceil_mode=True))
                if i < 2:
                    layers.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        spatial = 4 if small_input else 6
        self.classifier = nn.Sequential(
            nn.Linear(widths[-1] * spatial * spatial, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def build_zfnet(num_classes: int = 1000) -> nn.Module:
    return ZFNet(num_classes=num_classes)


def build_zfnet_cifar10(num_classes: int = 10) -> nn.Module:
    return ZFNet(
        num_classes=num_classes,
        widths=(32, 64, 128, 128, 128),
        kernels=(5, 5, 3, 3, 3),
        strides=(1, 1),
        fc_width=512,
        batch_norm=True,
        small_input=True,
    )
