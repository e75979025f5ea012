"""zfvis: deconvnet visualizations of CNN features (Zeiler & Fergus, ECCV 2014).

>>> import zfvis
>>> model, preprocess = zfvis.load_model("zfnet-cifar10")
>>> dn = zfvis.Deconvnet(model)
>>> x = preprocess(zfvis.load_image(zfvis.default_image())).unsqueeze(0)
>>> dn.project(x, "conv3", channel=5).shape
torch.Size([1, 3, 32, 32])

Public names are imported on first use (PEP 562): ``import zfvis`` is quick, and
``import zfvis.core`` loads no drawing code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Each public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "ExplorerServer": "zfvis.explorer.server",
    "serve": "zfvis.explorer.server",
    "CorrespondenceResult": "zfvis.analysis.correspondence",
    "PartImages": "zfvis.analysis.correspondence",
    "PartScore": "zfvis.analysis.correspondence",
    "correspondence": "zfvis.analysis.correspondence",
    "default_parts_file": "zfvis.analysis.correspondence",
    "load_parts": "zfvis.analysis.correspondence",
    "Connections": "zfvis.analysis.connections",
    "connections": "zfvis.analysis.connections",
    "Source": "zfvis.analysis.connections",
    "Evolution": "zfvis.analysis.evolution",
    "EvolutionCell": "zfvis.analysis.evolution",
    "ImageBatch": "zfvis.analysis.evolution",
    "evolution": "zfvis.analysis.evolution",
    "load_images": "zfvis.analysis.evolution",
    "sample_images": "zfvis.analysis.evolution",
    "FeatureVisResult": "zfvis.analysis.feature_vis",
    "Robustness": "zfvis.analysis.feature_vis",
    "feature_vis": "zfvis.analysis.feature_vis",
    "InvarianceResult": "zfvis.analysis.invariance",
    "invariance": "zfvis.analysis.invariance",
    "transform_images": "zfvis.analysis.invariance",
    "OcclusionResult": "zfvis.analysis.occlusion",
    "occlude": "zfvis.analysis.occlusion",
    "occlusion": "zfvis.analysis.occlusion",
    "layer_aliases": "zfvis.core.aliases",
    "register_aliases": "zfvis.core.aliases",
    "ReceptiveField": "zfvis.core.cone",
    "Deconvnet": "zfvis.core.deconvnet",
    "Patches": "zfvis.core.deconvnet",
    "Seeds": "zfvis.core.deconvnet",
    "RULES": "zfvis.core.ops",
    "Recording": "zfvis.core.record",
    "ReverseStack": "zfvis.core.reverse",
    "CaptureMismatchError": "zfvis.io.errors",
    "ForwardPassError": "zfvis.io.errors",
    "InputTypeError": "zfvis.io.errors",
    "UnsupportedModelError": "zfvis.io.errors",
    "UserInputError": "zfvis.io.errors",
    "ZfvisError": "zfvis.io.errors",
    "default_dataset": "zfvis.io.images",
    "default_image": "zfvis.io.images",
    "list_images": "zfvis.io.images",
    "load_image": "zfvis.io.images",
    "to_rgb": "zfvis.io.images",
    "write_site": "zfvis.mining.gallery",
    "mining_page": "zfvis.mining.pages",
    "Snapshots": "zfvis.models.snapshots",
    "training_snapshots": "zfvis.models.snapshots",
    "Preprocess": "zfvis.models.zoo",
    "WeightsDownloadError": "zfvis.io.errors",
    "ZFNet": "zfvis.models.zfnet",
    "list_models": "zfvis.models.zoo",
    "load_model": "zfvis.models.zoo",
    "correspondence_figure": "zfvis.viz.analysis",
    "invariance_figure": "zfvis.viz.analysis",
    "occlusion_figure": "zfvis.viz.analysis",
    "evolution_figure": "zfvis.viz.evolution",
    "feature_vis_figure": "zfvis.viz.feature_vis",
    "filters_figure": "zfvis.viz.filters",
    "Selection": "zfvis.viz.projection",
    "projection_figure": "zfvis.viz.projection",
    "rules_figure": "zfvis.viz.projection",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .analysis.correspondence import (
        CorrespondenceResult,
        PartImages,
        PartScore,
        correspondence,
        default_parts_file,
        load_parts,
    )
    from .analysis.connections import Connections, Source, connections
    from .analysis.evolution import (
        Evolution,
        EvolutionCell,
        ImageBatch,
        evolution,
        load_images,
        sample_images,
    )
    from .analysis.feature_vis import FeatureVisResult, Robustness, feature_vis
    from .analysis.invariance import InvarianceResult, invariance, transform_images
    from .analysis.occlusion import OcclusionResult, occlude, occlusion
    from .core.aliases import layer_aliases, register_aliases
    from .core.cone import ReceptiveField
    from .core.deconvnet import Deconvnet, Patches, Seeds
    from .core.ops import RULES
    from .core.record import Recording
    from .core.reverse import ReverseStack
    from .explorer.server import ExplorerServer, serve
    from .io.errors import (
        CaptureMismatchError,
        ForwardPassError,
        InputTypeError,
        UnsupportedModelError,
        UserInputError,
        WeightsDownloadError,
        ZfvisError,
    )
    from .io.images import default_dataset, default_image, list_images, load_image, to_rgb
    from .mining.gallery import write_site
    from .mining.pages import mining_page
    from .models.snapshots import Snapshots, training_snapshots
    from .models.zfnet import ZFNet
    from .models.zoo import Preprocess, list_models, load_model
    from .viz.analysis import correspondence_figure, invariance_figure, occlusion_figure
    from .viz.evolution import evolution_figure
    from .viz.feature_vis import feature_vis_figure
    from .viz.filters import filters_figure
    from .viz.projection import Selection, projection_figure, rules_figure


#: Subpackages reachable as attributes (``zfvis.mining.mine``), imported on first use too.
_SUBPACKAGES = frozenset({"analysis", "cli", "core", "explorer", "io", "mining", "models", "viz"})


#: Modules loaded with a public name's module: the zoo's layer aliases, so that
#: ``zfvis.Deconvnet(torchvision.models.vgg16())`` knows ``conv5_3`` without the zoo.
_WITH: dict[str, str] = {"zfvis.core.deconvnet": "zfvis.models.aliases"}


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"zfvis.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zfvis' has no attribute {name!r}")
    if module in _WITH:
        importlib.import_module(_WITH[module])
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBPACKAGES)
