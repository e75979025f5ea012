"""Every figure zfvis draws, one module a kind of figure; each returns a matplotlib Figure.

- :mod:`~zfvis.viz.render`: tensors to images and PNG bytes (the pixels of every figure);
- :mod:`~zfvis.viz.layout`: the figure geometry shared by every figure (sizes, text, exact pixels);
- :mod:`~zfvis.viz.projection`: ``zfvis project``'s figure and the three rules side by side;
- :mod:`~zfvis.viz.filters`: a convolution's filters (Fig. 6);
- :mod:`~zfvis.viz.analysis`: occlusion, invariance and correspondence (Figs. 5, 7, 8);
- :mod:`~zfvis.viz.evolution`: features over training (Fig. 4);
- :mod:`~zfvis.viz.sheets`: a mined channel's tiles in a sheet and a thumbnail;
- :mod:`~zfvis.viz.fig2`: the Fig. 2 pages of mined channels.
"""

from ..io.environment import prepare_matplotlib

prepare_matplotlib()  # before any module of this package imports matplotlib
