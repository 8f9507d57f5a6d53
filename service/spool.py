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
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from liverfat.errors import LiverfatError, Reason
from liverfat.files import durable_write
from liverfat.service.diskspace import DiskSpace, is_disk_full
from liverfat.service.spool_schema import SCHEMA_VERSION, migrate

log = logging.getLogger(__name__)

DB_NAME = "index.sqlite"
BUSY_TIMEOUT_S = 30.0
PROCESSING_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)



class JobState(StrEnum):
    RECEIVED = "received"  # instances arriving
    COMPLETE = "complete"  # stable: waiting for the worker
    PROCESSING = "processing"
    DONE = "done"  # measured (graded or not), results queued for sending
    REJECTED = "rejected"  # not applicable or unreadable, with reasons
    FAILED = "failed"  # our side went wrong; see last_error


UNRELEASED_NOTE = ("completed by the stable wait with no association release after its last instance (the sending "
                   "association was aborted, or is still open): the series may be incomplete")
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


class Spool:
    """One connection to the spool's index; safe to share between the threads of one process."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0, space: DiskSpace | None = None) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.space = space  # the node's disk-full state: stores are refused while it says full
        self.tmp_dir = root / "tmp"
        self.results_dir = root / "results"
        for folder in (root, root / "instances", self.tmp_dir, self.results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(root / DB_NAME, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before Success is answered
            self._db.execute("PRAGMA foreign_keys=ON")
            self._create_schema()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _create_schema(self) -> None:
        with self.transaction() as db:
            found = migrate(db, self.root / DB_NAME)
        if 0 < found < SCHEMA_VERSION:
            log.info("spool index %s migrated from schema version %d to %d", self.root / DB_NAME, found, SCHEMA_VERSION)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or rollback on error), holding the connection's lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (disk full) may or may not have rolled back
                    self._db.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- receiving ------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str, series_uid: str | None = None) -> bool:
        """Whether the instance is held (in ``series_uid``, or in any series when not given)."""
        where, params = ("", [sop_instance_uid]) if series_uid is None else (" AND series_uid = ?",
                                                                             [sop_instance_uid, series_uid])  # fmt: skip
        return bool(self.query(f"SELECT 1 FROM instances WHERE sop_instance_uid = ?{where}", params))

    def store_instance(self, data: bytes, info: InstanceInfo, now: float | None = None) -> StoreOutcome:
        """Write one instance durably and index it; when this returns, the instance is safe.

        An instance is identified by its series and SOP Instance UID: one already held in the
        same series is a duplicate (accepted, not written again; it re-opens a failed series);
        the same SOP Instance UID in another series is stored as that series' own instance.
        Raises ``LiverfatError`` with ``SPOOL_FULL`` while the node's disk-full state holds, when
        free space would fall below the configured minimum or the disk is full,
        ``SPOOL_WRITE_FAILED`` on any other failure. Nothing is indexed (and no file is left)
        when it raises.
        """
        now = time.time() if now is None else now
        if self.space is not None and self.space.is_full():
            raise LiverfatError(Reason.SPOOL_FULL, f"the spool's disk ({self.root}) is full: nothing is stored "
                                "until space returns")  # fmt: skip
        if self.has_instance(info.sop_instance_uid, info.series_uid):
            try:
                with self.transaction() as db:
                    held = _mark_held(db, info, now)
            except sqlite3.Error as error:
                raise self._write_error(f"cannot record a duplicate in {self.root / DB_NAME}", error) from error
            if held:
                return StoreOutcome.DUPLICATE
        self._check_free_space(len(data))
        name = f"{file_name(info.sop_instance_uid)}.{secrets.token_hex(4)}.dcm"  # new per reception: see retention
        relative = Path("instances") / file_name(info.series_uid) / name
        target = self.root / relative
        try:
            durable_write(target, data, self.tmp_dir)
        except OSError as error:
            raise self._write_error(f"cannot write instance to {target}", error) from error
        try:
            outcome = self._index_instance(info, relative, len(data), now)
        except sqlite3.Error as error:
            target.unlink(missing_ok=True)
            raise self._write_error(f"cannot index instance in {self.root / DB_NAME}", error) from error
        if outcome is StoreOutcome.DUPLICATE:
            target.unlink(missing_ok=True)  # a concurrent association stored it first: this copy is not indexed
        return outcome

    def _write_error(self, what: str, error: Exception) -> LiverfatError:
        """The error a failed write raises; a full disk also enters the node's disk-full state."""
        if not is_disk_full(error):
            return LiverfatError(Reason.SPOOL_WRITE_FAILED, f"{what}: {error}")
        return self._disk_full(f"{what}: {error}")

    def _disk_full(self, message: str) -> LiverfatError:
        if self.space is not None:
            self.space.release(message)
        return LiverfatError(Reason.SPOOL_FULL, message)

    def _check_free_space(self, size: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < size:
            raise self._disk_full(f"the spool's disk ({self.root}) has {free // 1024} KiB free, the instance needs "
                                  f"{size // 1024 + 1} KiB")  # fmt: skip
        if free - size < self.min_free_bytes:
            raise LiverfatError(Reason.SPOOL_FULL,
                                f"spool {self.root} has {free // 2**20} MiB free, the configured minimum is "
                                f"{self.min_free_bytes // 2**20} MiB ([spool] min_free_disk_mb)")  # fmt: skip

    def _index_instance(self, info: InstanceInfo, relative: Path, size: int, now: float) -> StoreOutcome:
        with self.transaction() as db:
            if _mark_held(db, info, now):
                return StoreOutcome.DUPLICATE  # a concurrent association stored it first
            job_id = self._open_job(db, info, now)
            db.execute("UPDATE jobs SET n_instances = n_instances + 1, last_instance_at = ? WHERE id = ?",
                       (now, job_id))  # fmt: skip
            db.execute(
                "INSERT INTO instances (series_uid, sop_instance_uid, job_id, sop_class_uid, path, size, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (info.series_uid, info.sop_instance_uid, job_id, info.sop_class_uid, str(relative), size, now),
            )
            other = db.execute("SELECT series_uid FROM instances WHERE sop_instance_uid = ? AND series_uid != ? "
                               "LIMIT 1", (info.sop_instance_uid, info.series_uid)).fetchone()  # fmt: skip
        if other is not None:
            log.warning("SOP Instance UID %s of series %s was already received in series %s (an anonymiser that "
                        "reuses UIDs?): kept as an instance of each series", info.sop_instance_uid, info.series_uid,
                        other["series_uid"])  # fmt: skip
        return StoreOutcome.STORED

    @staticmethod
    def _open_job(db: sqlite3.Connection, info: InstanceInfo, now: float) -> int:
        """The job a new instance joins: the series' open version, or a new version."""
        latest = _latest_job(db, info.series_uid)
        if latest is not None and latest["state"] in OPEN_STATES:
            db.execute("UPDATE jobs SET state = ?, completed_at = NULL WHERE id = ?", (JobState.RECEIVED, latest["id"]))
            return int(latest["id"])
        return _new_version(db, latest, JobState.RECEIVED, now, info=info)

    # -- series completion ----------------------------------------------------------------

    def complete_stable(self, stable_seconds: float, now: float | None = None) -> list[int]:
        """Mark complete every received series with no new instance for ``stable_seconds``.

        A series whose last instance was not followed by an association release (the sending
        association was aborted, or is still open) gets ``UNRELEASED_NOTE``: it may be partial.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, completed_at = ?, note = CASE WHEN released_at IS NULL OR "
                "released_at < last_instance_at THEN COALESCE(note || '; ', '') || ? ELSE note END "
                "WHERE state = ? AND last_instance_at <= ? RETURNING id",
                (JobState.COMPLETE, now, UNRELEASED_NOTE, JobState.RECEIVED, now - stable_seconds),
            )
            return sorted(row["id"] for row in rows.fetchall())

    def restart_clocks(self, now: float | None = None) -> int:
        """Give every series still receiving a full ``stable_seconds`` from now (after a restart).

        While the node was down its senders could not reach it: a series cut off by the
        outage must not count as complete before they have had a chance to send the rest.
        """
        with self.transaction() as db:
            cursor = db.execute("UPDATE jobs SET last_instance_at = ? WHERE state = ?",
                                (time.time() if now is None else now, JobState.RECEIVED))  # fmt: skip
            return int(cursor.rowcount)

    def note_released(self, series_uids: Sequence[str], now: float | None = None) -> None:
        """An association that stored into these series ended with an A-RELEASE (not an abort)."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.executemany("UPDATE jobs SET released_at = ? WHERE series_uid = ? AND state IN (?, ?)",
                           [(now, uid, *OPEN_STATES) for uid in series_uids])  # fmt: skip

    def complete_series(self, series_uids: Sequence[str], now: float | None = None) -> list[int]:
        """Mark complete the received version of each series (the association-release fast path)."""
        now = time.time() if now is None else now
        completed = []
        with self.transaction() as db:
            for series_uid in series_uids:
                row = db.execute(
                    "UPDATE jobs SET state = ?, completed_at = ?, released_at = ? WHERE series_uid = ? AND state = ? "
                    "RETURNING id",
                    (JobState.COMPLETE, now, now, series_uid, JobState.RECEIVED),
                ).fetchone()
                if row is not None:
                    completed.append(int(row["id"]))
        return completed

    # -- the worker -----------------------------------------------------------------------

    def claim_next(self, now: float | None = None) -> Job | None:
        """Take the oldest complete job: it becomes ``processing`` with one more attempt."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY completed_at, id LIMIT 1",
                             (JobState.COMPLETE,)).fetchone()  # fmt: skip
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ? WHERE id = ?",
                       (JobState.PROCESSING, now, row["id"]))  # fmt: skip
        return self.job(int(row["id"]))

    def job_files(self, job: Job) -> list[Path]:
        """Every instance of the job's series received up to this version, oldest first."""
        rows = self.query("SELECT path FROM instances WHERE series_uid = ? AND job_id <= ? ORDER BY received_at",
                          (job.series_uid, job.id))  # fmt: skip
        return [self.root / row["path"] for row in rows]

    def finish_job(self, job_id: int, result: JobResult, destinations: Sequence[str], now: float | None = None) -> None:
        """Record the outcome and queue every output for every destination, in one transaction."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, processing_s = ?, grade = ?, parenchymal_hu = ?, "
                "reasons = ?, timings = ?, outputs = ?, last_error = ? WHERE id = ? AND state = ?",
                (result.state, now, result.processing_s, result.grade, result.parenchymal_hu,
                 json.dumps([dict(r) for r in result.reasons]), json.dumps(dict(result.timings or {})),
                 json.dumps([o.to_json() for o in result.outputs]), result.error, job_id, JobState.PROCESSING),
            )  # fmt: skip
            _queue_outputs(db, job_id, result.outputs, destinations, now)

    def park_processing(self, why: str, job_id: int | None = None) -> list[int]:
        """Put jobs interrupted by something not their fault back in the queue; the attempt does not count.

        A shutdown, a node stopped as a whole (found at the next start), a full disk; every job
        ``processing`` when ``job_id`` is not given.
        """
        where, params = ("", []) if job_id is None else (" AND id = ?", [job_id])
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), last_error = ? WHERE state = ?"
                f"{where} RETURNING id",
                (JobState.COMPLETE, why, JobState.PROCESSING, *params),
            ).fetchall()
        return [int(row["id"]) for row in rows]

    def recover(self, max_attempts: int, why: str) -> list[Job]:
        """Jobs left ``processing`` by a dead worker: back to the queue, or failed after ``max_attempts``."""
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = CASE WHEN attempts >= ? THEN ? ELSE ? END, last_error = ? "
                "WHERE state = ? RETURNING id",
                (max_attempts, JobState.FAILED, JobState.COMPLETE, why, JobState.PROCESSING),
            ).fetchall()  # fmt: skip
        return [self.job(int(row["id"])) for row in rows]

    def retry_series(self, series_uid: str, now: float | None = None) -> tuple[Job, bool]:
        """Queue a new version of an ended series, processed with every instance held (``liverfat retry``).

        Returns the new job and ``True``, or the newest job and ``False`` when it has not ended
        (it is queued or processed anyway).
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            latest = _latest_job(db, series_uid)
            if latest is None:
                raise LiverfatError(Reason.UNKNOWN_SERIES, f"series {series_uid} was never received")
            if latest["state"] not in ENDED_STATES:
                return Job.from_row(latest), False
            if db.execute("SELECT 1 FROM instances WHERE series_uid = ?", (series_uid,)).fetchone() is None:
                raise LiverfatError(Reason.UNKNOWN_SERIES, f"series {series_uid} has no instance left: retention "
                                    "deleted them ([spool] keep_days); send the series again")  # fmt: skip
            note = f"retry of v{latest['version']} ({latest['state']}) by liverfat retry"
            job_id = _new_version(db, latest, JobState.COMPLETE, now, note=note)
        return self.job(job_id), True

    def clear_tmp(self) -> int:
        """Remove partial writes left by a crash; returns how many."""
        leftovers = list(self.tmp_dir.iterdir())
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    # -- reading --------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        return Job.from_row(self.query("SELECT * FROM jobs WHERE id = ?", (job_id,))[0])

    def jobs(self, series_uid: str | None = None, limit: int = 20) -> list[Job]:
        """The most recent jobs, newest first (of one series when given)."""
        where, params = ("WHERE series_uid = ?", [series_uid]) if series_uid else ("", [])
        rows = self.query(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [Job.from_row(row) for row in rows]

    def counts(self) -> SpoolCounts:
        """Queue and outbox counts and processing times, for health, metrics and ``liverfat status``."""
        jobs = {row["state"]: row["n"] for row in self.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
        outbox = self.query("SELECT state, COUNT(*) AS n, SUM(failures) AS failures, MIN(created_at) AS oldest "
                            "FROM outbox GROUP BY state")  # fmt: skip
        buckets = ", ".join(f"SUM(processing_s <= {le})" for le in PROCESSING_BUCKETS_S)
        timing = self.query(f"SELECT COUNT(processing_s), COALESCE(SUM(processing_s), 0), {buckets} FROM jobs")[0]
        pending = [row["oldest"] for row in outbox if row["state"] == OutboxState.PENDING]
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
        )

    def backlogs(self) -> tuple[DestinationBacklog, ...]:
        """Per destination with results waiting: how many, and since when they fail (for health)."""
        rows = self.query(
            "SELECT destination, COUNT(*) AS n, MIN(CASE WHEN last_error IS NOT NULL THEN created_at END) AS since, "
            "(SELECT e.last_error FROM outbox e WHERE e.destination = o.destination AND e.state = ? "
            " AND e.last_error IS NOT NULL ORDER BY e.id DESC LIMIT 1) AS error "
            "FROM outbox o WHERE state = ? GROUP BY destination ORDER BY destination",
            (OutboxState.PENDING, OutboxState.PENDING),
        )  # fmt: skip
        return tuple(DestinationBacklog(row["destination"], int(row["n"]), row["since"], row["error"]) for row in rows)

    def send_errors(self, limit: int = 5) -> list[sqlite3.Row]:
        """The most recent outbox rows that failed at least once and are not yet sent."""
        return self.query("SELECT o.*, j.series_uid FROM outbox o JOIN jobs j ON j.id = o.job_id "
                          "WHERE o.last_error IS NOT NULL ORDER BY o.id DESC LIMIT ?", (limit,))  # fmt: skip

    # -- the outbox -----------------------------------------------------------------------

    def due_sends(self, now: float | None = None, limit: int = 500, destination: str | None = None) -> list[Send]:
        """Pending rows due at ``now`` (``math.inf``: every pending row), oldest first; one destination's if named."""
        now = time.time() if now is None else now
        where = "" if destination is None else " AND destination = ?"
        rows = self.query(f"SELECT * FROM outbox WHERE state = ? AND next_attempt_at <= ?{where} ORDER BY id LIMIT ?",
                          (OutboxState.PENDING, now, *([] if destination is None else [destination]), limit))  # fmt: skip
        return [
            Send(id=row["id"], job_id=row["job_id"], destination=row["destination"], path=self.root / row["path"],
                 sop_class_uid=row["sop_class_uid"], sop_instance_uid=row["sop_instance_uid"],
                 transfer_syntax_uid=row["transfer_syntax_uid"], attempts=row["attempts"])  # fmt: skip
            for row in rows
        ]

    def pending_destinations(self) -> list[str]:
        """The destinations that have results waiting to be sent."""
        rows = self.query("SELECT DISTINCT destination FROM outbox WHERE state = ? ORDER BY destination",
                          (OutboxState.PENDING,))  # fmt: skip
        return [row["destination"] for row in rows]

    def mark_sent(self, send_id: int, now: float | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, sent_at = ?, last_error = NULL "
                       "WHERE id = ?", (OutboxState.SENT, time.time() if now is None else now, send_id))  # fmt: skip

    def mark_send_failed(self, send_id: int, error: str, retry_at: float | None) -> None:
        """One failed attempt; ``retry_at`` None means give up (state ``failed``)."""
        state = OutboxState.FAILED if retry_at is None else OutboxState.PENDING
        with self.transaction() as db:
            db.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, failures = failures + 1, "
                       "next_attempt_at = COALESCE(?, next_attempt_at), last_error = ? WHERE id = ?",
                       (state, retry_at, error, send_id))  # fmt: skip

    def requeue_series(self, series_uid: str, destinations: Sequence[str], now: float | None = None) -> Job:
        """Queue the newest result of a series again for every destination; returns its job."""
        now = time.time() if now is None else now
        with_outputs = [job for job in self.jobs(series_uid, limit=1000) if job.outputs]
        if not with_outputs:
            states = ", ".join(f"v{j.version} {j.state.value}" for j in self.jobs(series_uid)) or "never received"
            raise LiverfatError(Reason.UNKNOWN_SERIES, f"series {series_uid} has no result to send ({states})")
        job = with_outputs[0]
        with self.transaction() as db:
            _queue_outputs(db, job.id, job.outputs, destinations, now)
        return job


