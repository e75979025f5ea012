"""Mining runs (``zfvis mine`` output folders) behind the explorer: a unit's top 9, and
the run's files, served without leaving the folder."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..io.errors import UserInputError
from ..mining.gallery import channel_page
from ..mining.run_folder import safe_name
from ..viz.sheets import SheetLayout, sheet_name
from .errors import BadRequest, NotFound

__all__ = ["MiningRun", "RunSet", "resolve_inside", "CONTENT_TYPES"]

#: The files a run folder may serve, by ending, with their content types.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".json": "application/json",
}


def resolve_inside(root: Path, relative: str) -> Path:
    """The file ``relative`` names inside ``root``, refusing anything that could leave it.

    Refused: NUL bytes, backslashes, absolute paths, ``..`` and hidden (``.``) parts,
    symbolic links pointing out of ``root``, folders without an ``index.html``, and files
    whose ending is not in :data:`CONTENT_TYPES`.

    Args:
        root: The folder (resolved).
        relative: The path below it, already percent-decoded.

    Returns:
        The resolved file.

    Raises:
        BadRequest: A path that tries to leave the folder.
        NotFound: No such file (or one that is not served).
    """
    if "\x00" in relative or "\\" in relative:
        raise BadRequest("bad path: NUL bytes and backslashes are refused")
    parts = [p for p in relative.split("/") if p]
    if relative.startswith("/") or any(p in (".", "..") or p.startswith(".") for p in parts):
        raise BadRequest(f"bad path '{relative}': absolute paths, '..' and hidden files are refused")
    target = root.joinpath(*parts) if parts else root
    try:
        real = target.resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFound(f"no file '{relative}'") from None
    if real != root and root not in real.parents:
        raise NotFound(f"no file '{relative}'")  # a link out of the folder: as if it were not there
    if real.is_dir():
        real = real / "index.html"
        if not real.is_file():
            raise NotFound(f"'{relative or '/'}' is a folder; folders are not listed")
    if not real.is_file() or real.suffix.lower() not in CONTENT_TYPES:
        raise NotFound(f"no file '{relative}'")
    return real


class MiningRun:
    """One ``zfvis mine`` output folder.

    Args:
        index: Its number in addresses (``/runs/<index>/``).
        path: The folder.
        node_of: Layer name -> the explorer's graph node (raises for an unknown layer).
        channels_of: Graph node -> its channel count.

    Raises:
        UserInputError: Not a mining run, or one mined from another model.
    """

    def __init__(self, index: int, path: str | os.PathLike[str], node_of: Any, channels_of: dict[str, int]) -> None:
        self.index = index
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserInputError(f"run '{path}' is not a folder; pass a `zfvis mine` output folder (-o)")
        self.root = self.path.resolve()
        try:
            topk = json.loads((self.root / "topk.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserInputError(f"run '{path}' has no topk.json: it is not a `zfvis mine` output folder "
                                       "(or that run has not finished)") from None
        except (OSError, ValueError) as err:
            raise UserInputError(f"cannot read '{self.path / 'topk.json'}': {err}") from None
        layers = topk.get("layers") if isinstance(topk, dict) else None
        if not isinstance(layers, dict) or not layers:
            raise UserInputError(f"'{self.path / 'topk.json'}' lists no mined layers")
        self.model = str(topk.get("model", ""))
        self.layers: dict[str, dict[str, Any]] = {}
        for name, data in layers.items():
            node = self._node(node_of, name)
            count = data.get("channel_count") if isinstance(data, dict) else None
            if count is not None and channels_of.get(node) not in (None, count):
                raise UserInputError(
                    f"run '{path}' was mined from another model: its layer '{name}' has {count} channels, this "
                    f"model's has {channels_of.get(node)}; pass a run of the same model")
            self.layers[node] = {"name": name, **data}

    def _node(self, node_of: Any, name: str) -> str:
        try:
            return str(node_of(name))
        except UserInputError:
            raise UserInputError(f"run '{self.path}' was mined from another model: it has layer '{name}', "
                                       "which this model does not; pass a run of the same model") from None

    def info(self) -> dict[str, Any]:
        """The JSON the API gives."""
        return {"id": self.index, "name": self.path.name, "model": self.model,
                "layers": [d["name"] for d in self.layers.values()], "gallery": f"/runs/{self.index}/index.html"}

    def unit(self, node: str, channel: int) -> dict[str, Any]:
        """A unit's top activations over the data set, with where to find each tile.

        Returns:
            ``{"mined": False}`` where the run did not mine the unit; else its entries
            (image, value, position, box, and the tiles' places on the sheet), the sheet's
            address and the unit's gallery page.
        """
        data = self.layers.get(node)
        if data is None:
            return {"run": self.index, "mined": False, "reason": "the run did not mine this layer"}
        ids = data.get("channel_ids")
        lists = data.get("channels") or []
        slot = ids.index(channel) if isinstance(ids, list) and channel in ids else (
            channel if ids is None and channel < len(lists) else None)
        entries = lists[slot] if slot is not None and slot < len(lists) else []
        if not entries:
            return {"run": self.index, "mined": False, "reason": "the run did not mine this channel"}
        layout = SheetLayout.of([e["box"] for e in entries])
        base = f"/runs/{self.index}"
        sheet = f"{base}/tiles/{quote(safe_name(data['name']))}/{sheet_name(channel)}"
        tiles = []
        for rank, e in enumerate(entries):
            h, w = layout.sizes[rank]
            (t, lp), (_, lq) = layout.place(rank, False), layout.place(rank, True)
            image = str(e.get("image") or "")
            parts = image.replace("\\", "/").split("/")
            tiles.append({"rank": rank + 1, "image": e.get("image"), "file": parts[-1],
                          "folder": parts[-2] if len(parts) > 1 else None, "value": e.get("value"),
                          "position": e.get("position"), "box": e.get("box"), "size": [h, w],
                          "projection_at": [t, lp], "patch_at": [t, lq]})
        return {"run": self.index, "mined": True, "layer": data["name"], "channel": channel, "sheet": sheet,
                "sheet_size": list(layout.size), "entries": tiles, "page": f"{base}/{channel_page(data['name'], channel)}"}


class RunSet:
    """The mining runs the explorer was given."""

    def __init__(self, runs: Sequence[MiningRun]) -> None:
        self.runs = list(runs)

    def get(self, index: str) -> MiningRun:
        """The run numbered ``index``.

        Raises:
            NotFound: No such run.
        """
        if not re.fullmatch(r"[0-9]{1,6}", index, re.ASCII) or int(index) >= len(self.runs):
            raise NotFound(f"no run '{index}'; GET /api/runs lists them")
        return self.runs[int(index)]

    def units(self, node: str, channel: int) -> list[dict[str, Any]]:
        """Every run's top activations for the unit."""
        return [run.unit(node, channel) for run in self.runs]
