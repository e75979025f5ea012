"""Image loading: any file Pillow opens, converted to RGB as a person expects."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "load_image", "to_rgb", "list_images"]

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
        lo, hi = image.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = image.convert("F").point(lambda v: (v - lo) * scale).convert("L")
        mode = "L"
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
        ValueError: The file is not an image Pillow can read, or it is truncated.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"image '{path}' {what}; pass the path of an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError:
        raise ValueError(f"'{path}' is not an image file Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError) as err:  # truncated or corrupt data
        raise ValueError(f"cannot decode image '{path}' ({err}); the file may be truncated or corrupt") from None


def list_images(root: str | os.PathLike[str]) -> list[str]:
    """Lists a data set as relative paths with "/" separators, in sorted order.

    Args:
        root: A directory, scanned recursively for files with an image ending, or a text
            file with one image path a line (relative paths are taken relative to the
            text file's folder; blank lines and lines starting with "#" are ignored).

    Returns:
        Sorted, de-duplicated paths. For a directory they are relative to it; for a list
        file they are as written there.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: It holds no image paths.
    """
    root = Path(root)
    if root.is_dir():
        found = sorted(
            {
                p.relative_to(root).as_posix()
                for p in root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            }
        )
    elif root.is_file():
        lines = root.read_text(encoding="utf-8").splitlines()
        found = sorted({ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")})
    else:
        raise FileNotFoundError(f"data set '{root}' does not exist; pass a directory of images or a text file of paths")
    if not found:
        raise ValueError(f"data set '{root}' holds no images (endings: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def resolve(root: str | os.PathLike[str], relative: str) -> Path:
    """Returns the file that a path from :func:`list_images` names."""
    root = Path(root)
    base = root if root.is_dir() else root.parent
    p = Path(relative)
    return p if p.is_absolute() else base / p