def _queue_outputs(db: sqlite3.Connection, job_id: int, outputs: Sequence[OutputFile], destinations: Sequence[str],
                   now: float) -> None:  # fmt: skip
    for destination in destinations:
        for output in outputs:
            db.execute(
                "INSERT INTO outbox (job_id, destination, path, sop_class_uid, sop_instance_uid, transfer_syntax_uid, "
                "state, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (job_id, destination, path) DO UPDATE SET state = excluded.state, attempts = 0, "
                "next_attempt_at = excluded.next_attempt_at, last_error = NULL, sent_at = NULL, created_at = excluded.created_at",
                (job_id, destination, output.path, output.sop_class_uid, output.sop_instance_uid,
                 output.transfer_syntax_uid, OutboxState.PENDING, now, now),
            )  # fmt: skip


def _mark_held(db: sqlite3.Connection, info: InstanceInfo, now: float) -> bool:
    """Whether the instance is held in its series; if it is, the series counts as active now.

    Retention waits for an active series; a failed series sent again opens a new version,
    processed with every instance held once it is complete.
    """
    held = db.execute("SELECT 1 FROM instances WHERE series_uid = ? AND sop_instance_uid = ?",
                      (info.series_uid, info.sop_instance_uid)).fetchone()  # fmt: skip
    latest = _latest_job(db, info.series_uid)
    if held is None or latest is None:
        return False
    job_id = int(latest["id"])
    if latest["state"] == JobState.FAILED:
        job_id = _new_version(db, latest, JobState.RECEIVED, now, info=info,
                              note=f"sent again after v{latest['version']} failed")  # fmt: skip
        log.info("series %s was sent again after v%d failed: v%d opened", info.series_uid, latest["version"],
                 latest["version"] + 1)  # fmt: skip
    db.execute("UPDATE jobs SET last_instance_at = MAX(last_instance_at, ?) WHERE id = ?", (now, job_id))
    return True


