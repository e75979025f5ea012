"""Mine a folder: each channel's top activations over images, with the Fig. 2 page and a gallery.

    python examples/mine_folder.py

Copies 40 of the CIFAR-10 test images shipped with zfvis into ``data/example_images`` (class
sub-folders), mines four channels of conv3 of the shipped ``zfnet-cifar10`` over them, and
writes the run to ``runs/example_mine``: ``topk.json``, the Fig. 2 page, tiles and
``index.html``. Run again, it reuses the run (a run folder with the same settings resumes).
"""

import json
import shutil
from pathlib import Path

import zfvis

folder = Path("data/example_images")
for path in zfvis.sample_images(zfvis.default_dataset(), 40):        # evenly spaced: every class
    target = folder / path.parent.name / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copy(path, target)

model, preprocess = zfvis.load_model("zfnet-cifar10")
result = zfvis.mining.mine(model, preprocess, folder, ["conv3"], channels=range(4), top=9,
                           out_dir="runs/example_mine", progress=False)

topk = json.loads(Path("runs/example_mine/topk.json").read_text())
for channel, winners in zip(topk["layers"]["conv3"]["channel_ids"], topk["layers"]["conv3"]["channels"]):
    best = winners[0]
    print(f"conv3 channel {channel}: {best['value']:.3f} in {best['image']} at {best['position']}")
print("open runs/example_mine/index.html in a browser")
