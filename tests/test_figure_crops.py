"""Figures read on any CNN: where a receptive field covers the whole image, the crops show
where the projection is non-negligible (and the figure says so); titles name model and layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zfvis
from zfvis.viz import grids


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):  # noqa: ANN001, ANN202 - small tensors on a busy machine: one thread is faster
    yield


def _spot(h: int = 32, w: int = 40, at: tuple[int, int] = (10, 25), size: int = 3) -> torch.Tensor:
    p = torch.zeros(3, h, w)
    p[:, at[0] : at[0] + size, at[1] : at[1] + size] = torch.randn(3, size, size).abs() + 1
    p += 1e-4 * torch.randn(3, h, w)  # negligible everywhere else
    return p


def test_a_small_receptive_field_is_kept() -> None:
    p = _spot()
    assert grids.crop_box(p, (2, 3, 20, 22)) == ((2, 3, 20, 22), False)
    assert grids.crop_box(p, (-5, -5, 10, 50)) == ((0, 0, 10, 40), False)  # clipped, still under 90%


def test_a_whole_image_field_is_cropped_to_the_projections_support() -> None:
    torch.manual_seed(0)
    for _ in range(20):  # spots anywhere, corners included
        h, w = int(torch.randint(16, 48, ())), int(torch.randint(16, 48, ()))
        size = int(torch.randint(1, 5, ()))
        at = (int(torch.randint(0, h - size + 1, ())), int(torch.randint(0, w - size + 1, ())))
        p = _spot(h, w, at, size)
        (t, l_, b, r), support = grids.crop_box(p, (-10, -10, h + 10, w + 10))
        assert support
        assert t <= at[0] and l_ <= at[1] and b >= at[0] + size and r >= at[1] + size  # the spot is inside
        assert b - t >= 4 and r - l_ >= 4 and (b - t) * (r - l_) < 0.9 * h * w  # small, but not a speck
        assert 0 <= t < b <= h and 0 <= l_ < r <= w


def test_a_projection_everywhere_or_nowhere_keeps_the_field() -> None:
    assert grids.crop_box(torch.zeros(3, 20, 20), (0, 0, 20, 20)) == ((0, 0, 20, 20), False)
    assert grids.crop_box(torch.ones(3, 20, 20), (0, 0, 20, 20)) == ((0, 0, 20, 20), False)


class _Global(nn.Module):
    """A receptive field that covers the whole image: convolutions, then a global pool, then a 1x1 map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(1)  # switches: the projection is local
        self.head = nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.head(self.pool(torch.relu(self.conv(x)))))


def test_figures_say_when_they_crop_to_the_support_and_name_the_model() -> None:
    torch.manual_seed(0)
    dn = zfvis.Deconvnet(_Global().eval())
    x = torch.zeros(1, 3, 24, 24)
    x[..., 4:8, 15:19] = torch.rand(3, 4, 4) + 1  # one bright patch: the projection lives there
    fig = zfvis.projection_figure(dn, x, "head", zfvis.Selection(top_channels=2))
    texts = [" ".join(t.get_text().split()) for t in fig.texts]
    assert texts[0].startswith("_Global / head (deconvnet)")
    assert any("dashed boxes" in t and "5%" in t for t in texts)
    crop = fig.axes[3].images[0].get_array()  # the projection crop: smaller than the 24x24 image
    assert crop.shape[0] < 24 and crop.shape[1] < 24
    fig = zfvis.rules_figure(dn, x, "head", zfvis.Selection(top_channels=1), model_name="global-net")
    texts = [" ".join(t.get_text().split()) for t in fig.texts]
    assert texts[0].startswith("global-net / head:") and any("cropped to where" in t for t in texts)


def test_a_local_field_draws_no_dashed_box() -> None:
    model, pre = zfvis.load_model("zfnet-cifar10")
    x = pre.with_size(96)(zfvis.load_image(zfvis.default_image())).unsqueeze(0)
    fig = zfvis.projection_figure(zfvis.Deconvnet(model), x, "conv2", zfvis.Selection(top_channels=1))
    assert not any("dashed" in t.get_text() for t in fig.texts)
    assert fig.texts[0].get_text().startswith("ZFNet / conv2")
