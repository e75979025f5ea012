"""The environment zfvis draws in: matplotlib off screen, with a writable config folder.

zfvis draws every figure on an Agg canvas of its own, so no screen and no interactive
backend is needed. A broken environment must not reach the person as matplotlib's own
warnings or a traceback: ``MPLBACKEND`` naming no backend, ``MPLCONFIGDIR`` that is a file,
``HOME`` that is not a folder. :func:`prepare_matplotlib` runs before matplotlib is first
imported (:mod:`zfvis.viz` calls it) and, where the environment is unusable, chooses for
zfvis: the Agg backend, and a private temporary config folder (removed at exit).
Where the environment works, nothing is changed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["prepare_matplotlib"]

_DONE = False


def _usable_folder(path: Path) -> bool:
    """Whether ``path`` is, or can be made, a folder this process can write to."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _home_folder(variable: str, default: str) -> Path | None:
    base = os.environ.get(variable)
    if base:
        return Path(base) / "matplotlib"
    try:
        return Path.home() / default / "matplotlib"
    except (RuntimeError, KeyError):
        return None


def _config_folders_usable() -> bool:
    """Whether the folders matplotlib would use for its config and its font cache work."""
    configured = os.environ.get("MPLCONFIGDIR")
    if configured:
        return _usable_folder(Path(configured))
    folders = [_home_folder("XDG_CONFIG_HOME", ".config"), _home_folder("XDG_CACHE_HOME", ".cache")]
    return all(f is not None and _usable_folder(f) for f in folders)


def _private_config_folder() -> None:
    folder = tempfile.mkdtemp(prefix="zfvis-matplotlib-")
    atexit.register(shutil.rmtree, folder, True)
    os.environ["MPLCONFIGDIR"] = folder


def prepare_matplotlib() -> None:
    """Makes matplotlib importable quietly whatever the environment (see the module's doc).

    Called before the first ``import matplotlib``; once matplotlib is imported it does
    nothing. ``MPLBACKEND`` is left as it is when it names a backend matplotlib knows;
    otherwise zfvis uses Agg for this process (and its children).
    """
    global _DONE
    if _DONE or "matplotlib" in sys.modules:
        _DONE = True
        return
    _DONE = True
    if not _config_folders_usable():
        _private_config_folder()
    backend = os.environ.pop("MPLBACKEND", None)
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its warnings about folders, should any remain
    try:
        import matplotlib
        from matplotlib import rcsetup
    finally:
        logger.setLevel(level)
    if backend is None:
        return
    try:
        rcsetup.validate_backend(backend)
    except ValueError:
        backend = "agg"  # zfvis draws on its own Agg canvases; a typo here must not stop it
    os.environ["MPLBACKEND"] = backend
    with contextlib.suppress(ValueError):
        matplotlib.rcParams["backend"] = backend
