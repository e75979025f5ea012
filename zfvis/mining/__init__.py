"""Top-k mining over data sets (Zeiler & Fergus Fig. 2): the passes, the run folder, the gallery.

- :mod:`~zfvis.mining.pipeline`: :func:`mine`, the phases of a run;
- :mod:`~zfvis.mining.settings`: :class:`MineSettings` and what a run returns;
- :mod:`~zfvis.mining.run_folder`: the output folder, its lock and its manifest;
- :mod:`~zfvis.mining.ranks`: the processes of a torchrun run;
- :mod:`~zfvis.mining.synthesis`: a synthetic image per mined channel (``feature_vis``);
- :mod:`~zfvis.mining.gallery`: the static site of a run;
- :mod:`~zfvis.mining.pages`: a run's Fig. 2 pages, from Python.
"""

from .pipeline import mine
from .settings import MineSettings, MiningResult

__all__ = ["mine", "MineSettings", "MiningResult"]
