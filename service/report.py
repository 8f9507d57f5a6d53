"""What ``liverfat status`` and the status page show: the node's state as JSON-ready data.

Privacy: the spool's index holds no patient name, ID, birth date or accession number (the
listener indexes UIDs only), so neither does this report: a series is named by its Series
Instance UID and version, which a PACS administrator can look up in the PACS.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from liverfat import __version__
from liverfat.service.config import NodeConfig
from liverfat.service.health import Health, NodeStatus, utc
from liverfat.service.spool import DestinationBacklog, Job, Spool
from liverfat.service.workers import WorkerInfo

RECENT_SERIES = 10
RECENT_ERRORS = 5


def status_report(config: NodeConfig, status: NodeStatus, health: Health, spool: Spool, *,
                  running: bool, recent: int = RECENT_SERIES) -> dict[str, Any]:  # fmt: skip
    """The node's queue, health, destinations, recent series and last errors."""
    backlogs = {b.destination: b for b in status.counts.destinations}
    return {
        "version": __version__,
        "generated_at": utc(status.time),
        "node": {"ae_title": config.node.ae_title, "port": config.node.port, "running": running,
                 "spool": str(config.spool.dir), "spool_free_mib": status.spool_free_bytes // 2**20,
                 "destinations": [str(d) for d in config.send.destinations]},
        "health": {"ok": health.ok, "problems": list(health.problems), "warnings": list(health.warnings)},
        "model": None if status.model is None else {"loaded": status.model.loaded, "detail": status.model.detail},
        "workers": None if status.workers is None else [worker_json(w, status.time) for w in status.workers],
        "queue": None if status.queue is None else status.queue.to_json(),
        "series": {state.value: n for state, n in status.counts.jobs.items()},
        "outbox": {state.value: n for state, n in status.counts.outbox.items()},
        "instances_received": status.counts.instances,
        "send_failures": status.counts.send_failures,
        "destinations": [_destination_json(str(d), backlogs.get(str(d)), status) for d in config.send.destinations],
        "recent": [job_json(job) for job in spool.jobs(limit=recent)],
        "job_errors": [job_json(job) for job in spool.jobs(limit=1000) if job.last_error][:RECENT_ERRORS],
        "send_errors": [{"series_uid": row["series_uid"], "destination": row["destination"],
                         "file": Path(row["path"]).name, "state": row["state"], "attempts": row["attempts"],
                         "error": row["last_error"]} for row in spool.send_errors(RECENT_ERRORS)],
    }  # fmt: skip


def _destination_json(name: str, backlog: DestinationBacklog | None, status: NodeStatus) -> dict[str, Any]:
    """A configured destination: ``ok``, ``failing`` (a warning) or ``unhealthy`` (failing past the limit)."""
    if backlog is None or backlog.failing_since is None:
        return {"destination": name, "state": "ok", "waiting": backlog.pending if backlog else 0,
                "failing_since": None, "last_error": None}  # fmt: skip
    failing_s = status.time - backlog.failing_since
    state = "unhealthy" if failing_s >= status.unhealthy_after_s else "failing"
    return {"destination": name, "state": state, "waiting": backlog.pending,
            "failing_since": utc(backlog.failing_since), "last_error": backlog.last_error}  # fmt: skip


def worker_json(worker: WorkerInfo, now: float) -> dict[str, Any]:
    """One worker as shown: where it runs, whether it is up, what it did, its model; ``None`` where not known."""
    model = worker.model
    return {"name": worker.name, "host": worker.host, "device": worker.device, "up": worker.up,
            "restarts": worker.restarts, "jobs_done": worker.jobs_done,
            "last_seen": None if worker.last_seen is None else utc(worker.last_seen),
            "last_seen_s": None if worker.last_seen is None else round(max(now - worker.last_seen, 0.0), 1),
            "model": None if model is None else {"loaded": model.loaded, "detail": model.detail}}  # fmt: skip


def job_json(job: Job) -> dict[str, Any]:
    """One series version as shown: UIDs, state, grade, value, borderline, findings; no patient data."""
    return {"series_uid": job.series_uid, "version": job.version, "state": job.state.value, "grade": job.grade,
            "parenchymal_hu": job.parenchymal_hu, "borderline": job.borderline,
            "reasons": [dict(reason) for reason in job.reasons], "instances": job.n_instances,
            "attempts": job.attempts, "processing_s": job.processing_s, "last_error": job.last_error,
            "note": job.note, "worker": job.claimed_by,
            "updated_at": job.finished_at or job.started_at or job.completed_at or job.last_instance_at}  # fmt: skip


def local_time(epoch: float) -> str:
    """``epoch`` in the node's local time zone, named."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))
