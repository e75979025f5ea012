"""Correspondence (Zeiler & Fergus 2014, Fig. 8 and Table 1): does the network relate the
same part across different images?

The same part (the left eye, say) is occluded in each of N images. With ``eps_i = x_i -
x~_i`` the change of image i's feature vector at layer l when its part is occluded,

    Delta_l = sum over pairs i != j of H(sign(eps_i), sign(eps_j))

where H is the Hamming distance, here divided by the vector's length (the fraction of
units whose change differs in sign). A low Delta means occluding the part changes the
features in the same way in every image: the network treats the parts alike. As a
baseline, a box of the same size is occluded at a random place (seeded) in each image.
:func:`correspondence` reports Delta (the sum over ordered pairs, as in the paper's
formula) and the mean and standard deviation of the per-pair distance over the
N(N-1)/2 unordered pairs.

Parts are given as boxes (top, left, bottom, right) in each image's own pixels in a JSON
file ``{"image path": {"part name": [top, left, bottom, right], ...}, ...}`` (paths relative
to the file; keys starting with ``_`` are comments). :func:`load_parts` reads it and maps
the boxes through the model's preprocessing. zfvis ships one: ``faces.json``, three
frontal faces (a cat and two portraits) with their eyes, nose and mouth
(:func:`default_parts_file`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..core.deconvnet import Deconvnet
from ..io import progress as _progress
from ..io.atomic import note_read
from ..io.checks import check_int, check_model
from ..io.errors import InputTypeError, UserInputError, show_path
from ..io.images import load_image
from ..io.parse import check_fill, check_finite_result, check_seed, read_json
from .occlusion import Box, check_boxes, occlude

__all__ = [
    "PartScore",
    "PartImages",
    "CorrespondenceResult",
    "correspondence",
    "sign_change_distances",
    "load_parts",
    "read_parts",
    "default_parts_file",
]


@dataclasses.dataclass
class PartScore:
    """Sign-change consistency of one occluded part at one layer.

    Attributes:
        delta: Sum over ordered pairs i != j of the normalised Hamming distance.
        mean: Mean of the normalised Hamming distance over unordered pairs.
        std: Its standard deviation over unordered pairs (0 with a single pair).
        pairs: The distance of every unordered pair (i < j), row-major (N(N-1)/2,).
    """

    delta: float
    mean: float
    std: float
    pairs: torch.Tensor


@dataclasses.dataclass
class PartImages:
    """Images ready for the model and each part's box in every image.

    Attributes:
        images: Preprocessed images (N, C, H, W).
        names: File name of each image.
        boxes: For each part, its box in every image, in model-input pixels.
    """

    images: torch.Tensor
    names: list[str]
    boxes: dict[str, list[Box]]


@dataclasses.dataclass
class CorrespondenceResult:
    """Delta per part (and random baseline) and layer.

    Attributes:
        layers: The layer names, as given.
        rows: Row label -> layer -> score; labels are the part names, then
            ``"random (<part>)"`` for each part's random baseline.
        boxes: Row label -> the box occluded in each image (model-input pixels).
        seed: Seed of the random boxes.
    """

    layers: list[str]
    rows: dict[str, dict[str, PartScore]]
    boxes: dict[str, list[Box]]
    seed: int

    def records(self) -> list[dict[str, Any]]:
        """One flat record per row and layer (for CSV and JSON)."""
        out = []
        for label, scores in self.rows.items():
            for layer in self.layers:
                s = scores[layer]
                kind = "random" if _is_generated(label) else "part"
                out.append({"part": label, "kind": kind, "layer": layer, "delta": s.delta, "mean": s.mean,
                            "std": s.std, "pairs": len(s.pairs)})
        return out

    def format_table(self) -> str:
        """The result as a text table like the paper's Table 1."""
        head = ["occluded part"] + [f"{layer}: Delta  mean ± std" for layer in self.layers]
        lines = [[label] + [f"{s[layer].delta:6.3f}  {s[layer].mean:.3f} ± {s[layer].std:.3f}" for layer in self.layers]
                 for label, s in self.rows.items()]
        widths = [max(len(r[c]) for r in [head, *lines]) for c in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt.format(*head), rule, *(fmt.format(*r) for r in lines)])