def _latest_job(db: sqlite3.Connection, series_uid: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute("SELECT * FROM jobs WHERE series_uid = ? ORDER BY version DESC LIMIT 1",
                                         (series_uid,)).fetchone()  # fmt: skip
    return row


def _new_version(db: sqlite3.Connection, latest: sqlite3.Row | None, state: JobState, now: float, *,
                 info: InstanceInfo | None = None, note: str | None = None) -> int:  # fmt: skip
    """Insert the series' next version in ``state``; returns its job id.

    The series, study and caller come from the instance that opens it, else from ``latest``.
    """
    version = 1 if latest is None else latest["version"] + 1
    if info is not None:
        series_uid, study_uid, calling_ae = info.series_uid, info.study_uid, info.calling_ae
    elif latest is not None:
        series_uid, study_uid, calling_ae = latest["series_uid"], latest["study_uid"], latest["calling_ae"]
    else:
        raise ValueError("a new version needs the instance that opens it or the series' latest version")
    cursor = db.execute(
        "INSERT INTO jobs (series_uid, version, study_uid, calling_ae, state, created_at, last_instance_at, "
        "completed_at, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (series_uid, version, study_uid, calling_ae, state, now, now, now if state is JobState.COMPLETE else None,
         note),
    )  # fmt: skip
    return int(cursor.lastrowid or 0)


def file_name(uid: str) -> str:
    """A UID as a file or folder name; a non-conformant UID gets a hash so names never collide."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in uid).strip(".")
    if cleaned == uid and cleaned:
        return uid
    return f"{cleaned[:64] or 'uid'}-{hashlib.sha256(uid.encode()).hexdigest()[:12]}"
