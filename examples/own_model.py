"""Your own model class: a residual block and a concatenation, with readable layer names.

    python examples/own_model.py

Writes ``own_model.png``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import zfvis


class SmallNet(nn.Module):
    """A stem, a residual block, a concatenation and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 5, padding=2)
        self.block = nn.Conv2d(16, 16, 3, padding=1)
        self.branch = nn.Conv2d(16, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(24 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.stem(x))
        b = F.relu(self.block(a) + a)
        c = torch.cat([b, F.relu(self.branch(b))], dim=1)
        return self.head(torch.flatten(self.pool(c), 1))


zfvis.register_aliases(SmallNet, lambda m: {"conv1": "relu", "res1": "relu_1", "fused": "cat"})

torch.manual_seed(0)
model = SmallNet().eval()
dn = zfvis.Deconvnet(model)
print(dn.layer_names())

x = torch.rand(1, 3, 32, 32)
print("res1", dn.receptive_field("res1", (3, 32, 32)))
print("projection", tuple(dn.project(x, "res1", channel=3).shape))
print(dn.reverse_stack(dn.record(x, "res1")))                        # the reverse layers, as an nn.Module

zfvis.projection_figure(dn, x, "fused", zfvis.Selection(top_channels=4), title="SmallNet / fused",
                        path="own_model.png")
print("wrote own_model.png")
