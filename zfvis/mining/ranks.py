"""The processes of a torchrun run, and how they tell each other that one failed.

Under torchrun every rank calls :meth:`Ranks.check` at the same points: the phase
boundaries of a run and every step of its main loop. A rank that fails calls
:meth:`Ranks.fail` instead, which meets the others' next check: an all-reduce of the
lowest failed rank, then an all-gather of the reasons. The others then raise
:class:`~zfvis.io.errors.RankFailedError` naming the failed rank, within one step of the
loop, instead of waiting for the backend's timeout (30 minutes for gloo). A single
process has nothing to exchange; every call is then a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ..io.errors import RankFailedError, first_line

__all__ = ["Ranks", "LostContactError"]


class Ranks:
    """The processes of a run and their check-ins (see the module's description).

    Attributes:
        rank: This process's rank (0 for a single process).
        world: The number of processes.
        owned: Whether :meth:`setup` initialised the process group (and
            :meth:`close` destroys it).
        device: Where the collectives' tensors live (the GPU for nccl).
        active: Whether check-ins still happen (``False`` after :meth:`finish`, a
            failure, or for a single process).
    """

    def __init__(self, rank: int = 0, world: int = 1, owned: bool = False, device: torch.device | None = None) -> None:
        self.rank, self.world, self.owned = rank, world, owned
        self.device = device or torch.device("cpu")
        self.active = world > 1
        #: Each rank's place, for messages: ``"node 1 (host h, pid 123)"``.
        self.places: list[str] = [_place()] * world

    @classmethod
    def setup(cls, device: torch.device) -> Ranks:
        """Joins the process group of torchrun's environment (or an initialised one)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), False, _collective_device(device))
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and "RANK" in os.environ and dist.is_available():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
            ranks = cls(dist.get_rank(), dist.get_world_size(), True, _collective_device(device))
            ranks.places = [str(p) for p in ranks.gather(_place())]
            return ranks
        return cls()

    def _exchange(self, failed: bool, reason: str = "") -> None:
        flag = torch.tensor([self.rank if failed else self.world], device=self.device)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            first = int(flag.item())
            if first >= self.world:
                return
            reasons: list[Any] = [None] * self.world
            dist.all_gather_object(reasons, reason if failed else None)
        except RuntimeError as err:  # a peer vanished (killed): the backend reports a broken connection
            self.active = False
            if failed:
                return
            raise LostContactError(self, first_line(err)) from None
        self.active = False
        if not failed:
            raise RankFailedError(first, self.world, reasons[first] or "")

    def check(self) -> None:
        """Raises :class:`RankFailedError` if another rank has failed."""
        if self.active:
            self._exchange(False)

    def fail(self, err: BaseException) -> None:
        """Tells the other ranks that this one failed (at their next check)."""
        if self.active and not isinstance(err, RankFailedError):
            self._exchange(True, f"{type(err).__name__}: {first_line(err)}")

    def finish(self) -> None:
        """No more collectives follow."""
        self.active = False

    def gather(self, obj: Any) -> list[Any]:
        """All ranks' ``obj``, in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def _collective_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _place() -> str:
    """Where this process runs: its node (torchrun's ``GROUP_RANK``), host and pid."""
    import socket

    node = os.environ.get("GROUP_RANK")
    return f"{'node ' + node + ' ' if node is not None else ''}(host {socket.gethostname()}, pid {os.getpid()})"


class LostContactError(RankFailedError):
    """Another rank vanished (its node was killed or lost): the backend's connection broke.

    With two ranks the lost one is the other; with more, every other rank is named as
    a candidate (the backend does not say which peer it lost).
    """

    def __init__(self, ranks: Ranks, detail: str) -> None:
        others = [r for r in range(ranks.world) if r != ranks.rank]
        lost = others[0] if len(others) == 1 else -1
        RuntimeError.__init__(self)
        self.rank, self.world, self.reason = lost, ranks.world, detail
        who = (f"rank {lost} of {ranks.world}, {ranks.places[lost]}" if lost >= 0 else
               f"one of ranks {', '.join(f'{r} ({ranks.places[r]})' for r in others)} of {ranks.world}")
        self.args = (f"lost contact with {who} (its process or node stopped: {detail}); every rank stopped: run "
                     "the same command again on every node to resume",)

    def __str__(self) -> str:
        return str(self.args[0])
