"""The explorer's images: the files it was given and the ones a person uploads.

Uploads are decoded with Pillow only (JPEG, PNG or WebP), from memory, after checking
their byte count and, before any pixel is decoded, their pixel count (the
decompression-bomb guard). They are kept in memory, never written to disk, and the
oldest is forgotten once there are more than ``max_uploads``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import secrets
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..io.errors import UserInputError
from ..io.images import load_image, to_rgb
from .budget import Budget
from .errors import ApiError, BadRequest, NotFound

__all__ = ["ImageEntry", "ImageStore", "UPLOAD_FORMATS", "decode_upload", "decoded_upload", "upload_size"]

#: The formats an upload may have (Pillow's names).
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclasses.dataclass
class ImageEntry:
    """One image the explorer shows.

    Attributes:
        id: Its name in addresses (letters, digits, ``-`` and ``_``).
        name: What the page calls it (the file name, or the upload's).
        source: ``"file"``, ``"upload"`` or ``"camera"`` (a live frame).
        x: The model input (C, H, W), on the CPU.
        png: The model input as a person sees it (denormalised), a PNG.
        size: (width, height) of the original image.
    """

    id: str
    name: str
    source: str
    x: torch.Tensor
    png: bytes
    size: tuple[int, int]

    def info(self) -> dict[str, object]:
        """What the API says about the image."""
        return {"id": self.id, "name": self.name, "source": self.source, "width": self.size[0],
                "height": self.size[1], "input": list(self.x.shape)}


@contextlib.contextmanager
def _as_api_errors() -> Iterator[None]:
    """Pillow's complaints about an upload as the API's errors (415, 413, 400)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"the image has more pixels than Pillow decodes safely ({Image.MAX_IMAGE_PIXELS:,}); "
                       "downscale it first") from None
    except UnidentifiedImageError:
        raise ApiError(415, "the upload is not a JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ApiError):
            raise
        raise BadRequest(f"the image cannot be decoded ({err}); the file may be truncated or corrupt") from None


def upload_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The (width, height) of an uploaded image, read from its header (no pixel decoded).

    Raises:
        ApiError: 400 empty, 415 not a JPEG, PNG or WebP image, 413 more than ``max_pixels``.
    """
    if not data:
        raise BadRequest("the upload is empty; send the bytes of a JPEG, PNG or WebP image")
    with _as_api_errors(), Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
        w, h = image.size
    if w * h > max_pixels:
        raise ApiError(413, f"the image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} "
                       "(downscale it first)")
    return w, h


@contextlib.contextmanager
def decoded_upload(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """An uploaded image, decoded, for the ``with`` block (its size checked first).

    Raises:
        ApiError: 415 for a file that is not a JPEG, PNG or WebP image, 413 for more than
            ``max_pixels`` pixels, 400 for a truncated or corrupt one.
    """
    upload_size(data, max_pixels)
    with _as_api_errors(), Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
        image.load()
        rgb = to_rgb(image)
    yield rgb


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes an uploaded image, refusing what is not a JPEG, PNG or WebP image of at
    most ``max_pixels`` pixels (see :func:`decoded_upload`).

    Raises:
        ApiError: 415 not such an image, 413 too many pixels, 400 truncated or corrupt.
    """
    with decoded_upload(data, max_pixels) as image:
        return image


def _display_png(x: torch.Tensor, show: Callable[[torch.Tensor], torch.Tensor] | None) -> bytes:
    """The model input as an 8-bit PNG: ``show(x)`` in [0, 1], or ``x`` scaled from its range."""
    if show is not None:
        img = show(x.detach().cpu().float())
    else:
        lo, hi = float(x.min()), float(x.max())
        img = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    img = img.float().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    arr = (img[:3] * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _slug(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(name).stem).strip("-")[:40]
    return stem or "image"


class ImageStore:
    """The images by id, thread-safe.

    Args:
        preprocess: PIL image -> model input (C, H, W).
        show: Model input -> [0, 1] RGB for display (``preprocess.denormalize``), or None.
        max_uploads: Uploads kept (the oldest is forgotten first); camera frames are kept
            apart, the last ``max_live`` (4).
        max_upload_bytes: The largest upload accepted.
        max_pixels: The most pixels an upload may have.
        pixels: Pixels being decoded at once by every upload together (default: one
            largest upload's worth).
        wait: Seconds an upload waits for its pixels before a 503.

    Uploads are decoded on one thread of their own: the memory a large decode leaves to
    the allocator is reused by the next, not held once per request thread.
    """

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor],
                 show: Callable[[torch.Tensor], torch.Tensor] | None = None, *, max_uploads: int = 16,
                 max_upload_bytes: int = 20 << 20, max_pixels: int = 40_000_000,
                 pixels: Budget | None = None, wait: float = 3.0) -> None:  # fmt: skip
        self.preprocess = preprocess
        self.show = show
        self.max_uploads = max_uploads
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.pixels = pixels or Budget(max_pixels, "pixels")
        self.wait = wait
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="zfvis-decode")
        self._entries: OrderedDict[str, ImageEntry] = OrderedDict()
        self._uploads: list[str] = []
        self._live: list[str] = []
        self.max_live = 4
        self.live_frames = 0
        self.on_forget: Callable[[str], None] = lambda image_id: None
        self._lock = threading.Lock()

    def _entry(self, image: Image.Image, name: str, source: str, image_id: str) -> ImageEntry:
        x = self.preprocess(image)
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserInputError(f"preprocess must return one image (C, H, W), got {shape}")
        x = x.detach().cpu()
        return ImageEntry(image_id, name, source, x, _display_png(x, self.show), image.size)

    def _free_id(self, base: str) -> str:
        image_id, n = base, 1
        while image_id in self._entries:
            n += 1
            image_id = f"{base}-{n}"
        return image_id

    def add_files(self, images: Sequence[str | os.PathLike[str] | Image.Image]) -> list[ImageEntry]:
        """Adds the given images (paths or PIL images), in order.

        Raises:
            UserInputError: A file that is not an image (see :func:`zfvis.load_image`).
            FileNotFoundError: A missing file.
        """
        added = []
        for i, item in enumerate(images):
            if isinstance(item, Image.Image):
                image, name = to_rgb(item), f"image {i + 1}"
            else:
                image, name = load_image(item), Path(item).name
            with self._lock:
                entry = self._entry(image, name, "file", self._free_id(_slug(name)))
                self._entries[entry.id] = entry
            added.append(entry)
        return added

    def upload(self, data: bytes, name: str = "upload", *, live: bool = False) -> ImageEntry:
        """Adds an uploaded image (see :func:`decode_upload`).

        A ``live`` frame (the page's camera) is kept apart from the uploads: only the last
        :attr:`max_live` are, and they never push a person's uploads out; ``live_frames``
        counts them.

        Raises:
            ApiError: Too large (413), not an image (415), corrupt (400), too many
                pixels being decoded by others (503).
        """
        if len(data) > self.max_upload_bytes:
            raise ApiError(413, f"the upload is {len(data):,} bytes; the limit is {self.max_upload_bytes:,}")
        name = re.sub(r"[^\w. -]+", "_", name)[:80] or "upload"
        entry_id = f"{'camera' if live else 'upload'}-{secrets.token_hex(4)}"
        w, h = upload_size(data, self.max_pixels)
        with self.pixels.share(w * h, self.wait, "images being decoded"):
            entry = self._decoder.submit(self._decode, data, name, entry_id, "camera" if live else "upload").result()
        kept, limit = (self._live, self.max_live) if live else (self._uploads, self.max_uploads)
        with self._lock:
            self._entries[entry.id] = entry
            kept.append(entry.id)
            gone = [kept.pop(0) for _ in range(max(0, len(kept) - limit))]
            for old in gone:
                self._entries.pop(old, None)
            self.live_frames += live
        for old in gone:
            self.on_forget(old)
        return entry

    def _decode(self, data: bytes, name: str, entry_id: str, source: str) -> ImageEntry:
        with decoded_upload(data, self.max_pixels) as image:
            return self._entry(image, name, source, entry_id)

    def get(self, image_id: str) -> ImageEntry:
        """The image with this id.

        Raises:
            NotFound: No such image (uploads are forgotten after ``max_uploads`` more).
        """
        if not isinstance(image_id, str) or not _ID.fullmatch(image_id):
            raise BadRequest(f"bad image id {image_id!r}: ids are letters, digits, '-' and '_'")
        with self._lock:
            entry = self._entries.get(image_id)
        if entry is None:
            raise NotFound(f"no image '{image_id}'; GET /api/images lists them (uploads are kept for the last "
                           f"{self.max_uploads})")
        return entry

    def all(self) -> list[ImageEntry]:
        """Every image, given ones first, then uploads by age (camera frames left out)."""
        with self._lock:
            return [e for e in self._entries.values() if e.source != "camera"]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._entries
