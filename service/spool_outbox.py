"""The outbox: results waiting to be sent, one row per file and destination, attempts and failures.

Rows are queued with a job's outcome (``spool_queue``) or again by ``liverfat resend``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from liverfat.service.spool_db import SpoolDatabase
from liverfat.service.spool_types import DestinationBacklog, OutboxState, OutputFile, Send


class Outbox(SpoolDatabase):
    """The spool's sending side: what is due, what was sent, what failed."""

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


def queue_outputs(db: sqlite3.Connection, job_id: int, outputs: Sequence[OutputFile], destinations: Sequence[str],
                  now: float) -> None:  # fmt: skip
    """Queue every output for every destination (again: a row already there starts over), in ``db``'s transaction."""
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
