"""Occlusion sensitivity (ZF Fig. 7) of the current image, as background jobs with progress.

A job runs zfvis's incremental occlusion engine (Krypton's incremental inference, see
:func:`zfvis.occlusion`) one batch of occluder positions at a time, taking the model's
lock per batch so that clicks are answered between batches, and counts the positions
done. A model the incremental engine cannot run exactly falls back to
:func:`zfvis.occlusion` with ``method="full"``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from ..analysis.incremental import IncrementalOcclusion, NotIncremental
from ..analysis.occlusion import occluder_positions, occlusion
from ..core.graph import eval_mode
from ..io.errors import UserInputError, first_line, is_out_of_memory
from .errors import ApiError, BadRequest, NotFound
from .explorer import Explorer, LayerInfo

__all__ = ["OcclusionJob", "OcclusionJobs", "BATCH"]

BATCH = 16
_log = logging.getLogger("zfvis.explorer")


@dataclasses.dataclass
class OcclusionJob:
    """One occlusion run and how far it got.

    Attributes:
        id: Its name in addresses.
        image: The image id.
        layer: The layer whose feature map's total activation is mapped.
        channel: That feature map.
        target: The class whose probability is mapped (``None``: the top class).
        patch: Occluder side in input pixels.
        stride: Step between positions.
        total: Number of occluder positions.
        done: Positions computed so far.
        state: ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``.
        error: The failure, one line.
        result: The maps, once done.
    """

    id: str
    image: str
    layer: LayerInfo
    channel: int
    target: int | None
    patch: int
    stride: int
    total: int
    done: int = 0
    state: str = "running"
    error: str | None = None
    result: dict[str, Any] | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)

    def info(self) -> dict[str, Any]:
        """The JSON the API gives."""
        return {"id": self.id, "image": self.image, "layer": self.layer.name, "channel": self.channel,
                "target": self.target, "patch": self.patch, "stride": self.stride, "total": self.total,
                "done": self.done, "state": self.state, "error": self.error, "result": self.result,
                "seconds": round(time.monotonic() - self.started, 3)}


_INT = re.compile(r"-?[0-9]{1,9}", re.ASCII)


def _int(params: dict[str, Any], name: str, default: int | None) -> int | None:
    """An integer parameter: a JSON integer, or a string of ASCII digits (full-width refused)."""
    value = params.get(name, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**9):
        return value
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    raise BadRequest(f"'{name}' must be an integer, got {str(value)[:40]!r}")


class OcclusionJobs:
    """The occlusion jobs of one explorer (one runs at a time; the last few are kept).

    Args:
        explorer: The explorer whose model, images and lock the jobs use.
        classes: The model's class names, if known.
    """

    def __init__(self, explorer: Explorer, classes: list[str] | None = None) -> None:
        self.ex = explorer
        self.classes = classes
        self._jobs: OrderedDict[str, OcclusionJob] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, params: dict[str, Any]) -> OcclusionJob:
        """Checks the parameters and starts a job.

        Args:
            params: ``image``, ``layer``, ``channel``, optional ``target``, ``patch``, ``stride``.

        Raises:
            ApiError: Bad parameters (400/404), or another job is running (429).
        """
        ex = self.ex
        image = ex.images.get(str(params.get("image", "")))
        layer = ex.layer(str(params.get("layer", "")))
        if len(layer.shape) not in (1, 3):
            raise BadRequest(f"layer '{layer.name}' has no feature maps to measure")
        channel = _int(params, "channel", 0)
        if not 0 <= channel < layer.shape[0]:  # type: ignore[operator]
            raise BadRequest(f"channel {channel} is out of range: layer '{layer.name}' has {layer.shape[0]} channels")
        side = min(image.x.shape[-2:])
        patch = _int(params, "patch", max(1, side // 4))
        stride = _int(params, "stride", max(1, patch // 4))  # type: ignore[operator]
        try:
            tops, lefts = occluder_positions(tuple(image.x.shape[-2:]), patch, stride)
        except (UserInputError, TypeError) as err:
            raise BadRequest(first_line(err)) from None
        target = _int(params, "target", None)
        n_classes = self._n_classes()
        if target is not None and n_classes is not None and not 0 <= target < n_classes:
            raise BadRequest(f"target class {target} is out of range: the model has {n_classes} classes")
        job = OcclusionJob(secrets.token_hex(4), image.id, layer, channel, target, patch, stride,  # type: ignore[arg-type]
                           len(tops) * len(lefts))
        with self._lock:
            if self._stop.is_set():
                raise ApiError(503, "the server is stopping")
            if any(j.state == "running" for j in self._jobs.values()):
                raise ApiError(429, "an occlusion is already running; wait for it to finish")
            self._jobs[job.id] = job
            while len(self._jobs) > 8:
                self._jobs.popitem(last=False)
            thread = threading.Thread(target=self._run, args=(job,), name=f"zfvis-occlusion-{job.id}", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
        return job

    def get(self, job_id: str) -> OcclusionJob:
        """The job with this id.

        Raises:
            NotFound: No such job.
        """
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no occlusion job '{job_id}'")
        return job

    def cancel(self) -> None:
        """Stops running jobs after their current batch (and refuses new ones); returns at once."""
        self._stop.set()

    def close(self, wait: float = 5.0) -> None:
        """Cancels running jobs and waits up to ``wait`` seconds for them to end."""
        self.cancel()
        with self._lock:
            threads = list(self._threads)
        end = time.monotonic() + wait
        for t in threads:
            t.join(timeout=max(0.0, end - time.monotonic()))

    def running(self) -> int:
        """Job threads still running."""
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    def _n_classes(self) -> int | None:
        last = self.ex.layers()[-1] if self.ex.layers() else None
        return last.shape[0] if last is not None and len(last.shape) == 1 else None

    def _run(self, job: OcclusionJob) -> None:
        try:
            job.result = self._compute(job)
            job.state = "cancelled" if self._stop.is_set() else "done"
        except Exception as err:  # noqa: BLE001 - reported to the page; ours are logged in full
            job.state = "failed"
            if isinstance(err, UserInputError) or is_out_of_memory(err):
                job.error = first_line(err)
            else:
                _log.exception("occlusion job %s failed", job.id)
                job.error = f"internal error: {type(err).__name__}: {first_line(err)}"

    def _compute(self, job: OcclusionJob) -> dict[str, Any] | None:
        ex = self.ex
        x = ex.images.get(job.image).x
        param = next(ex.model.parameters(), None)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        tops, lefts = occluder_positions(tuple(x.shape[-2:]), job.patch, job.stride)
        grid = torch.cartesian_prod(tops, lefts).to(x.device)
        fill = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        try:
            with ex.lock, eval_mode(ex.model), torch.no_grad():
                runner = IncrementalOcclusion(ex.dn.graph, x, job.layer.node, grid, (job.patch, job.patch), fill)
        except NotIncremental:
            return self._full(job, x)
        logits, acts = [], []
        for start in range(0, len(grid), BATCH):
            if self._stop.is_set():
                return None
            idx = torch.arange(start, min(start + BATCH, len(grid)), device=grid.device)
            with ex.lock, eval_mode(ex.model), torch.no_grad():
                out, act = runner.run(idx, job.channel)
            logits.append(out.float().cpu())
            acts.append(act.float().cpu())
            job.done = int(idx[-1]) + 1
        base = runner.base_logits.float().cpu()
        base_act = float(runner.base_layer[0, job.channel].sum())
        return self._result(job, torch.cat(logits), torch.cat(acts), base=base, base_act=base_act,
                            shape=(len(tops), len(lefts)))

    def _full(self, job: OcclusionJob, x: torch.Tensor) -> dict[str, Any]:
        with self.ex.lock:
            res = occlusion(self.ex.model, x, patch=job.patch, stride=job.stride, target=job.target,
                                  layer=job.layer.node, channel=job.channel, method="full")
        job.done = job.total
        out = {"method": "full"}
        out.update(self._maps(job, res.class_prob, top_class=res.top_class, top_prob=res.top_prob,
                              activation=res.activation, target=res.target))
        out.update(base_prob=res.base_prob, base_class=res.base_class, base_activation=res.base_activation,
                   tops=res.tops.tolist(), lefts=res.lefts.tolist())
        return out

    def _result(self, job: OcclusionJob, logits: torch.Tensor, acts: torch.Tensor, *, base: torch.Tensor,
                base_act: float, shape: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
        probs = torch.softmax(logits, dim=1)
        base_probs = torch.softmax(base, dim=1)[0]
        target = int(base_probs.argmax()) if job.target is None else job.target
        top_prob, top_class = probs.max(dim=1)
        out: dict[str, Any] = {"method": "incremental"}
        out.update(self._maps(job, probs[:, target].reshape(shape), top_class=top_class.reshape(shape),
                              top_prob=top_prob.reshape(shape), activation=acts.reshape(shape), target=target))
        tops, lefts = occluder_positions(tuple(self.ex.images.get(job.image).x.shape[-2:]), job.patch, job.stride)
        out.update(base_prob=float(base_probs[target]), base_class=int(base_probs.argmax()),
                   base_activation=base_act, tops=tops.tolist(), lefts=lefts.tolist())
        return out

    def _maps(self, job: OcclusionJob, prob: torch.Tensor, *, top_class: torch.Tensor, top_prob: torch.Tensor,
              activation: torch.Tensor | None, target: int) -> dict[str, Any]:  # fmt: skip
        names = self.classes
        return {"target": target, "target_name": names[target] if names and target < len(names) else None,
                "class_names": names, "class_prob": prob.tolist(), "top_class": top_class.tolist(),
                "top_prob": top_prob.tolist(), "activation": None if activation is None else activation.tolist()}
