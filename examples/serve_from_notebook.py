"""Serve the live explorer from Python without blocking, as in a notebook.

    python examples/serve_from_notebook.py

``zfvis.serve`` starts the server on a thread and returns at once: the notebook (or this
script) goes on, and can call the same HTTP API the page uses. In Jupyter, show the page in
the notebook with ``IPython.display.IFrame(server.url, width=1000, height=700)``.
"""

import json
import urllib.request

import zfvis

model, preprocess = zfvis.load_model("zfnet-cifar10")
with zfvis.serve(model, preprocess, images=[zfvis.default_image()], port=0) as server:   # port 0: a free port
    print("open", server.url)
    base, token = server.url.split("?token=")
    with urllib.request.urlopen(f"{base}api/info?token={token}", timeout=60) as response:
        info = json.load(response)
    print("serving", info["model"], "with", len(info["images"]), "image(s)")
print("stopped")                                                     # leaving the with-block stops it
