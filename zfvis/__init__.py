"""zfvis: deconvnet visualizations of CNN features (Zeiler & Fergus, ECCV 2014).

>>> import zfvis
>>> model, preprocess = zfvis.load_model("zfnet-cifar10")
>>> dn = zfvis.Deconvnet(model)
>>> x = preprocess(zfvis.load_image(zfvis.default_image())).unsqueeze(0)
>>> dn.project(x, "conv3", channel=5).shape
torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .data import list_images, load_image, to_rgb
from .deconv import ReverseStack
from .engine import Deconvnet, Patches, Seeds
from .receptive import ReceptiveField
from .recording import Recording, UnsupportedModelError
from .zoo import Preprocess, WeightsDownloadError, ZFNet, layer_aliases, list_models, load_model

__version__ = "0.1.0"

__all__ = [
    "Deconvnet",
    "Patches",
    "Preprocess",
    "ReceptiveField",
    "Recording",
    "ReverseStack",
    "Seeds",
    "UnsupportedModelError",
    "WeightsDownloadError",
    "ZFNet",
    "default_image",
    "layer_aliases",
    "list_images",
    "list_models",
    "load_image",
    "load_model",
    "to_rgb",
]


def default_image() -> Path:
    """The photograph shipped with zfvis (a tabby cat, CC0; see ``assets/LICENSE.md``)."""
    return Path(str(resources.files("zfvis") / "assets" / "chelsea.png"))
