"""The spool's shared types: job and outbox states, what is stored, what a job produced, what is sent, counts.

Plain values with no behaviour beyond reading a row; the spool's modules and its callers share them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class JobState(StrEnum):
    RECEIVED = "received"  # instances arriving
    COMPLETE = "complete"  # stable: waiting for the worker
    PROCESSING = "processing"
    DONE = "done"  # measured (graded or not), results queued for sending
    REJECTED = "rejected"  # not applicable or unreadable, with reasons
    FAILED = "failed"  # our side went wrong; see last_error


OPEN_STATES = (JobState.RECEIVED, JobState.COMPLETE)  # new instances still join these
ENDED_STATES = (JobState.DONE, JobState.REJECTED, JobState.FAILED)


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # gave up after max_attempts; ``liverfat resend`` re-queues


class StoreOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # already held: accepted, not written again


@dataclass(frozen=True)
class InstanceInfo:
    """What the index needs to know about a received instance (no patient data)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str | None
    calling_ae: str


@dataclass(frozen=True)
class OutputFile:
    """A result file the sender must deliver; ``path`` is relative to the spool folder."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "sop_class_uid": self.sop_class_uid,
                "sop_instance_uid": self.sop_instance_uid, "transfer_syntax_uid": self.transfer_syntax_uid}  # fmt: skip


@dataclass(frozen=True)
class JobResult:
    """How a job ended, as the worker records it."""

    state: JobState
    grade: str | None = None
    parenchymal_hu: float | None = None
    reasons: tuple[Mapping[str, str], ...] = ()
    timings: Mapping[str, float] | None = None
    outputs: tuple[OutputFile, ...] = ()
    error: str | None = None
    processing_s: float | None = None
    borderline: bool | None = None  # the graded value lies within the borderline margin of the threshold


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    version: int
    study_uid: str | None
    state: JobState
    attempts: int
    n_instances: int
    last_error: str | None
    created_at: float
    last_instance_at: float
    completed_at: float | None
    started_at: float | None
    finished_at: float | None
    processing_s: float | None
    grade: str | None
    parenchymal_hu: float | None
    timings: dict[str, float]
    outputs: tuple[OutputFile, ...]
    note: str | None = None  # how this version came about, when unusual (a possibly partial series, a retry)
    reasons: tuple[Mapping[str, str], ...] = ()  # findings ({"code", "message"}): why not graded, or warnings
    borderline: bool | None = None
    claimed_by: str | None = None  # the worker that took it last (``[worker] count``, GPUs), for recovery and status

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        outputs = tuple(OutputFile(**item) for item in json.loads(row["outputs"] or "[]"))
        return cls(
            id=row["id"], series_uid=row["series_uid"], version=row["version"], study_uid=row["study_uid"],
            state=JobState(row["state"]), attempts=row["attempts"], n_instances=row["n_instances"],
            last_error=row["last_error"], created_at=row["created_at"], last_instance_at=row["last_instance_at"],
            completed_at=row["completed_at"], started_at=row["started_at"], finished_at=row["finished_at"],
            processing_s=row["processing_s"], grade=row["grade"], parenchymal_hu=row["parenchymal_hu"],
            timings=json.loads(row["timings"] or "{}"), outputs=outputs, note=row["note"],
            reasons=tuple(json.loads(row["reasons"] or "[]")),
            borderline=None if row["borderline"] is None else bool(row["borderline"]),
            claimed_by=row["claimed_by"],
        )  # fmt: skip


@dataclass(frozen=True)
class Send:
    """One outbox row: one file for one destination."""

    id: int
    job_id: int
    destination: str
    path: Path  # absolute
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    attempts: int


@dataclass(frozen=True)
class DestinationBacklog:
    """One destination's results waiting to be sent; ``failing_since`` is ``None`` while none has failed.

    ``failing_since`` is when the oldest waiting result that failed at least once was queued (its
    first attempt follows within a second); ``last_error`` is the newest waiting row's error.
    """

    destination: str
    pending: int
    failing_since: float | None
    last_error: str | None


@dataclass(frozen=True)
class SpoolCounts:
    jobs: Mapping[JobState, int]
    outbox: Mapping[OutboxState, int]
    instances: int
    send_failures: int  # failed C-STORE attempts, ever
    processing_count: int
    processing_sum_s: float
    processing_buckets: Mapping[float, int]  # upper bound in s -> jobs that took at most that long
    oldest_pending_send_at: float | None
    destinations: tuple[DestinationBacklog, ...] = ()  # destinations with results waiting
    grades: Mapping[str, int] = field(default_factory=dict)  # ended series versions by grade
    reasons: Mapping[str, int] = field(default_factory=dict)  # ended versions by finding code (a version may count twice)
