"""What a synthetic image maximises: a channel, a unit, a direction, or a class logit.

Every objective is a weighted sum over the layer's channels: row ``i`` of ``weights`` (U, C)
is unit ``i``'s vector over channels (one-hot for a channel, a unit or a class; the given
vector for a direction). On a feature map (N, C, H, W) the weighted map is averaged over
positions (``channel``, ``direction``) or read at one position (``unit``); on a vector (N, C),
the weighted sum is the value.

Diversity (Olah et al. 2017) asks several images of one unit to differ: it penalises the
cosine similarity of their Gram matrices (of channel correlations) at the layer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ...io.errors import UserInputError

__all__ = ["OBJECTIVES", "Objective", "diversity_penalty"]

#: The objectives :func:`zfvis.feature_vis` knows.
OBJECTIVES = ("channel", "unit", "direction", "logit")


@dataclasses.dataclass
class Objective:
    """The objective of each unit to visualise.

    Attributes:
        kind: One of :data:`OBJECTIVES`.
        weights: One row per unit over the layer's channels (U, C).
        units: What each row is: a channel or class number, or a direction's index.
        position: For ``unit``: the (row, column) in the feature map.
    """

    kind: str
    weights: torch.Tensor
    units: list[int]
    position: tuple[int, int] | None = None

    def check(self, acts: torch.Tensor, layer: str) -> None:
        """Refuses an objective that does not fit the layer's output (checked on the first forward)."""
        if acts.dim() not in (2, 4):
            raise UserInputError(f"layer '{layer}' outputs shape {tuple(acts.shape[1:])}; feature visualization "
                                 "needs a feature map (C, H, W) or a vector (C,)")
        if acts.shape[1] != self.weights.shape[1]:
            raise UserInputError(f"the direction has {self.weights.shape[1]} entries but layer '{layer}' has "
                                 f"{acts.shape[1]} channels")
        if self.kind == "unit":
            if acts.dim() != 4:
                raise UserInputError(f"layer '{layer}' outputs a vector: it has no positions (use objective='channel')")
            y, x = self.position or (0, 0)
            h, w = acts.shape[2:]
            if not (0 <= y < h and 0 <= x < w):
                raise UserInputError(f"position ({y}, {x}) is outside the {h}x{w} feature map of '{layer}' "
                                     f"(0..{h - 1}, 0..{w - 1})")

    def default_position(self, acts: torch.Tensor) -> None:
        """For ``unit`` without a position: the centre of the map."""
        if self.kind == "unit" and self.position is None and acts.dim() == 4:
            self.position = (acts.shape[2] // 2, acts.shape[3] // 2)

    def values(self, acts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The objective of each image (N,); image ``i`` is of unit ``rows[i]``."""
        w = self.weights[rows].to(acts.dtype)
        if acts.dim() == 2:
            return (acts * w).sum(1)
        if self.kind == "unit" and self.position is not None:
            y, x = self.position
            return (acts[:, :, y, x] * w).sum(1)
        return torch.einsum("nchw,nc->n", acts, w) / (acts.shape[2] * acts.shape[3])


def diversity_penalty(acts: torch.Tensor, group: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the images' Gram matrices within each run of
    ``group`` consecutive images (the images of one unit), summed over the groups; 0 for
    ``group`` 1. On a vector layer the activation vectors are compared."""
    if group < 2:
        return acts.new_zeros(())
    n, c = acts.shape[:2]
    flat = acts.reshape(n, c, -1)
    feats = torch.bmm(flat, flat.transpose(1, 2)).reshape(n, -1) if acts.dim() == 4 else flat.reshape(n, -1)
    feats = F.normalize(feats, dim=1, eps=1e-10).reshape(n // group, group, -1)
    sims = torch.bmm(feats, feats.transpose(1, 2))  # (G, k, k)
    off = sims.sum((1, 2)) - sims.diagonal(dim1=1, dim2=2).sum(1)
    return (off / group).sum()
