"""Progress bars: one place for how zfvis shows long work."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["progress", "DELAY"]

#: Seconds before a bar appears, so that an error in the first moments is the only line on stderr.
DELAY = 1.0


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str, show: bool = True, initial: int = 0) -> Iterator[Any]:
    """A tqdm bar on stderr, cleared (not left behind) when the work fails.

    It appears after :data:`DELAY` seconds, so that an error in the first moments is the
    only line on stderr. With ``show=False`` it is a silent bar whose ``update`` does nothing.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=not show,
               dynamic_ncols=True, delay=DELAY)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
