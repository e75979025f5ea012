#!/usr/bin/env python
"""Packs a training run's epoch checkpoints, cut to the first layers, into one small file.

``zfvis evolution`` with no CHECKPOINT draws the snapshots shipped in
``zfvis/models/weights/zfnet_cifar10_snapshots.pt``, made by::

    python scripts/train.py data/cifar10/train --val data/cifar10/test --epochs 5 --limit 10000 \\
        --save-epochs 1,2,3,5 --preload -o runs/snapshots
    python scripts/pack_snapshots.py runs/snapshots --epochs 1,2,3,5 --through conv2 \\
        -o zfvis/models/weights/zfnet_cifar10_snapshots.pt

Only the weights of the layers up to ``--through`` are kept (for conv2 of zfnet-cifar10:
about 220 kB an epoch instead of 7 MB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zfvis.core.deconvnet import Deconvnet  # noqa: E402
from zfvis.io import progress  # noqa: E402
from zfvis.io.atomic import atomic_torch_save  # noqa: E402
from zfvis.models.checkpoints import read_checkpoint  # noqa: E402
from zfvis.models.snapshots import truncate_state_dict  # noqa: E402
from zfvis.models.zoo import load_model  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the -o folder of scripts/train.py (epoch_NNN.pt, history.json)")
    p.add_argument("--epochs", required=True, help="comma-separated epochs to pack, e.g. 1,2,3,5")
    p.add_argument("--arch", default="zfnet-cifar10", help="zoo architecture of the run")
    p.add_argument("--through", default="conv2", help="deepest layer to keep (a name or alias)")
    p.add_argument("--command", default="", help="the training command, recorded in the file")
    p.add_argument("-o", "--out", required=True, help="the .pt file to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    run = Path(args.run)
    epochs = [int(e) for e in args.epochs.split(",") if e.strip()]
    model, _ = load_model(args.arch, weights="random")
    dn = Deconvnet(model)
    module = dn.convolution(args.through)[0] if args.through in dn.layer_names() else args.through
    # the batch norm after the convolution belongs to it: keep through the last module before the ReLU
    names = [n for n, _ in model.named_modules() if n]
    last = names.index(module)
    while last + 1 < len(names) and isinstance(dict(model.named_modules())[names[last + 1]], torch.nn.BatchNorm2d):
        last += 1
    packed: dict[int, dict[str, torch.Tensor]] = {}
    with progress.progress(len(epochs), "packing", "epoch") as bar:
        for epoch in epochs:
            state = read_checkpoint(run / f"epoch_{epoch:03d}.pt")
            packed[epoch] = {k: v.clone() for k, v in truncate_state_dict(model, state, names[last]).items()}
            bar.update(1)
    history_file = run / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    atomic_torch_save({"model": args.arch, "through": args.through, "epochs": packed, "command": args.command,
                       "history": history}, Path(args.out))
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: epochs {epochs} of {run}, {len(packed[epochs[0]])} tensors each, {size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
