"""The experiments of Zeiler & Fergus, each computing data (no drawing, no files).

- :mod:`~zfvis.analysis.occlusion`: occlusion sensitivity (Fig. 7), with its incremental
  engine (:mod:`~zfvis.analysis.incremental`) and that engine's per-op rules
  (:mod:`~zfvis.core.ops.incremental_rules`);
- :mod:`~zfvis.analysis.invariance`: feature changes under translation, scale, rotation (Fig. 5);
- :mod:`~zfvis.analysis.correspondence`: part correspondence across images (Fig. 8, Table 1);
- :mod:`~zfvis.analysis.evolution`: features over training (Fig. 4);
- :mod:`~zfvis.analysis.topk`: running top-k lists of activations (mining and evolution).
"""
