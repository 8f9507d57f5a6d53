"""The node's durable state: received instances on disk, indexed in SQLite with the job queue and outbox.

Layout under the spool folder::

    index.sqlite            instances, jobs (one row per series version) and outbox
    instances/<series>/     one file per received instance (written atomically, a new name per reception)
    results/<job id>/       what the worker wrote for one series version
    tmp/                    partial writes; emptied at start
    reserve                 space held for the index until the disk fills (``diskspace``)

A job is one *version* of a series. Instances arriving while its job is ``received`` or
``complete`` join it; an instance that arrives once processing has started opens the next
version, which is processed again with every instance of the series held so far. So does a
duplicate arriving after the series failed (it was sent again to be processed again), and
``liverfat retry`` (:meth:`Spool.retry_series`). An instance is identified by its series and
SOP Instance UID. Every state change is one SQLite transaction; the schema and its migrations
are in ``spool_schema`` (version in ``PRAGMA user_version``). Retention is in ``retention``.

``Spool`` is the one class callers use. It is built from one part per job, sharing one
connection (``spool_db``): receiving (``spool_instances``), series completion and the job
queue (``spool_queue``) and the outbox (``spool_outbox``); it adds what spans them (counts,
``liverfat resend``). The shared types are in ``spool_types`` and are importable from here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from liverfat.errors import LiverfatError, Reason
from liverfat.service.diskspace import DiskSpace
from liverfat.service.spool_db import DB_NAME
from liverfat.service.spool_instances import Instances, file_name
from liverfat.service.spool_outbox import Outbox, queue_outputs
from liverfat.service.spool_queue import UNRELEASED_NOTE, JobQueue
from liverfat.service.spool_schema import SCHEMA_VERSION
from liverfat.service.spool_types import (
    ENDED_STATES,
    DestinationBacklog,
    InstanceInfo,
    Job,
    JobResult,
    JobState,
    OutboxState,
    OutputFile,
    Send,
    SpoolCounts,
    StoreOutcome,
)

__all__ = [
    "DB_NAME", "ENDED_STATES", "PROCESSING_BUCKETS_S", "SCHEMA_VERSION", "UNRELEASED_NOTE",
    "DestinationBacklog", "InstanceInfo", "Job", "JobResult", "JobState", "OutboxState", "OutputFile", "Send",
    "Spool", "SpoolCounts", "StoreOutcome", "file_name",
]  # fmt: skip

PROCESSING_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Spool(Instances, JobQueue, Outbox):
    """One connection to the spool's index; safe to share between the threads of one process."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0, space: DiskSpace | None = None) -> None:
        self.min_free_bytes = min_free_bytes
        self.space = space  # the node's disk-full state: stores are refused while it says full
        super().__init__(root)

    def counts(self) -> SpoolCounts:
        """Queue and outbox counts and processing times, for health, metrics and ``liverfat status``."""
        jobs = {row["state"]: row["n"] for row in self.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
        outbox = self.query("SELECT state, COUNT(*) AS n, SUM(failures) AS failures, MIN(created_at) AS oldest "
                            "FROM outbox GROUP BY state")  # fmt: skip
        buckets = ", ".join(f"SUM(processing_s <= {le})" for le in PROCESSING_BUCKETS_S)
        timing = self.query(f"SELECT COUNT(processing_s), COALESCE(SUM(processing_s), 0), {buckets} FROM jobs")[0]
        pending = [row["oldest"] for row in outbox if row["state"] == OutboxState.PENDING]
        ended = "state IN (" + ", ".join(f"'{state.value}'" for state in ENDED_STATES) + ")"
        return SpoolCounts(
            jobs={state: int(jobs.get(state, 0)) for state in JobState},
            outbox={state: int(next((r["n"] for r in outbox if r["state"] == state), 0)) for state in OutboxState},
            instances=int(self.query("SELECT COALESCE(SUM(n_instances), 0) AS n FROM jobs")[0]["n"]),
            send_failures=int(sum(row["failures"] or 0 for row in outbox)),
            processing_count=int(timing[0]),
            processing_sum_s=float(timing[1]),
            processing_buckets={le: int(timing[2 + i] or 0) for i, le in enumerate(PROCESSING_BUCKETS_S)},
            oldest_pending_send_at=pending[0] if pending else None,
            destinations=self.backlogs(),
            grades={row["grade"]: int(row["n"]) for row in self.query(
                f"SELECT grade, COUNT(*) AS n FROM jobs WHERE grade IS NOT NULL AND {ended} GROUP BY grade")},
            reasons={row["code"]: int(row["n"]) for row in self.query(
                "SELECT json_extract(reason.value, '$.code') AS code, COUNT(DISTINCT jobs.id) AS n "
                f"FROM jobs, json_each(jobs.reasons) AS reason WHERE {ended} GROUP BY code")},
        )  # fmt: skip

    def requeue_series(self, series_uid: str, destinations: Sequence[str], now: float | None = None) -> Job:
        """Queue the newest result of a series again for every destination; returns its job."""
        now = time.time() if now is None else now
        with_outputs = [job for job in self.jobs(series_uid, limit=1000) if job.outputs]
        if not with_outputs:
            states = ", ".join(f"v{j.version} {j.state.value}" for j in self.jobs(series_uid)) or "never received"
            raise LiverfatError(Reason.UNKNOWN_SERIES, f"series {series_uid} has no result to send ({states})")
        job = with_outputs[0]
        with self.transaction() as db:
            queue_outputs(db, job.id, job.outputs, destinations, now)
        return job
