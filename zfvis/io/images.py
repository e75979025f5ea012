"""Image loading: any file Pillow opens, converted to RGB as a person expects."""

from __future__ import annotations

import os
import warnings
from importlib import resources
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import note_read
from .checks import check_int, check_path
from .errors import UserInputError, show_path

__all__ = ["IMAGE_EXTENSIONS", "default_image", "default_dataset", "load_image", "to_rgb", "check_data_set", "list_images", "evenly_spaced", "resolve"]

#: File endings treated as images when a directory is scanned.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}
)


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts a Pillow image of any mode to 8-bit RGB.

    The EXIF orientation is applied first, so a photo shows upright. Transparent
    pixels (modes LA, RGBA, P with transparency) are composited onto white; 16- and
    32-bit greyscale (I;16, I, F) is scaled from its own range to 0..255; CMYK and
    YCbCr go through Pillow's colour conversion.

    Args:
        image: The image as opened by Pillow.

    Returns:
        A new RGB image.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image, mode = _deep_grey(image), "L"
    if mode in ("LA", "RGBA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Opens an image file and returns it as RGB (see :func:`to_rgb`).

    Args:
        path: Path to an image file.

    Returns:
        The decoded RGB image.

    Raises:
        FileNotFoundError: The path does not exist or is a directory.
        UserInputError: (a ``ValueError``) The file is not an image Pillow can read, it is
            truncated, or it has more pixels than Pillow's decompression-bomb guard
            allows (``PIL.Image.MAX_IMAGE_PIXELS``); nothing large is allocated then.
    """
    path = check_path("image path", path)
    if not path.is_file():
        if path.exists() and not path.is_dir():
            raise UserInputError(f"image {show_path(path)} is not a regular file (a device or a pipe); pass an image file")
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"image {show_path(path)} {what}; pass the path of an image file")
    note_read(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_aspect(path, image)
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS
        raise UserInputError(
            f"image '{path}' has more pixels than the {limit:,} that Pillow decodes safely (a guard against "
            "decompression bombs); downscale it first"
        ) from None
    except PermissionError:
        raise PermissionError(f"cannot read image '{path}': permission denied") from None
    except UnidentifiedImageError:
        raise UserInputError(f"'{path}' is not an image file Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError) as err:  # truncated or corrupt data
        raise UserInputError(f"cannot decode image '{path}' ({err}); the file may be truncated or corrupt") from None


def _deep_grey(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale as 8-bit, scaled from its type's range (a mid-grey 16-bit
    image stays mid-grey): 0..65535 for 16-bit (and 32-bit integers within it), 0..1 for
    floats within it; other 32-bit data from its own range."""
    lo, hi = image.getextrema()
    if image.mode.startswith("I;16") or (image.mode == "I" and 0 <= lo and hi <= 65535):
        lo, hi = 0, 65535
    elif image.mode == "F" and 0.0 <= lo and hi <= 1.0:
        lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return image.convert("F").point(lambda v: (v - lo) * scale).convert("L")


#: The longest side an image may have per pixel of its shortest (a preprocess that
#: resizes the short side would blow a thinner one up to gigabytes).
MAX_ASPECT = 100


def _check_aspect(path: Path, image: Image.Image) -> None:
    """Refuses an image too thin to resize (1 x 300,000 pixels), before it is decoded."""
    w, h = image.size
    if min(w, h) == 0 or max(w, h) > MAX_ASPECT * min(w, h):
        raise UserInputError(f"image {show_path(path)} is {w}x{h} pixels, an aspect ratio beyond {MAX_ASPECT}:1; "
                             "resizing its short side to the model's input would make it enormous: crop it first")


def check_data_set(root: str | os.PathLike[str]) -> Path:
    """Checks that ``root`` can be a data set: a folder, or a text file that is not an image.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        UserInputError: It is an image, a device or a pipe.
    """
    root = check_path("data set", root)
    if root.is_dir():
        return root
    if not root.exists():
        raise FileNotFoundError(f"data set '{root}' does not exist; pass a folder of images or a text file of paths")
    if not root.is_file():
        raise UserInputError(f"data set '{root}' is not a regular file (a device or a pipe); pass a folder of images "
                             "or a text file of paths")
    if root.suffix.lower() in IMAGE_EXTENSIONS:
        raise UserInputError(
            f"'{root}' is an image, not a data set: pass a folder of images or a text file with one image path "
            "a line (for one image, use `zfvis project IMAGE`)"
        )
    return root


def list_images(root: str | os.PathLike[str]) -> list[str]:
    """Lists a data set as relative paths with "/" separators, in sorted order.

    Args:
        root: A directory, scanned recursively for files with an image ending, or a text
            file with one image path a line (relative paths are taken relative to the
            text file's folder; blank lines and lines starting with "#" are ignored).

    Returns:
        Sorted paths, each file once whatever its spelling (a link, ``./a.jpg`` and
        ``a.jpg``, an absolute path: the first spelling is kept). For a directory they are relative to it; for a list
        file they are as written there.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        UserInputError: (a ``ValueError``) It holds no image paths, or it is not a folder or
            a text list of paths (an image, say: :func:`check_data_set`).
    """
    root = check_data_set(root)
    if root.is_dir():
        found = sorted({p.relative_to(root).as_posix() for p in root.rglob("*")
                        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()})
    else:
        lines = _read_list(root)
        found = sorted({ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")})
    found = _each_file_once(root, found)
    if not found:
        raise UserInputError(f"data set '{root}' holds no images (endings: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def _each_file_once(root: Path, paths: list[str]) -> list[str]:
    """``paths`` (sorted) with each file once, whatever its spelling: ``./a.jpg``, ``a.jpg``,
    an absolute path, a symbolic or a hard link are one file (the same device and inode);
    the first spelling is kept. Paths that cannot be read are kept as written (they are
    skipped, and counted, when they are read)."""
    seen: set[object] = set()
    out = []
    for rel in paths:
        p = resolve(root, rel)
        try:
            st = p.stat()
            key: object = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.normpath(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(rel)
    return out


def _read_list(path: Path) -> list[str]:
    """The lines of a data-set list file, refusing binary files clearly."""
    note_read(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first path
    except UnicodeDecodeError as err:
        raise UserInputError(
            f"data set '{path}' is neither a folder nor a text file of image paths (byte {err.start} is not "
            "UTF-8 text); pass a folder of images or a list file"
        ) from None
    if "\x00" in text:
        raise UserInputError(f"data set '{path}' is a binary file, not a text file of image paths")
    return text.splitlines()


def evenly_spaced(count: int, limit: int | None) -> list[int]:
    """Indices of ``limit`` items spread evenly over ``count`` (all of them if fewer).

    The i-th index is ``i * count // limit``: the first item is always taken and the last
    index lies within ``count / limit`` of the end, so a sorted folder of class
    sub-folders keeps every class, the last one included.

    Args:
        count: Number of items.
        limit: How many to take (``None``: all).

    Raises:
        UserInputError: ``count`` is negative or ``limit`` is not a positive int.
    """
    check_int("count", count, 0)
    if limit is not None:
        check_int("limit", limit, 1)
    if limit is None or limit >= count:
        return list(range(count))
    return [i * count // limit for i in range(limit)]


def resolve(root: str | os.PathLike[str], relative: str) -> Path:
    """Returns the file that a path from :func:`list_images` names."""
    root = Path(root)
    base = root if root.is_dir() else root.parent
    p = Path(relative)
    return p if p.is_absolute() else base / p


def default_image() -> Path:
    """The photograph shipped with zfvis (a tabby cat, CC0; see ``assets/LICENSE.md``)."""
    return Path(str(resources.files("zfvis") / "assets" / "chelsea.png"))


def default_dataset() -> Path:
    """A small data set shipped with zfvis: 500 CIFAR-10 test images, 50 a class, evenly
    spaced over each class, as ``<class>/NNNN.jpg`` (see ``assets/LICENSE.md``)."""
    return Path(str(resources.files("zfvis") / "assets" / "cifar10_sample"))
