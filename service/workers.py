"""What the node asks of whoever processes its series: the ``Workers`` interface and what it reports.

Two implementations: ``LocalWorkers`` (``service/worker_pool.py``, the default: worker processes on
this host claiming jobs from the spool's queue) and the fleet's dispatcher (``service/fleet/``:
Celery workers on other hosts, ``[queue] broker``). The node calls the methods below from its
main thread only; health, ``/metrics``, ``liverfat status`` and the status page show
:class:`WorkerInfo` and :class:`QueueInfo` the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class Doorbell(Protocol):
    """What says "results were queued" to the node's sender: a ``threading`` or ``multiprocessing`` Event.

    Workers ring it after recording a series' results (outbox rows); the sender then sends at once.
    """

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class ModelState:
    """What a worker last reported about its model: loaded, with ``detail`` naming it, or why it cannot load."""

    loaded: bool
    detail: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "detail": self.detail, "at": self.at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelState:
        return cls(loaded=bool(data["loaded"]), detail=str(data["detail"]), at=float(data["at"]))


@dataclass(frozen=True)
class WorkerInfo:
    """One worker, a local process or a fleet worker."""

    name: str  # "worker-0" (local) or the Celery hostname "liverfat@host-cuda0" (fleet)
    host: str
    device: str  # what it is pinned to: "cpu", "cuda:0" (the GPU's index as this host's node or worker sees it)
    up: bool
    restarts: int  # times it died and was started again since the node started (local only; 0 for fleet)
    jobs_done: int  # series versions whose outcome it recorded since the node started
    last_seen: float | None  # epoch s; local: now while alive, the moment it was found dead otherwise
    model: ModelState | None  # local: from the worker's model reports; fleet: None unless reported

    def to_json(self) -> dict[str, Any]:
        """As ``/healthz`` and ``liverfat status --json`` carry it (times as epoch seconds)."""
        return {"name": self.name, "host": self.host, "device": self.device, "up": self.up,
                "restarts": self.restarts, "jobs_done": self.jobs_done, "last_seen": self.last_seen,
                "model": None if self.model is None else self.model.to_json()}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerInfo:
        model = data["model"]
        return cls(name=str(data["name"]), host=str(data["host"]), device=str(data["device"]), up=bool(data["up"]),
                   restarts=int(data["restarts"]), jobs_done=int(data["jobs_done"]),
                   last_seen=None if data["last_seen"] is None else float(data["last_seen"]),
                   model=None if model is None else ModelState.from_json(model))  # fmt: skip


@dataclass(frozen=True)
class QueueInfo:
    """The fleet's broker queue (``None`` in local mode, where the spool's counts are the queue)."""

    broker: str  # URL with the password replaced by ***
    connected: bool
    waiting: int  # messages ready in liverfat.series
    in_flight: int  # published, outcome not yet recorded (jobs processing in the node's ledger)
    dead_lettered: int  # messages in liverfat.dead not yet recorded + jobs recorded failed as dead-lettered

    def to_json(self) -> dict[str, Any]:
        return {"broker": self.broker, "connected": self.connected, "waiting": self.waiting,
                "in_flight": self.in_flight, "dead_lettered": self.dead_lettered}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueInfo:
        return cls(broker=str(data["broker"]), connected=bool(data["connected"]), waiting=int(data["waiting"]),
                   in_flight=int(data["in_flight"]), dead_lettered=int(data["dead_lettered"]))  # fmt: skip


class Workers(Protocol):
    """What the node calls to have its complete series processed: from its main thread, except :meth:`wake`."""

    def start(self) -> None:
        """After the spool is open: recover the jobs a stopped node left ``processing``, then start working.

        May leave work to :meth:`tick` (a full disk can delay the recovery's record, and nothing
        may claim a job before it is recorded).
        """

    def tick(self) -> None:
        """Every ``TICK_S``: watch and restart, read reports, record completions."""

    def wake(self) -> None:
        """A series became complete (or space returned): look at the queue now; any thread may call it."""

    def stop(self) -> None:
        """Finish or park the series in hand within ``[worker] shutdown_grace_s``; idempotent."""

    def workers(self) -> tuple[WorkerInfo, ...]:
        """Every worker known, up or not."""

    def queue(self) -> QueueInfo | None:
        """The broker's queue in fleet mode; ``None`` in local mode."""
