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

from .aliases import layer_aliases, register_aliases
from .analysis_figures import correspondence_figure, invariance_figure, occlusion_figure
from .correspondence import (
    CorrespondenceResult,
    PartImages,
    PartScore,
    correspondence,
    default_parts_file,
    load_parts,
)
from .data import list_images, load_image, to_rgb
from .deconv import ReverseStack
from .engine import Deconvnet, Patches, Seeds
from .errors import ForwardPassError, InputTypeError, UserInputError, ZfvisError
from .evolution import Evolution, EvolutionCell, ImageBatch, evolution, evolution_figure, load_images, sample_images
from .figures import Selection, filters_figure, projection_figure, rules_figure
from .gallery import write_site
from .mining_figures import mining_page
from .invariance import InvarianceResult, invariance, transform_images
from .occlusion import OcclusionResult, occlude, occlusion
from .ops import RULES, UnsupportedModelError
from .receptive import ReceptiveField
from .recording import Recording
from .zoo import Preprocess, WeightsDownloadError, ZFNet, list_models, load_model
from .serve import ExplorerServer, serve  # last: its modules use the names above

__version__ = "0.1.0"

__all__ = [
    "CorrespondenceResult",
    "Deconvnet",
    "Evolution",
    "EvolutionCell",
    "ExplorerServer",
    "ImageBatch",
    "ForwardPassError",
    "InputTypeError",
    "InvarianceResult",
    "OcclusionResult",
    "PartImages",
    "PartScore",
    "Patches",
    "Preprocess",
    "RULES",
    "ReceptiveField",
    "Recording",
    "ReverseStack",
    "Seeds",
    "Selection",
    "UnsupportedModelError",
    "UserInputError",
    "WeightsDownloadError",
    "ZFNet",
    "ZfvisError",
    "correspondence",
    "correspondence_figure",
    "default_image",
    "default_parts_file",
    "evolution",
    "evolution_figure",
    "filters_figure",
    "invariance",
    "invariance_figure",
    "layer_aliases",
    "list_images",
    "list_models",
    "load_image",
    "load_images",
    "load_model",
    "load_parts",
    "mining_page",
    "occlude",
    "occlusion",
    "occlusion_figure",
    "projection_figure",
    "register_aliases",
    "rules_figure",
    "sample_images",
    "serve",
    "to_rgb",
    "transform_images",
    "write_site",
]


def default_image() -> Path:
    """The photograph shipped with zfvis (a tabby cat, CC0; see ``assets/LICENSE.md``)."""
    return Path(str(resources.files("zfvis") / "assets" / "chelsea.png"))
