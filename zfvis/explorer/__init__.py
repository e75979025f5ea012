"""``zfvis serve``: the live explorer in the browser.

Pick an image, see every feature map of a layer, click one and see its strongest
activation projected to pixel space, with its receptive field on the image; switch the
rule; see the unit's top 9 from a mining run; run occlusion. The page is plain HTML, CSS
and JavaScript shipped here (:mod:`zfvis.explorer.routes` documents its HTTP API).

>>> server = zfvis.serve(model, preprocess, port=0)   # doctest: +SKIP
>>> server.url, server.close()                          # doctest: +SKIP
"""

from __future__ import annotations

from .server import ExplorerServer, Limits, default_images, serve

__all__ = ["ExplorerServer", "Limits", "default_images", "serve"]
