"""The node's health: a pure verdict computed from its state (``assess``), with no I/O.

A **problem** means the node cannot do its job, and ``/healthz`` answers 503 naming it:

- the DICOM listener or a local worker process is not running (a worker that keeps dying is down
  between its restarts);
- the model cannot be loaded on a worker (no weights, a broken model folder): its series would fail;
- fleet mode: the broker cannot be reached, or series wait in its queue and no worker has been
  seen for ``FLEET_SILENT_S``;
- the spool's free space is below ``[spool] min_free_disk_mb`` + ``nearly_full_margin_mb``
  (below ``min_free_disk_mb`` itself new instances are already refused), or the disk is full;
- a destination's results have failed for ``[send] unhealthy_after_s`` or longer.

A **warning** means it can, but someone should look: no destination, a destination failing for
less than ``unhealthy_after_s``, results that gave up or wait long, failed series, a model still
loading, dead-lettered series, a fleet worker gone. Messages name a worker only when there are
several (one local worker reads as before). The HTTP endpoints, the status page and ``liverfat status`` only render this verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from liverfat import __version__
from liverfat.service.config import SendSection
from liverfat.service.spool import DestinationBacklog, JobState, OutboxState, SpoolCounts
from liverfat.service.workers import ModelState, QueueInfo, WorkerInfo

STALE_SEND_S = 3600.0  # a result still unsent after this long suggests the destination is unreachable
FLEET_SILENT_S = 60.0  # series waiting in the broker and no fleet worker seen for this long: a problem
UTC = "%Y-%m-%dT%H:%M:%SZ"  # ISO 8601, UTC, to the second


@dataclass(frozen=True)
class NodeStatus:
    """Everything the verdict and the metrics are computed from; ``None`` means not known here."""

    counts: SpoolCounts
    spool_free_bytes: int
    min_free_bytes: int
    destinations: int
    nearly_full_bytes: int = 0  # [spool] nearly_full_margin_mb, in bytes: red this far above min_free_bytes
    listener_up: bool | None = None
    workers: tuple[WorkerInfo, ...] | None = None  # None: not known here (``liverfat status`` without the node)
    queue: QueueInfo | None = None  # the broker's queue in fleet mode; None in local mode
    spool_full: bool | None = None  # the node's disk-full state (service/diskspace.py)
    time: float = field(default_factory=time.time)
    unhealthy_after_s: float = SendSection.unhealthy_after_s  # [send] unhealthy_after_s

    @property
    def worker_up(self) -> bool | None:
        """Local: every worker runs; fleet: at least one does; ``None`` when not known."""
        if self.workers is None:
            return None
        up = [w.up for w in self.workers]
        return all(up) if self.queue is None else any(up)

    @property
    def worker_restarts(self) -> int:
        """Times a worker died and was started again since the node started, all workers together."""
        return sum(w.restarts for w in self.workers or ())

    @property
    def model(self) -> ModelState | None:
        """A model that cannot load on some worker, else the first worker's; ``None``: none reported yet."""
        models = [w.model for w in self.workers or () if w.model is not None]
        return next((m for m in models if not m.loaded), models[0] if models else None)


@dataclass(frozen=True)
class Health:
    ok: bool
    problems: tuple[str, ...]  # the node cannot do its job: 503
    warnings: tuple[str, ...]  # it can, but someone should look

    def to_json(self, status: NodeStatus) -> dict[str, Any]:
        """The ``/healthz`` body."""
        model = status.model
        return {
            "status": "ok" if self.ok else "unhealthy",
            "version": __version__,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "series": {state.value: n for state, n in status.counts.jobs.items()},
            "outbox": {state.value: n for state, n in status.counts.outbox.items()},
            "listener_up": status.listener_up,
            "worker_up": status.worker_up,
            "worker_restarts": status.worker_restarts,
            "model": None if model is None else {"loaded": model.loaded, "detail": model.detail, "at": utc(model.at)},
            "workers": None if status.workers is None else [w.to_json() for w in status.workers],
            "queue": None if status.queue is None else status.queue.to_json(),
            "spool_free_mib": status.spool_free_bytes // 2**20,
            "destinations_failing": [_failing_json(b, status) for b in status.counts.destinations
                                     if b.failing_since is not None],
        }  # fmt: skip


def assess(status: NodeStatus) -> Health:
    """The node's health from its state; no I/O."""
    problems: list[str] = []
    warnings: list[str] = []
    if status.listener_up is False:
        problems.append("the DICOM listener is not running")
    workers = status.workers or ()
    if status.queue is None:
        for worker in workers:
            if not worker.up:
                restarts = f" (it died {worker.restarts} time(s) since the node started; see the log)"
                problems.append(f"the worker process{_named(worker, workers)} is not running"
                                + (restarts if worker.restarts else ""))  # fmt: skip
    else:
        _fleet(status, status.queue, problems, warnings)
    _models(workers, problems, warnings)
    _space(status, problems)
    if status.destinations == 0:
        warnings.append("no destination configured: results stay in the spool ([send] destinations)")
    for backlog in status.counts.destinations:
        if backlog.failing_since is not None:
            failing_s = status.time - backlog.failing_since
            (problems if failing_s >= status.unhealthy_after_s else warnings).append(_failing_text(backlog, failing_s))
    failed_sends = status.counts.outbox[OutboxState.FAILED]
    if failed_sends:
        warnings.append(f"{failed_sends} result file(s) could not be sent; see `liverfat status`, "
                        "then `liverfat resend`")  # fmt: skip
    oldest = status.counts.oldest_pending_send_at
    if oldest is not None and status.time - oldest > STALE_SEND_S:
        warnings.append(f"a result has waited {(status.time - oldest) / 3600:.1f} h to be sent; is the destination up?")
    failed_jobs = status.counts.jobs[JobState.FAILED]
    if failed_jobs:
        warnings.append(f"{failed_jobs} series failed; see `liverfat status`")
    return Health(ok=not problems, problems=tuple(problems), warnings=tuple(warnings))


