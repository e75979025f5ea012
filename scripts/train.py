#!/usr/bin/env python
"""Trains a zoo architecture on an ImageFolder-style directory, ZF-style, resumably.

The recipe follows Zeiler & Fergus (2014) where it fits: SGD with momentum, dropout on
the fc layers (in the architecture), and renormalisation of every first-layer filter
whose RMS exceeds a fixed radius. Augmentation: random crops from a zero-padded image
and horizontal flips. The learning rate warms up linearly over the first epoch and then
follows a cosine to zero; it is a function of the step alone, so resuming is exact.

Checkpoints (all readable with ``torch.load(..., weights_only=True)``):
    OUT/last.pt          everything needed to resume, written atomically every
                         ``--checkpoint-every`` steps and at each epoch's end
    OUT/epoch_NNN.pt     the model's state dict after epoch NNN, for each --save-epochs
    OUT/final.pt         the final state dict

Example (the packaged zfnet-cifar10 weights were made this way)::

    tar -xzf ../shared/data/cifar10/cifar10-train.tar.gz -C /tmp/cifar
    tar -xzf ../shared/data/cifar10/cifar10-test.tar.gz -C /tmp/cifar
    python scripts/train.py /tmp/cifar/train --val /tmp/cifar/test --arch zfnet-cifar10 \
        --epochs 18 --save-epochs 1,2,5,10,18 --preload -o runs/zfnet-cifar10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zfvis.io.atomic import atomic_torch_save, atomic_write_text  # noqa: E402
from zfvis.io.images import evenly_spaced, load_image  # noqa: E402
from zfvis.models.zoo import get_spec, list_models  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="ImageFolder-style directory: one sub-folder per class")
    p.add_argument("--val", help="held-out ImageFolder directory with the same classes, evaluated each epoch")
    p.add_argument("--arch", default="zfnet-cifar10", choices=list_models(), help="zoo architecture")
    p.add_argument("--epochs", type=int, default=18, help="epochs to train (default 18)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, Nesterov (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--filter-radius", type=float, default=0.1, help="RMS radius of first-layer filters (ZF: 0.1)")
    p.add_argument("--input-size", type=int, help="training image side (default: the model's preprocessing)")
    p.add_argument("--save-epochs", default="", help="comma-separated epochs whose weights are kept, e.g. 1,2,5,10")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--limit", type=int, help="train on N images only, evenly spaced over the sorted list (every class "
                   "kept): a short run, e.g. to try `zfvis evolution` without the full training")
    p.add_argument("--preload", action="store_true", help="decode every image once into memory (small data sets)")
    p.add_argument("--workers", type=int, default=2, help="loader processes when not preloading")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the order and the augmentation (default 0)")
    p.add_argument("-o", "--out", required=True, help="output directory for checkpoints")
    return p


class _Folder(torch.utils.data.Dataset):
    """ImageFolder that yields uint8 (3, S, S) tensors: shorter side resized, centre-cropped."""

    def __init__(self, root: Path, size: int, classes: list[str] | None = None, limit: int | None = None) -> None:
        root = Path(root)
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not found:
            raise SystemExit(f"error: '{root}' has no class sub-folders (ImageFolder layout expected)")
        self.classes = classes or found
        if classes is not None and found != classes:
            raise SystemExit(f"error: classes of '{root}' ({found}) differ from the training classes ({classes})")
        self.items = [
            (str(p), i)
            for i, c in enumerate(self.classes)
            for p in sorted((root / c).rglob("*"))
            if p.is_file() and p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
        ]
        self.items = [self.items[i] for i in evenly_spaced(len(self.items), limit)]
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms import functional as TF

        path, label = self.items[i]
        img = load_image(path)
        img = TF.center_crop(TF.resize(img, self.size, antialias=True), [self.size, self.size])
        return TF.pil_to_tensor(img), label


def _preload(ds: _Folder, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.empty(len(ds), 3, ds.size, ds.size, dtype=torch.uint8)
    ys = torch.empty(len(ds), dtype=torch.long)
    for i in tqdm(range(len(ds)), desc=f"decoding {desc}", unit="img", mininterval=2):
        xs[i], ys[i] = ds[i]
    return xs, ys


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop from an image zero-padded by 1/8 of its side, and a random flip."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _lr_at(step: int, steps_per_epoch: int, total: int, peak: float) -> float:
    if step < steps_per_epoch:
        return peak * (step + 1) / steps_per_epoch
    t = (step - steps_per_epoch) / max(1, total - steps_per_epoch)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


def _renormalise_first_filters(model: nn.Module, radius: float) -> None:
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        w = conv.weight
        rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        w.mul_(torch.where(rms > radius, radius / rms, torch.ones_like(rms)))


@torch.no_grad()
def evaluate(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, normalise, device: str, bs: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(xs), bs):
        logits = model(normalise(xs[i : i + bs].to(device)))
        correct += (logits.argmax(1).cpu() == ys[i : i + bs]).sum().item()
    return correct / len(xs)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_spec(args.arch)
    size = args.input_size or spec.preprocess.crop or 224
    save_epochs = {int(e) for e in args.save_epochs.split(",") if e.strip()}

    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be at least 1, got {args.limit}")
    train = _Folder(Path(args.data), size, limit=args.limit)
    val = _Folder(Path(args.val), size, train.classes) if args.val else None
    model = spec.build(num_classes=len(train.classes))
    model.to(args.device)
    mean = torch.tensor(spec.preprocess.mean, device=args.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.preprocess.std, device=args.device).view(1, 3, 1, 1) * 255

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x.float() - mean) / std

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=args.momentum,
        nesterov=True,
    )

    if args.preload:
        xs, ys = _preload(train, "train")
        steps_per_epoch = math.ceil(len(xs) / args.batch_size)
    else:
        xs = ys = None
        steps_per_epoch = math.ceil(len(train) / args.batch_size)
    val_data = _preload(val, "val") if val is not None else None
    total = steps_per_epoch * args.epochs

    start_epoch, start_step, history = 1, 0, []
    ckpt_path = out / "last.pt"
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=args.device, weights_only=True)
        if ck["arch"] != args.arch or ck["classes"] != train.classes or ck.get("limit") != args.limit:
            raise SystemExit(f"error: '{ckpt_path}' is from another run (arch, classes or --limit differ); use another -o")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, start_step, history = ck["epoch"], ck["step"], json.loads(ck["history"])
        print(f"resuming from {ckpt_path}: epoch {start_epoch}, step {start_step}/{steps_per_epoch}")

    def save_state(epoch: int, step: int) -> None:
        atomic_torch_save(
            {
                "arch": args.arch,
                "classes": train.classes,
                "limit": args.limit,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "step": step,
                "history": json.dumps(history),
            },
            ckpt_path,
        )

    t0 = time.time()
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        n_items = len(xs) if xs is not None else len(train)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        loss_sum = correct = seen = 0
        bar = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", unit="batch", mininterval=2)
        for step in bar:
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            if xs is not None:
                xb, yb = xs[idx], ys[idx]
            else:
                items = [train[int(i)] for i in idx]
                xb = torch.stack([it[0] for it in items])
                yb = torch.tensor([it[1] for it in items])
            step_seed = args.seed * 10_000_019 + epoch * 100_003 + step
            gen = torch.Generator().manual_seed(step_seed)
            torch.manual_seed(step_seed)  # dropout masks too: a resumed run repeats the same steps
            xb = normalise(_augment(xb, gen).to(args.device))
            yb = yb.to(args.device)
            for group in opt.param_groups:
                group["lr"] = _lr_at((epoch - 1) * steps_per_epoch + step, steps_per_epoch, total, args.lr)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _renormalise_first_filters(model, args.filter_radius)
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            if (step + 1) % args.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                save_state(epoch, step + 1)
        start_step = 0
        record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}
        if val_data is not None:
            record["val_acc"] = evaluate(model, *val_data, normalise, args.device)
        record["elapsed_s"] = round(time.time() - t0, 1)
        history.append(record)
        print(json.dumps(record), flush=True)
        if epoch in save_epochs:
            atomic_torch_save(model.state_dict(), out / f"epoch_{epoch:03d}.pt")
        save_state(epoch + 1, 0)
    atomic_torch_save(model.state_dict(), out / "final.pt")
    atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    summary = history[-1] if history else {}
    print(f"done: {args.epochs} epochs; last {json.dumps(summary)}; weights in {out / 'final.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
