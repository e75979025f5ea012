"""The internal zfvis modules the explorer uses, in one place.

Everything :mod:`zfvis.serve` needs from zfvis beyond its public names (``import zfvis``)
is imported here and only here, so that moving zfvis's modules means changing this file
alone.
"""

from __future__ import annotations

from ..errors import first_line, is_out_of_memory
from ..gallery import channel_page
from ..graph import eval_mode
from ..incremental import IncrementalOcclusion, NotIncremental, map_totals
from ..occlusion import occluder_positions
from ..render import normalize_projection
from ..run_folder import safe_name
from ..sheets import SheetLayout, sheet_name

__all__ = [
    "IncrementalOcclusion",
    "NotIncremental",
    "SheetLayout",
    "channel_page",
    "eval_mode",
    "first_line",
    "is_out_of_memory",
    "map_totals",
    "normalize_projection",
    "occluder_positions",
    "safe_name",
    "sheet_name",
]