def _named(worker: WorkerInfo, workers: tuple[WorkerInfo, ...]) -> str:
    """`` worker-1 (cuda:1)`` when there are several workers, else nothing (one worker needs no name)."""
    return f" {worker.name} ({worker.device})" if len(workers) > 1 else ""


def _models(workers: tuple[WorkerInfo, ...], problems: list[str], warnings: list[str]) -> None:
    """A model that cannot load is a problem (one line per reason), one still loading a warning."""
    failing: dict[str, list[WorkerInfo]] = {}
    for worker in workers:
        if worker.model is not None and not worker.model.loaded:
            failing.setdefault(worker.model.detail, []).append(worker)
    for detail, where in failing.items():
        last = utc(max(w.model.at for w in where if w.model is not None))
        if len(workers) == 1:
            problems.append(f"the model cannot be loaded: {detail}; every series fails until this is fixed "
                            f"(last try {last})")  # fmt: skip
        else:
            names = ", ".join(_named(w, workers).strip() for w in where)
            problems.append(f"the model cannot be loaded on {names}: {detail}; the series they take fail until this "
                            f"is fixed (last try {last})")  # fmt: skip
    loading = [w for w in workers if w.model is None and w.up]
    if len(workers) == 1 and loading:
        warnings.append("the worker is loading the model; series wait in the queue until it is loaded")
    elif loading:
        names = ", ".join(_named(w, workers).strip() for w in loading)
        warnings.append(f"loading the model: {names}; series wait in the queue until a worker has it loaded")


def _fleet(status: NodeStatus, queue: QueueInfo, problems: list[str], warnings: list[str]) -> None:
    """Fleet mode: the broker, whether any worker serves the series waiting in it, dead letters."""
    if not queue.connected:
        problems.append(f"the broker {queue.broker} cannot be reached: complete series are not handed to the "
                        "workers until it can ([queue] broker)")  # fmt: skip
    seen = [w.last_seen for w in status.workers or () if w.last_seen is not None]
    silent_s = None if not seen else status.time - max(seen)
    if queue.waiting and (silent_s is None or silent_s > FLEET_SILENT_S):
        since = "no worker has been seen" if silent_s is None else f"no worker seen for {_duration(silent_s)}"
        problems.append(f"{queue.waiting} series wait in the broker's queue and {since}: start `liverfat worker` "
                        "on a GPU host")  # fmt: skip
    for worker in status.workers or ():
        if not worker.up:
            last = "never" if worker.last_seen is None else utc(worker.last_seen)
            warnings.append(f"worker {worker.name} on {worker.host} ({worker.device}) is gone (last seen {last})")
    if queue.dead_lettered:
        warnings.append(f"{queue.dead_lettered} series dead-lettered: each stopped its worker at every delivery and "
                        "was recorded failed, not retried; see `liverfat status`")  # fmt: skip


def _space(status: NodeStatus, problems: list[str]) -> None:
    free_mib, min_mib = status.spool_free_bytes // 2**20, status.min_free_bytes // 2**20
    if status.spool_free_bytes < status.min_free_bytes:
        problems.append(f"spool has {free_mib} MiB free, below the {min_mib} MiB minimum: new instances are refused "
                        "([spool] min_free_disk_mb)")  # fmt: skip
    elif status.spool_free_bytes < status.min_free_bytes + status.nearly_full_bytes:
        problems.append(f"spool is nearly full: {free_mib} MiB free; new instances are refused below {min_mib} MiB "
                        f"([spool] min_free_disk_mb, red from {status.nearly_full_bytes // 2**20} MiB above it: "
                        "nearly_full_margin_mb)")  # fmt: skip
    if status.spool_full:
        problems.append(f"the spool's disk is full ({status.spool_free_bytes // 2**10} KiB free): new instances are "
                        "answered 0xA700 and no series is processed until space returns")  # fmt: skip


def _failing_text(backlog: DestinationBacklog, failing_s: float) -> str:
    since = utc(backlog.failing_since or 0.0)
    return (f"destination {backlog.destination} failing since {since} ({_duration(failing_s)}): {backlog.last_error}; "
            f"{backlog.pending} result file(s) wait")  # fmt: skip


def _failing_json(backlog: DestinationBacklog, status: NodeStatus) -> dict[str, Any]:
    since = backlog.failing_since or 0.0
    return {"destination": backlog.destination, "failing_since": utc(since), "failing_s": round(status.time - since, 1),
            "reason": backlog.last_error, "waiting": backlog.pending}  # fmt: skip


def utc(epoch: float) -> str:
    """``epoch`` as an ISO 8601 UTC time to the second."""
    return time.strftime(UTC, time.gmtime(epoch))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"
