"""The node's durable state: received instances on disk, indexed in SQLite with the job queue and outbox.

Layout under the spool folder::

    index.sqlite            instances, jobs (one row per series version) and outbox
    instances/<series>/     one file per received instance (written atomically, a new name per reception)
    results/<job id>/       what the worker wrote for one series version
    tmp/                    partial writes; emptied at start

A job is one *version* of a series. Instances arriving while its job is ``received`` or
``complete`` join it; an instance that arrives once processing has started opens the next
version, which is processed again with every instance of the series held so far.
Every state change is one SQLite transaction; the schema version is ``PRAGMA user_version``.

Retention (:meth:`Spool.purge_expired`): a series expires ``keep_days`` after both its last
instance arrived (duplicates count: a sender still cares) and its last version ended, once none
of its results waits to be sent. Its instance files and index rows, and its result folders, are
deleted; its job rows stay, for ``liverfat status`` and the metrics. Two rules make a purge safe
against an association storing into the same series at the same moment: a duplicate is answered
only after its series has been marked active in a transaction, and the purge re-checks expiry in
its own transaction; every reception writes a new file name, so a purge deletes only files that
no index row will point at again.
"""

from __future__ import annotations

import errno
import hashlib
import json
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

from liverfat.dicom_io.errors import LiverfatError, Reason
from liverfat.files import durable_write

SCHEMA_VERSION = 1
DB_NAME = "index.sqlite"
BUSY_TIMEOUT_S = 30.0
SECONDS_PER_DAY = 86400.0
PROCESSING_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)

SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    study_uid TEXT,
    calling_ae TEXT,
    state TEXT NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    completed_at REAL,
    started_at REAL,
    finished_at REAL,
    processing_s REAL,
    grade TEXT,
    parenchymal_hu REAL,
    reasons TEXT,
    timings TEXT,
    outputs TEXT,
    UNIQUE (series_uid, version)
);
CREATE INDEX jobs_by_state ON jobs (state);
CREATE TABLE instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX instances_by_series ON instances (series_uid, job_id);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (job_id, destination, path)
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
"""


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

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        outputs = tuple(OutputFile(**item) for item in json.loads(row["outputs"] or "[]"))
        return cls(
            id=row["id"], series_uid=row["series_uid"], version=row["version"], study_uid=row["study_uid"],
            state=JobState(row["state"]), attempts=row["attempts"], n_instances=row["n_instances"],
            last_error=row["last_error"], created_at=row["created_at"], last_instance_at=row["last_instance_at"],
            completed_at=row["completed_at"], started_at=row["started_at"], finished_at=row["finished_at"],
            processing_s=row["processing_s"], grade=row["grade"], parenchymal_hu=row["parenchymal_hu"],
            timings=json.loads(row["timings"] or "{}"), outputs=outputs,
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
class Purged:
    """What one retention pass deleted."""

    series: int = 0
    instances: int = 0
    result_folders: int = 0
    bytes_freed: int = 0


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

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = root / "tmp"
        self.results_dir = root / "results"
        for folder in (root, root / "instances", self.tmp_dir, self.results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(root / DB_NAME, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before Success is answered
        self._db.execute("PRAGMA foreign_keys=ON")
        self._create_schema()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _create_schema(self) -> None:
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise LiverfatError(
                    Reason.SPOOL_IN_USE,
                    f"spool index {self.root / DB_NAME} has schema version {version}, this liverfat knows "
                    f"version {SCHEMA_VERSION} (PRAGMA user_version); use a new spool folder",
                )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or rollback on error), holding the connection's lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- receiving ------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)))

    def store_instance(self, data: bytes, info: InstanceInfo, now: float | None = None) -> StoreOutcome:
        """Write one instance durably and index it; when this returns, the instance is safe.

        Raises ``LiverfatError`` with ``SPOOL_FULL`` when free space would fall below the
        configured minimum or the disk is full, ``SPOOL_WRITE_FAILED`` on any other failure.
        Nothing is indexed (and no file is left) when it raises.
        """
        now = time.time() if now is None else now
        if self.has_instance(info.sop_instance_uid):
            try:
                with self.transaction() as db:
                    held = _mark_duplicate(db, info.sop_instance_uid, now)
            except sqlite3.Error as error:
                raise _write_error(f"cannot record a duplicate in {self.root / DB_NAME}", error) from error
            if held:
                return StoreOutcome.DUPLICATE
        self._check_free_space(len(data))
        name = f"{file_name(info.sop_instance_uid)}.{secrets.token_hex(4)}.dcm"  # new per reception: see retention
        relative = Path("instances") / file_name(info.series_uid) / name
        target = self.root / relative
        try:
            durable_write(target, data, self.tmp_dir)
        except OSError as error:
            raise _write_error(f"cannot write instance to {target}", error) from error
        try:
            outcome = self._index_instance(info, relative, len(data), now)
        except sqlite3.Error as error:
            target.unlink(missing_ok=True)
            raise _write_error(f"cannot index instance in {self.root / DB_NAME}", error) from error
        if outcome is StoreOutcome.DUPLICATE:
            target.unlink(missing_ok=True)  # a concurrent association stored it first: this copy is not indexed
        return outcome

    def _check_free_space(self, size: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            raise LiverfatError(Reason.SPOOL_FULL,
                                f"spool {self.root} has {free // 2**20} MiB free, the configured minimum is "
                                f"{self.min_free_bytes // 2**20} MiB ([spool] min_free_disk_mb)")  # fmt: skip

    def _index_instance(self, info: InstanceInfo, relative: Path, size: int, now: float) -> StoreOutcome:
        with self.transaction() as db:
            if _mark_duplicate(db, info.sop_instance_uid, now):
                return StoreOutcome.DUPLICATE  # a concurrent association stored it first
            job_id = self._open_job(db, info, now)
            db.execute("UPDATE jobs SET n_instances = n_instances + 1, last_instance_at = ? WHERE id = ?",
                       (now, job_id))  # fmt: skip
            db.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                (info.sop_instance_uid, info.series_uid, job_id, info.sop_class_uid, str(relative), size, now),
            )
        return StoreOutcome.STORED

    @staticmethod
    def _open_job(db: sqlite3.Connection, info: InstanceInfo, now: float) -> int:
        """The job a new instance joins: the series' open version, or a new version."""
        latest = db.execute("SELECT id, version, state FROM jobs WHERE series_uid = ? ORDER BY version DESC LIMIT 1",
                            (info.series_uid,)).fetchone()  # fmt: skip
        if latest is not None and latest["state"] in OPEN_STATES:
            db.execute("UPDATE jobs SET state = ?, completed_at = NULL WHERE id = ?", (JobState.RECEIVED, latest["id"]))
            return int(latest["id"])
        version = 1 if latest is None else latest["version"] + 1
        cursor = db.execute(
            "INSERT INTO jobs (series_uid, version, study_uid, calling_ae, state, created_at, last_instance_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (info.series_uid, version, info.study_uid, info.calling_ae, JobState.RECEIVED, now, now),
        )
        return int(cursor.lastrowid or 0)

    # -- series completion ----------------------------------------------------------------

    def complete_stable(self, stable_seconds: float, now: float | None = None) -> list[int]:
        """Mark complete every received series with no new instance for ``stable_seconds``."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, completed_at = ? WHERE state = ? AND last_instance_at <= ? RETURNING id",
                (JobState.COMPLETE, now, JobState.RECEIVED, now - stable_seconds),
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

    def complete_series(self, series_uids: Sequence[str], now: float | None = None) -> list[int]:
        """Mark complete the received version of each series (the association-release fast path)."""
        now = time.time() if now is None else now
        completed = []
        with self.transaction() as db:
            for series_uid in series_uids:
                row = db.execute(
                    "UPDATE jobs SET state = ?, completed_at = ? WHERE series_uid = ? AND state = ? RETURNING id",
                    (JobState.COMPLETE, now, series_uid, JobState.RECEIVED),
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

    def park_processing(self, why: str) -> list[int]:
        """Put jobs interrupted by a shutdown back in the queue; the attempt does not count."""
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), last_error = ? WHERE state = ? "
                "RETURNING id",
                (JobState.COMPLETE, why, JobState.PROCESSING),
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

    def clear_tmp(self) -> int:
        """Remove partial writes left by a crash; returns how many."""
        leftovers = list(self.tmp_dir.iterdir())
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    # -- retention ------------------------------------------------------------------------

    def purge_expired(self, keep_days: float, now: float | None = None) -> Purged:
        """Delete the instance files and results of every expired series (see the module docstring)."""
        cutoff = (time.time() if now is None else now) - keep_days * SECONDS_PER_DAY
        series = instances = folders = freed = 0
        for row in self.query(_EXPIRED_SQL.format(where=""), (cutoff, cutoff, OutboxState.PENDING)):
            with self.transaction() as db:  # again under the write lock: an instance may just have arrived
                if not db.execute(_EXPIRED_SQL.format(where="WHERE j.series_uid = ?"),
                                  (row["series_uid"], cutoff, cutoff, OutboxState.PENDING)).fetchone():  # fmt: skip
                    continue
                paths = [r["path"] for r in db.execute("SELECT path FROM instances WHERE series_uid = ?",
                                                       (row["series_uid"],))]  # fmt: skip
                job_ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE series_uid = ?", (row["series_uid"],))]
                db.execute("DELETE FROM instances WHERE series_uid = ?", (row["series_uid"],))
                db.execute("UPDATE jobs SET outputs = '[]' WHERE series_uid = ?", (row["series_uid"],))
            series += 1
            instances += len(paths)
            freed += sum(_remove(self.root / path) for path in paths)
            for job_id in job_ids:
                folder = self.results_dir / str(job_id)
                if folder.is_dir():
                    freed += sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
                    shutil.rmtree(folder)
                    folders += 1
        return Purged(series, instances, folders, freed)

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

    def next_send_at(self) -> float | None:
        row = self.query("SELECT MIN(next_attempt_at) AS t FROM outbox WHERE state = ?", (OutboxState.PENDING,))[0]
        return None if row["t"] is None else float(row["t"])

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


# Series whose every version ended (a job failed by recover() has no finished_at) and whose last instance
# arrived before the cut-off, with nothing left to
# send and something left to delete. Parameters: cut-off (finished), cut-off (arrived), pending state.
_EXPIRED_SQL = (
    "SELECT j.series_uid FROM jobs j {where} GROUP BY j.series_uid "
    f"HAVING SUM(j.state NOT IN ({', '.join(repr(str(s)) for s in ENDED_STATES)})) = 0 "
    "AND MAX(COALESCE(j.finished_at, j.started_at, j.last_instance_at)) < ? AND MAX(j.last_instance_at) < ? "
    "AND NOT EXISTS (SELECT 1 FROM outbox o JOIN jobs p ON p.id = o.job_id "
    "                WHERE p.series_uid = j.series_uid AND o.state = ?) "
    "AND (EXISTS (SELECT 1 FROM instances i WHERE i.series_uid = j.series_uid) OR MAX(j.outputs != '[]'))"
)


def _mark_duplicate(db: sqlite3.Connection, sop_instance_uid: str, now: float) -> bool:
    """Whether the instance is held; if it is, its series counts as active now (retention waits for it)."""
    cursor = db.execute("UPDATE jobs SET last_instance_at = MAX(last_instance_at, ?) "
                        "WHERE id = (SELECT job_id FROM instances WHERE sop_instance_uid = ?)",
                        (now, sop_instance_uid))  # fmt: skip
    return cursor.rowcount > 0


def _remove(path: Path) -> int:
    """Delete one file; its size, or 0 when it was already gone."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def file_name(uid: str) -> str:
    """A UID as a file or folder name; a non-conformant UID gets a hash so names never collide."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in uid).strip(".")
    if cleaned == uid and cleaned:
        return uid
    return f"{cleaned[:64] or 'uid'}-{hashlib.sha256(uid.encode()).hexdigest()[:12]}"


def _write_error(what: str, error: Exception) -> LiverfatError:
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or (isinstance(error, sqlite3.OperationalError) and "full" in str(error))
    return LiverfatError(Reason.SPOOL_FULL if full else Reason.SPOOL_WRITE_FAILED, f"{what}: {error}")
