"""The node's health: a pure verdict computed from its state (``assess``), with no I/O.

A **problem** means the node cannot do its job, and ``/healthz`` answers 503 naming it:

- the DICOM listener or the worker process is not running (a worker that keeps dying is down
  between its restarts);
- the model cannot be loaded (no weights, a broken model folder): every series would fail;
- the spool's free space is below ``[spool] min_free_disk_mb`` + ``nearly_full_margin_mb``
  (below ``min_free_disk_mb`` itself new instances are already refused), or the disk is full;
- a destination's results have failed for ``[send] unhealthy_after_s`` or longer.

A **warning** means it can, but someone should look: no destination, a destination failing for
less than ``unhealthy_after_s``, results that gave up or wait long, failed series, a model still
loading. The HTTP endpoints, the status page and ``liverfat status`` only render this verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from liverfat import __version__
from liverfat.service.config import SendSection
from liverfat.service.spool import DestinationBacklog, JobState, OutboxState, SpoolCounts

STALE_SEND_S = 3600.0  # a result still unsent after this long suggests the destination is unreachable
UTC = "%Y-%m-%dT%H:%M:%SZ"  # ISO 8601, UTC, to the second


@dataclass(frozen=True)
class ModelState:
    """What the worker last reported about its model: loaded, with ``detail`` naming it, or why it cannot load."""

    loaded: bool
    detail: str
    at: float


@dataclass(frozen=True)
class NodeStatus:
    """Everything the verdict and the metrics are computed from; ``None`` means not known here."""

    counts: SpoolCounts
    spool_free_bytes: int
    min_free_bytes: int
    destinations: int
    nearly_full_bytes: int = 0  # [spool] nearly_full_margin_mb, in bytes: red this far above min_free_bytes
    listener_up: bool | None = None
    worker_up: bool | None = None
    worker_restarts: int = 0  # times the worker died and was started again since the node started
    model: ModelState | None = None  # None: not reported yet (loading) or not known here
    spool_full: bool | None = None  # the node's disk-full state (service/diskspace.py)
    time: float = field(default_factory=time.time)
    unhealthy_after_s: float = SendSection.unhealthy_after_s  # [send] unhealthy_after_s


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
    if status.worker_up is False:
        restarts = f" (it died {status.worker_restarts} time(s) since the node started; see the log)"
        problems.append("the worker process is not running" + (restarts if status.worker_restarts else ""))
    _model(status, problems, warnings)
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


def _model(status: NodeStatus, problems: list[str], warnings: list[str]) -> None:
    model = status.model
    if model is not None and not model.loaded:
        problems.append(f"the model cannot be loaded: {model.detail}; every series fails until this is fixed "
                        f"(last try {utc(model.at)})")  # fmt: skip
    elif model is None and status.worker_up:
        warnings.append("the worker is loading the model; series wait in the queue until it is loaded")


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