#: The most elements one block of sign comparisons holds (16 Mi bools): pairs and units
#: are compared block by block, so memory does not grow with the number of images.
PAIR_BLOCK = 1 << 24


def sign_change_distances(eps: torch.Tensor) -> torch.Tensor:
    """Normalised Hamming distances between the signs of feature changes.

    Args:
        eps: Feature changes (N, D), one row per image.

    Returns:
        (N, N): entry [i, j] is the fraction of the D units where sign(eps_i) and
        sign(eps_j) differ (signs are -1, 0 or +1).
    """
    return _hamming(torch.sign(eps.reshape(eps.shape[0], -1)).to(torch.int8))


def _hamming(signs: torch.Tensor) -> torch.Tensor:
    """:func:`sign_change_distances` of signs (N, D) (int8), counted exactly in blocks of at
    most :data:`PAIR_BLOCK` comparisons (rows of pairs times a slice of the units)."""
    block = PAIR_BLOCK
    n, d = signs.shape
    counts = torch.zeros(n, n, dtype=torch.int64)
    rows = max(1, min(n, block // max(1, n)))
    cols = max(1, min(d, block // (rows * n)))
    for a in range(0, n, rows):
        for c in range(0, d, cols):
            part = signs[None, :, c : c + cols]
            counts[a : a + rows] += (signs[a : a + rows, None, c : c + cols] != part).sum(dim=2)
    return counts.double() / max(d, 1)


def _score(signs: torch.Tensor) -> PartScore:
    d = _hamming(signs)
    n = d.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    pairs = d[i, j]
    std = float(pairs.std(unbiased=False)) if len(pairs) > 1 else 0.0
    return PartScore(float(d.sum()), float(pairs.mean()), std, pairs.cpu())


#: How the random baseline of a part is named: zfvis's names; a person's part may not take one.
RANDOM_LABEL = "random ({})"


def _is_generated(name: str) -> bool:
    prefix, _, suffix = RANDOM_LABEL.partition("{}")
    return name.startswith(prefix) and name.endswith(suffix)


def _check_boxes(boxes: Mapping[str, Sequence[Box]], n: int, h: int, w: int) -> dict[str, list[Box]]:
    if not isinstance(boxes, Mapping) or not boxes:
        raise UserInputError("boxes must be a non-empty mapping: part name -> one box per image")
    out = {}
    for part, given in boxes.items():
        if not isinstance(part, str) or not part.strip():
            raise UserInputError(f"part names must be non-empty strings, got {part!r}")
        if _is_generated(part):
            raise UserInputError(f"part name '{part}' has the form zfvis gives the random baselines "
                                 f"('{RANDOM_LABEL.format('eye')}'); rename the part")
        per_image = check_boxes(given)
        if len(per_image) != n:
            raise UserInputError(f"part '{part}' has {len(per_image)} boxes for {n} images; give one per image")
        for k, (t, l, b, r) in enumerate(per_image):
            if not (0 <= t < b <= h and 0 <= l < r <= w):
                raise UserInputError(f"box {(t, l, b, r)} of part '{part}' in image {k} is outside the {h}x{w} image or empty")
        out[str(part)] = per_image  # type: ignore[assignment]
    return out


def _random_boxes(boxes: list[Box], h: int, w: int, gen: torch.Generator) -> list[Box]:
    """Boxes of the same sizes at uniformly random places inside an h x w image."""
    out = []
    for t, l, b, r in boxes:
        bh, bw = b - t, r - l
        top = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
        out.append((top, left, top + bh, left + bw))
    return out


def correspondence(
    model: nn.Module,
    images: torch.Tensor,
    boxes: Mapping[str, Sequence[Box]],
    layers: Sequence[str],
    *,
    fill: float | torch.Tensor = 0.0,
    seed: int = 0,
    random_baseline: bool = True,
    batch_size: int = 32,
    progress: bool = False,
) -> CorrespondenceResult:
    """Sign-change consistency of occluded parts across images (ZF Table 1).

    Args:
        model: The network (run in eval mode, not changed).
        images: Preprocessed images (N, C, H, W), N >= 2.
        boxes: Part name -> one box (top, left, bottom, right) per image, in model-input
            pixels (see :func:`load_parts` for boxes given in the files' pixels).
        layers: Layer names or aliases whose feature vectors are compared.
        fill: Occluder colour in model input space (float or (C,) tensor).
        seed: Seed of the random baseline boxes.
        random_baseline: Add a ``"random (<part>)"`` row per part (a part may not be named so).
        batch_size: Images per forward pass. Memory does not grow with the number of images
            N beyond the signs of the changes (N x D bytes per layer, D the layer's units)
            and the originals' features (N x D values): the pairs are compared block by
            block (:data:`PAIR_BLOCK`).
        progress: Show a progress bar over the rows (parts and baselines).

    Returns:
        A :class:`CorrespondenceResult`.

    Raises:
        ValueError: Fewer than two images, boxes outside the images or of the wrong
            count, an unknown layer.
        TypeError: Arguments of the wrong type.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise InputTypeError(f"images must be a floating-point torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise UserInputError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    seed = check_seed(seed)
    check_model(model)
    check_int("batch_size", batch_size, 1)
    n, c, h, w = images.shape
    fill = check_fill(fill, c, images.dtype)
    if n < 2:
        raise UserInputError(f"correspondence compares images: give at least 2, got {n}")
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise UserInputError("give at least one layer")
    rows = _check_boxes(boxes, n, h, w)
    if random_baseline:
        gen = torch.Generator().manual_seed(seed)
        rows.update({RANDOM_LABEL.format(part): _random_boxes(b, h, w, gen) for part, b in list(rows.items())})
    dn = Deconvnet(model)
    job = _Job(dn, images, layers, fill, batch_size)
    return CorrespondenceResult(layers, _scores(job, rows, progress), rows, seed)


@dataclasses.dataclass
class _Job:
    """The checked inputs of one :func:`correspondence` call."""

    dn: Deconvnet
    images: torch.Tensor
    layers: list[str]
    fill: float | torch.Tensor
    batch: int

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's feature vectors (B, D) of a batch, on the CPU."""
        out = self.dn.forward_outputs(images, self.layers)
        return {k: v.reshape(len(images), -1).cpu() for k, v in out.items()}


def _scores(job: _Job, rows: dict[str, list[Box]], progress: bool) -> dict[str, dict[str, PartScore]]:
    """Row label -> layer -> score: the originals' features once, then each row's occluded
    images batch by batch, keeping only the signs of the changes (int8)."""
    n = len(job.images)
    chunks = [slice(a, min(n, a + job.batch)) for a in range(0, n, job.batch)]
    parts = [job.features(job.images[s]) for s in chunks]
    base = {layer: torch.cat([p[layer] for p in parts]) for layer in job.layers}
    del parts
    scores: dict[str, dict[str, PartScore]] = {}
    with _progress.progress(len(rows), "correspondence", "part", show=progress) as bar:
        for label, per_image in rows.items():
            signs = {layer: torch.empty(base[layer].shape, dtype=torch.int8) for layer in job.layers}
            for s in chunks:
                occluded = job.features(occlude(job.images[s], per_image[s], job.fill))
                for layer in job.layers:
                    change = base[layer][s] - occluded[layer]
                    check_finite_result(change, f"the feature change at '{layer}'",
                                        "the fill drives the model's values beyond its dtype; use a fill within "
                                        "the images' range (0 is the data set's mean colour)")
                    signs[layer][s] = torch.sign(change).to(torch.int8)
            scores[label] = {layer: _score(signs[layer]) for layer in job.layers}
            bar.update(1)
    return scores


# ----------------------------------------------------------------------------- part files


def default_parts_file() -> Path:
    """The shipped part boxes: three frontal faces (see ``assets/LICENSE.md``)."""
    return Path(str(resources.files("zfvis") / "assets" / "faces.json"))


def read_parts(path: str | os.PathLike[str]) -> dict[str, dict[str, Box]]:
    """A part file's boxes, checked: image path (relative to the file) -> part -> box.

    Raises:
        FileNotFoundError: The file does not exist.
        UserInputError: A folder or a pipe, not JSON, nested too deeply, boxes that are not
            four ints, fewer than two images, or images with different parts.
    """
    path = Path(path)
    data = read_json(path, "part file")
    note_read(path)
    if not isinstance(data, dict):
        raise UserInputError(f"part file {show_path(path)} must hold an object: image -> part name -> [top, left, bottom, right]")
    parts: dict[str, dict[str, Box]] = {}
    for image, boxes in data.items():
        if image.startswith("_"):
            continue
        if not isinstance(boxes, dict) or not boxes:
            raise UserInputError(f"part file {show_path(path)}: '{image}' must map part names to boxes")
        for part, box in boxes.items():
            if _is_generated(part):
                raise UserInputError(f"part file {show_path(path)}: part name '{part}' has the form zfvis gives the random "
                                     f"baselines ('{RANDOM_LABEL.format('eye')}'); rename the part")
            if not (isinstance(box, list) and len(box) == 4 and all(type(v) is int for v in box)):
                raise UserInputError(f"part file {show_path(path)}: box '{part}' of '{image}' must be [top, left, bottom, right] (ints)")
        parts[image] = {str(k): tuple(v) for k, v in boxes.items()}  # type: ignore[misc]
    if len(parts) < 2:
        raise UserInputError(f"part file {show_path(path)} names {len(parts)} image(s); correspondence needs at least 2")
    names = [set(b) for b in parts.values()]
    if any(s != names[0] for s in names):
        raise UserInputError(f"part file {show_path(path)}: every image needs the same parts (found {sorted(set().union(*names))})")
    return parts


def _box_through(preprocess: Callable[[Image.Image], torch.Tensor], size: tuple[int, int], box: Box) -> Box | None:
    """Where ``box`` lands after ``preprocess``: the bounding box of a mask sent through it."""
    w, h = size
    t, l, b, r = box
    mask = Image.new("RGB", (w, h), (0, 0, 0))
    mask.paste((255, 255, 255), (l, t, r, b))
    black = preprocess(Image.new("RGB", (w, h), (0, 0, 0)))
    white = preprocess(Image.new("RGB", (w, h), (255, 255, 255)))
    frac = ((preprocess(mask) - black) / (white - black)).mean(dim=0)
    rows = torch.nonzero((frac >= 0.5).any(dim=1)).flatten()
    cols = torch.nonzero((frac >= 0.5).any(dim=0)).flatten()
    if len(rows) == 0 or len(cols) == 0:
        return None
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def load_parts(path: str | os.PathLike[str], preprocess: Callable[[Image.Image], torch.Tensor]) -> PartImages:
    """Reads a part file and its images, ready for :func:`correspondence`.

    Args:
        path: JSON ``{"image": {"part": [top, left, bottom, right]}}`` in each image's own
            pixels (bottom/right exclusive); image paths relative to the file.
        preprocess: The model's preprocessing (PIL image -> (C, H, W)); boxes are mapped
            through it (resizing and cropping).

    Returns:
        The :class:`PartImages`.

    Raises:
        FileNotFoundError: The file or an image is missing.
        ValueError: Bad JSON, a box outside its image, or one the preprocessing crops away.
    """
    path = Path(path)
    parts = read_parts(path)
    tensors, names = [], []
    boxes: dict[str, list[Box]] = {p: [] for p in next(iter(parts.values()))}
    for image_name, image_boxes in parts.items():
        image = load_image(path.parent / image_name)
        w, h = image.size
        for part, (t, l, b, r) in image_boxes.items():
            if not (0 <= t < b <= h and 0 <= l < r <= w):
                raise UserInputError(f"box {[t, l, b, r]} of '{part}' is outside the {w}x{h} image '{image_name}' or empty")
            mapped = _box_through(preprocess, (w, h), (t, l, b, r))
            if mapped is None:
                raise UserInputError(f"box '{part}' of '{image_name}' falls outside the model's input after preprocessing")
            boxes[part].append(mapped)
        tensors.append(preprocess(image))
        names.append(Path(image_name).name)
    return PartImages(torch.stack(tensors), names, boxes)
