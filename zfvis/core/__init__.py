"""The deconvnet itself: no drawing, no files.

- :mod:`~zfvis.core.graph`: the model as a torch.fx graph, its node names;
- :mod:`~zfvis.core.ops`: the one op table (what each operation records and becomes);
- :mod:`~zfvis.core.record`: the forward pass that records what a reverse pass needs;
- :mod:`~zfvis.core.cone`: receptive fields and the cones (windows) that bound a reverse pass;
- :mod:`~zfvis.core.windows`: cutting and pasting windows of signals;
- :mod:`~zfvis.core.reverse`: the reverse layers and the reverse pass;
- :mod:`~zfvis.core.seeds`: the activations to project, and the patches they give;
- :mod:`~zfvis.core.layers`: the layer names a person may give;
- :mod:`~zfvis.core.aliases`: the papers' layer names for known architectures;
- :mod:`~zfvis.core.deconvnet`: :class:`Deconvnet`, which puts them together.

It imports neither matplotlib nor Pillow.
"""

from .deconvnet import Deconvnet
from .seeds import Patches, Seeds

__all__ = ["Deconvnet", "Patches", "Seeds"]
