"""A unit's synthetic image (feature visualization by optimization), as background jobs with progress.

A job runs :func:`zfvis.feature_vis` for one channel of one layer, at the explorer's input size and
with its preprocessing's normalisation, and counts the steps done. Jobs run one at a time on one
worker thread, in the order asked; a few more wait in a queue, and beyond that a request is refused
(429). Asking again for a unit whose image is being computed joins that job. Finished images are
kept in the process, per (layer, channel, settings) of the explorer's one model, so asking again
answers at once.

The optimisation runs on a shallow twin of the model: its own modules (so that the forward hooks
and the eval mode of the optimisation never touch the model the other requests use) sharing the
model's parameters and buffers (no memory copied, nothing written to them). It therefore does not
take the explorer's lock: clicks, projections and camera frames are answered while it runs. (A
model that cannot be copied is optimised on as it is, under the lock.)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from typing import Any
from urllib.parse import urlencode

import torch
from PIL import Image

from ..analysis.feature_vis import feature_vis
from ..analysis.feature_vis.param import PARAMS
from ..core.deconvnet import Deconvnet
from ..io.errors import UserInputError, first_line, is_out_of_memory
from .cache import LRUCache
from .errors import ApiError, BadRequest, NotFound
from .explorer import Explorer, LayerInfo

__all__ = ["SyntheticJob", "SyntheticJobs", "SyntheticLimits", "SyntheticResult", "twin"]

_log = logging.getLogger("zfvis.explorer")


@dataclasses.dataclass(frozen=True)
class SyntheticLimits:
    """How much optimisation the explorer does for the page.

    Attributes:
        steps: The steps when the request names none (a few seconds on a CPU for a CIFAR-size model).
        max_steps: The most steps a request may ask for.
        queued: Jobs that may wait behind the running one before a request is refused (429).
        cached: Finished images kept.
    """

    steps: int = 128
    max_steps: int = 1024
    queued: int = 3
    cached: int = 512


@dataclasses.dataclass(frozen=True)
class SyntheticResult:
    """A finished synthetic image.

    Attributes:
        png: The image in [0, 1] RGB, as a PNG at the model's input size.
        value: The channel's objective (mean activation) on the final image.
        first: The objective at the first step.
        last: The objective at the last step (on a transformed image).
        seconds: How long the optimisation took.
    """

    png: bytes
    value: float
    first: float
    last: float
    seconds: float


class _Cancelled(Exception):
    """Raised from the step callback to stop an optimisation."""


@dataclasses.dataclass
class SyntheticJob:
    """One optimisation and how far it got.

    Attributes:
        id: Its name in addresses.
        layer: The layer.
        channel: The channel.
        steps: Optimisation steps.
        seed: The seed.
        param: ``"fourier"`` or ``"pixel"``.
        done: Steps done.
        state: ``"queued"``, ``"running"``, ``"done"``, ``"failed"``, ``"cancelled"``, or ``"none"``
            (not asked for: :meth:`SyntheticJobs.lookup`).
        cached: Whether the image was already computed when asked for.
        error: The failure, one line.
        result: The image, once done.
    """

    id: str
    layer: LayerInfo
    channel: int
    steps: int
    seed: int
    param: str
    done: int = 0
    state: str = "queued"
    cached: bool = False
    error: str | None = None
    result: SyntheticResult | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, int, int, int, str]:
        """What the cache knows the image by."""
        return self.layer.node, self.channel, self.steps, self.seed, self.param

    def query(self) -> dict[str, Any]:
        """The parameters that name the image in addresses."""
        return {"layer": self.layer.name, "channel": self.channel, "steps": self.steps, "seed": self.seed,
                "param": self.param}

    def info(self) -> dict[str, Any]:
        """The JSON the API gives."""
        out: dict[str, Any] = {"id": self.id, **self.query(), "total": self.steps, "done": self.done,
                               "state": self.state, "cached": self.cached, "error": self.error, "result": None,
                               "seconds": round(time.monotonic() - self.started, 3)}
        if self.result is not None:
            r = self.result
            out["result"] = {"png": f"/api/synthetic.png?{urlencode(self.query())}", "value": r.value,
                             "first": r.first, "last": r.last, "seconds": round(r.seconds, 3)}
        return out


def _int(params: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int:
    value = params.get(name, default)
    if value is None or value == "":
        raise BadRequest(f"missing parameter '{name}'")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer, got {str(value)[:40]!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be in {lo}..{hi}, got {value}")
    return value


def _png(image: torch.Tensor) -> bytes:
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model's modules that shares its parameters and buffers (nothing copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class SyntheticJobs:
    """The synthetic-image jobs of one explorer (one runs at a time, a few wait; results kept).

    Args:
        explorer: The explorer whose model, preprocessing and layers the jobs use.
        limits: Steps, queue and cache bounds.
    """

    def __init__(self, explorer: Explorer, limits: SyntheticLimits | None = None) -> None:
        self.ex = explorer
        self.limits = limits or SyntheticLimits()
        self.cache: LRUCache[SyntheticResult] = LRUCache(256 << 20, max_items=self.limits.cached,
                                                          size=lambda r: len(r.png) + 200)
        self.optimisations = 0  # feature_vis calls made (the cache's test counts them)
        self._jobs: OrderedDict[str, SyntheticJob] = OrderedDict()
        self._queue: deque[SyntheticJob] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._twin: Deconvnet | None = None

    # ------------------------------------------------------------------ asking
    def job_for(self, params: dict[str, Any]) -> SyntheticJob:
        """A job (not started) for the parameters, checked.

        Args:
            params: ``layer``, ``channel``, optional ``steps``, ``seed``, ``param``.

        Raises:
            ApiError: An unknown layer (404), a bad channel or setting (400).
        """
        layer = self.ex.layer(str(params.get("layer", "")))
        if len(layer.shape) not in (1, 3):
            raise BadRequest(f"layer '{layer.name}' has no channels to visualise")
        channel = _int(params, "channel", None, 0, layer.shape[0] - 1)
        steps = _int(params, "steps", self.limits.steps, 1, self.limits.max_steps)
        seed = _int(params, "seed", 0, 0, 2**31 - 1)
        param = params.get("param", "fourier")
        if param not in PARAMS:
            raise BadRequest(f"'param' must be one of {', '.join(PARAMS)}, got {str(param)[:40]!r}")
        return SyntheticJob(secrets.token_hex(4), layer, channel, steps, seed, str(param))

    def lookup(self, params: dict[str, Any]) -> SyntheticJob:
        """What is known of the image of the parameters, starting nothing: a done job if it is
        cached, the queued or running job computing it, else a job in state ``"none"``.

        Raises:
            ApiError: Bad parameters (400/404).
        """
        job = self.job_for(params)
        found = self.cache.get(job.key)
        if found is not None:
            job.state, job.done, job.cached, job.result = "done", job.steps, True, found
            return job
        with self._lock:
            same = next((j for j in self._jobs.values() if j.key == job.key and j.state in ("queued", "running")),
                        None)
        if same is not None:
            return same
        job.state = "none"
        return job

    def start(self, params: dict[str, Any]) -> SyntheticJob:
        """The image's job: done at once if cached, the running or queued one for the same image,
        or a new job in the queue.

        Raises:
            ApiError: Bad parameters (400/404), the queue is full (429), the server stops (503).
        """
        job = self.lookup(params)
        if job.state == "done":
            with self._lock:
                self._remember(job)
        if job.state != "none":
            return job
        with self._lock:
            if self._stop.is_set():
                raise ApiError(503, "the server is stopping")
            same = next((j for j in self._jobs.values() if j.key == job.key and j.state in ("queued", "running")),
                        None)
            if same is not None:
                return same
            job.state = "queued"
            waiting = len(self._queue)
            if waiting >= self.limits.queued:
                raise ApiError(429, f"{waiting} synthetic images are already waiting behind the one being computed; "
                                    "wait for them to finish, then ask again")
            self._remember(job)
            self._queue.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="zfvis-synthetic", daemon=True)
                self._worker.start()
        return job

    def _remember(self, job: SyntheticJob) -> None:
        """Lists the job under its id (the last 32 are kept); call with the lock held."""
        self._jobs[job.id] = job
        while len(self._jobs) > 32:
            self._jobs.popitem(last=False)

    def get(self, job_id: str) -> SyntheticJob:
        """The job with this id.

        Raises:
            NotFound: No such job (the last 32 are kept).
        """
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no synthetic-image job '{job_id}'")
        return job

    def png(self, params: dict[str, Any]) -> bytes:
        """The cached image of the parameters.

        Raises:
            NotFound: Not computed (yet): POST /api/synthetic starts it.
        """
        job = self.lookup(params)
        if job.result is None:
            raise NotFound(f"the synthetic image of {job.layer.name} channel {job.channel} ({job.steps} steps) "
                           "is not computed; POST /api/synthetic starts it")
        return job.result.png

    # ------------------------------------------------------------------ stopping
    def cancel(self) -> None:
        """Stops the running job after its current step, cancels the queued ones, refuses new jobs;
        returns at once (no lock taken: safe in a signal handler)."""
        self._stop.set()

    def close(self, wait: float = 5.0) -> None:
        """Cancels and waits up to ``wait`` seconds for the running job to end."""
        self.cancel()
        worker = self._worker
        if worker is not None:
            worker.join(timeout=wait)

    def running(self) -> int:
        """Worker threads still running (0 or 1)."""
        worker = self._worker
        return int(worker is not None and worker.is_alive())

    # ------------------------------------------------------------------ working
    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None if self._worker is threading.current_thread() else self._worker
                    return
                job = self._queue.popleft()
            if self._stop.is_set():
                job.state = "cancelled"
                continue
            self._run(job)

    def _run(self, job: SyntheticJob) -> None:
        job.state, job.started = "running", time.monotonic()
        try:
            job.result = self.cache.put(job.key, self._compute(job))
            job.state = "done"
        except _Cancelled:
            job.state = "cancelled"
        except Exception as err:  # noqa: BLE001 - reported to the page; ours are logged in full
            job.state = "failed"
            if isinstance(err, UserInputError) or is_out_of_memory(err):
                job.error = first_line(err)
            else:
                _log.exception("synthetic-image job %s failed", job.id)
                job.error = f"internal error: {type(err).__name__}: {first_line(err)}"

    def _model(self) -> tuple[Deconvnet, Any]:
        """The network to optimise on and the lock to hold meanwhile: the twin and none, or, for a
        model that cannot be copied, the explorer's own under its lock (clicks then wait)."""
        if self._twin is None:
            try:
                self._twin = Deconvnet(twin(self.ex.model))
            except Exception as err:  # noqa: BLE001 - any model's deepcopy may refuse; the shared model still works
                _log.info("synthetic images use the explorer's model under its lock (%s: %s)", type(err).__name__,
                          first_line(err))
                self._twin = self.ex.dn
        return self._twin, (self.ex.lock if self._twin is self.ex.dn else contextlib.nullcontext())

    def _compute(self, job: SyntheticJob) -> SyntheticResult:
        def step(done: int, total: int) -> None:
            job.done = done
            if self._stop.is_set():
                raise _Cancelled

        pre = self.ex.images.preprocess
        norm = pre if hasattr(pre, "mean") and hasattr(pre, "std") else None
        start = time.monotonic()
        self.optimisations += 1
        dn, lock = self._model()
        with lock:
            res = feature_vis(dn, job.layer.node, [job.channel], steps=job.steps, seed=job.seed, param=job.param,
                              size=tuple(self.ex.input_shape()[1:]), preprocess=norm, progress=False, on_step=step)
        return SyntheticResult(_png(res.images[0]), float(res.final[0]), float(res.values[0].mean()),
                               float(res.values[-1].mean()), time.monotonic() - start)
