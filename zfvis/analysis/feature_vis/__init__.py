"""Feature visualization by optimization (Olah, Mordvintsev & Schubert, Distill 2017): images that
maximise a unit, computed (no drawing, no files).

- :mod:`.param`: the image parameterisations (decorrelated Fourier basis, plain pixels);
- :mod:`.transforms`: transformation robustness (padding, jitter, scale, rotation);
- :mod:`.objectives`: channel, unit, direction and class-logit objectives, and diversity;
- :mod:`.units`: the checked units of a call;
- :mod:`.tap`: a layer's output with gradients (a forward hook, or a cut copy of the traced graph);
- :mod:`.optimize`: :func:`feature_vis`, the optimisation.
"""

from .optimize import FeatureVisResult, FeatureVisSettings, feature_vis
from .transforms import Robustness

__all__ = ["FeatureVisResult", "FeatureVisSettings", "Robustness", "feature_vis"]
