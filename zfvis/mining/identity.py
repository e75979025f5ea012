"""What the data set of a mining run was: every image's size and modification time, and a
content hash of every winner, so that a run never mixes two versions of a data set.

The plan phase records each chosen image's size and modification time (one ``stat`` a
file); they are saved with every state. When pass 1 is done, the winners' contents are
hashed (SHA-256, each winning image once) and saved too, and ``topk.json`` names each
winner's hash. A resumed or rerun run compares: an image whose size or time changed,
or a winner whose bytes changed (also behind an unchanged time), stops the run with the
list of changed files before anything is mixed; ``restart`` mines the data set again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..io.errors import UserInputError
from ..io.images import resolve
from ..io.ownership import digest_file

__all__ = ["DataSetChanged", "stat_files", "hash_files", "changed_files", "check_unchanged"]

_SHOWN = 5  # changed files named in a message


class DataSetChanged(UserInputError):
    """The data set changed since the run began: resuming would mix two versions of it."""


def stat_files(root: Path, files: Sequence[str]) -> torch.Tensor:
    """``(N, 2)`` int64: each file's size and modification time in ns (``-1`` when missing)."""
    out = torch.full((len(files), 2), -1, dtype=torch.long)
    for i, rel in enumerate(files):
        try:
            st = os.stat(resolve(root, rel))
        except OSError:
            continue
        out[i, 0], out[i, 1] = st.st_size, st.st_mtime_ns
    return out


def hash_files(root: Path, files: Sequence[str], indices: Iterable[int]) -> dict[int, str]:
    """The SHA-256 of each file ``files[i]`` for ``i`` in ``indices`` (``""``: unreadable)."""
    out = {}
    for i in sorted(set(indices)):
        try:
            out[i] = digest_file(resolve(root, files[i]))
        except OSError:
            out[i] = ""
    return out


def changed_files(root: Path, files: Sequence[str], chosen: Sequence[int], saved: dict[str, object],
                  now: torch.Tensor) -> list[str]:  # fmt: skip
    """The files of ``chosen`` whose size, time or (for a winner) contents differ from
    those ``saved`` with a state (its ``"identity"`` and ``"winners"``); empty for a state
    of a zfvis without them."""
    changed: set[int] = set()
    before = saved.get("identity")
    if isinstance(before, torch.Tensor) and before.shape == now.shape:
        rows = (before != now).any(dim=1).nonzero().flatten().tolist()
        changed.update(chosen[r] for r in rows)
    winners = saved.get("winners")
    if isinstance(winners, dict) and winners:
        current = hash_files(root, files, [i for i in winners if isinstance(i, int) and 0 <= i < len(files)])
        changed.update(i for i, sha in current.items() if sha != winners[i])
    return [files[i] for i in sorted(changed)]


def check_unchanged(out: Path, changed: Sequence[str], flag: str) -> None:
    """Raises :class:`DataSetChanged` naming ``changed`` (when there are any)."""
    if not changed:
        return
    shown = ", ".join(changed[:_SHOWN]) + (f" and {len(changed) - _SHOWN} more" if len(changed) > _SHOWN else "")
    raise DataSetChanged(f"the data set changed since the run in '{out}' began: {len(changed)} image(s) differ in "
                         f"size, modification time or contents ({shown}); its results would mix two versions of the "
                         f"data set, so nothing was done: put the images back, or pass {flag} to mine it again")
