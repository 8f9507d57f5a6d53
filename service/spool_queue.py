"""Series completion and the job queue: versions of a series, the worker's claims and outcomes, recovery, retry.

A job is one version of a series (see ``spool``); its state moves ``received`` -> ``complete``
-> ``processing`` -> an ended state, each change in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from liverfat.errors import LiverfatError, Reason
from liverfat.service.spool_db import SpoolDatabase
from liverfat.service.spool_outbox import queue_outputs
from liverfat.service.spool_types import ENDED_STATES, OPEN_STATES, InstanceInfo, Job, JobResult, JobState

UNRELEASED_NOTE = ("completed by the stable wait with no association release after its last instance (the sending "
                   "association was aborted, or is still open): the series may be incomplete")


class JobQueue(SpoolDatabase):
    """The spool's jobs: completing series, handing them to the worker and recording how they ended."""

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

    def claim_next(self, worker: str | None = None, now: float | None = None) -> Job | None:
        """Take the oldest complete job for ``worker``: it becomes ``processing`` with one more attempt.

        One transaction (SQLite's write lock): two workers never take the same job.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY completed_at, id LIMIT 1",
                             (JobState.COMPLETE,)).fetchone()  # fmt: skip
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ?, claimed_by = ? "
                       "WHERE id = ?", (JobState.PROCESSING, now, worker, row["id"]))  # fmt: skip
        return self.job(int(row["id"]))

    def job_files(self, job: Job) -> list[Path]:
        """Every instance of the job's series received up to this version, oldest first."""
        rows = self.query("SELECT path FROM instances WHERE series_uid = ? AND job_id <= ? ORDER BY received_at",
                          (job.series_uid, job.id))  # fmt: skip
        return [self.root / row["path"] for row in rows]

    def finish_job(self, job_id: int, result: JobResult, destinations: Sequence[str], now: float | None = None) -> bool:
        """Record the outcome and queue every output for every destination, in one transaction.

        Only a job still ``processing`` is finished; for any other (a fleet completion received
        twice) nothing is recorded or queued and the answer is ``False``.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, processing_s = ?, grade = ?, parenchymal_hu = ?, "
                "borderline = ?, reasons = ?, timings = ?, outputs = ?, last_error = ? WHERE id = ? AND state = ?",
                (result.state, now, result.processing_s, result.grade, result.parenchymal_hu, result.borderline,
                 json.dumps([dict(r) for r in result.reasons]), json.dumps(dict(result.timings or {})),
                 json.dumps([o.to_json() for o in result.outputs]), result.error, job_id, JobState.PROCESSING),
            )  # fmt: skip
            if cursor.rowcount == 0:
                return False
            queue_outputs(db, job_id, result.outputs, destinations, now)
        return True

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

    def recover(self, max_attempts: int, why: str, claimed_by: str | None = None) -> list[Job]:
        """Jobs left ``processing`` by a dead worker: back to the queue, or failed after ``max_attempts``.

        Only those ``claimed_by`` that worker when given (the others' workers are alive), else all.
        """
        where, params = ("", []) if claimed_by is None else (" AND claimed_by = ?", [claimed_by])
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = CASE WHEN attempts >= ? THEN ? ELSE ? END, last_error = ? "
                f"WHERE state = ?{where} RETURNING id",
                (max_attempts, JobState.FAILED, JobState.COMPLETE, why, JobState.PROCESSING, *params),
            ).fetchall()  # fmt: skip
        return [self.job(int(row["id"])) for row in rows]

    def retry_series(self, series_uid: str, now: float | None = None) -> tuple[Job, bool]:
        """Queue a new version of an ended series, processed with every instance held (``liverfat retry``).

        Returns the new job and ``True``, or the newest job and ``False`` when it has not ended
        (it is queued or processed anyway).
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            latest = latest_job(db, series_uid)
            if latest is None:
                raise LiverfatError(Reason.UNKNOWN_SERIES, f"series {series_uid} was never received")
            if latest["state"] not in ENDED_STATES:
                return Job.from_row(latest), False
            if db.execute("SELECT 1 FROM instances WHERE series_uid = ?", (series_uid,)).fetchone() is None:
                raise LiverfatError(Reason.UNKNOWN_SERIES, f"series {series_uid} has no instance left: retention "
                                    "deleted them ([spool] keep_days); send the series again")  # fmt: skip
            note = f"retry of v{latest['version']} ({latest['state']}) by liverfat retry"
            job_id = new_version(db, latest, JobState.COMPLETE, now, note=note)
        return self.job(job_id), True

    # -- reading --------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        return Job.from_row(self.query("SELECT * FROM jobs WHERE id = ?", (job_id,))[0])

    def jobs(self, series_uid: str | None = None, limit: int = 20) -> list[Job]:
        """The most recent jobs, newest first (of one series when given)."""
        where, params = ("WHERE series_uid = ?", [series_uid]) if series_uid else ("", [])
        rows = self.query(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [Job.from_row(row) for row in rows]


def latest_job(db: sqlite3.Connection, series_uid: str) -> sqlite3.Row | None:
    """The series' newest version's row, or ``None`` when it was never received."""
    row: sqlite3.Row | None = db.execute("SELECT * FROM jobs WHERE series_uid = ? ORDER BY version DESC LIMIT 1",
                                         (series_uid,)).fetchone()  # fmt: skip
    return row


def new_version(db: sqlite3.Connection, latest: sqlite3.Row | None, state: JobState, now: float, *,
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
