"""Retention: deleting the received CT and the results of series that ended long enough ago.

A series expires ``keep_days`` after both its last instance arrived (duplicates count: a sender
still cares) and its last version ended, once none of its results waits to be sent. Its instance files and index rows, and its result folders, are
deleted; its job rows stay, for ``liverfat status`` and the metrics. Two rules make a purge safe
against an association storing into the same series at the same moment: a duplicate is answered
only after its series has been marked active in a transaction, and the purge re-checks expiry in
its own transaction; every reception writes a new file name, so a purge deletes only files that
no index row will point at again.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from liverfat.service.spool import ENDED_STATES, OutboxState, Spool

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Purged:
    """What one retention pass deleted."""

    series: int = 0
    instances: int = 0
    result_folders: int = 0
    bytes_freed: int = 0


def purge_expired(spool: Spool, keep_days: float, now: float | None = None) -> Purged:
    """Delete the instance files and results of every expired series (see the module docstring)."""
    cutoff = (time.time() if now is None else now) - keep_days * SECONDS_PER_DAY
    series = instances = folders = freed = 0
    for row in spool.query(_EXPIRED_SQL.format(where=""), (cutoff, cutoff, OutboxState.PENDING)):
        with spool.transaction() as db:  # again under the write lock: an instance may just have arrived
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
        freed += sum(_remove(spool.root / path) for path in paths)
        for job_id in job_ids:
            folder = spool.results_dir / str(job_id)
            if folder.is_dir():
                freed += sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
                shutil.rmtree(folder)
                folders += 1
    return Purged(series, instances, folders, freed)


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


def _remove(path: Path) -> int:
    """Delete one file; its size, or 0 when it was already gone."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size
