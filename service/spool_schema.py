"""The spool index's schema and its migrations; the version is ``PRAGMA user_version``.

A new index runs every migration from version 0, so the schema exists in one place only:
the steps below. Each step runs in the transaction that opens the spool and moves the
index one version up; an index newer than this liverfat is refused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from liverfat.errors import LiverfatError, Reason

V1 = """
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

# v2: an instance is identified by (series, SOP Instance UID): a UID reused in another series (broken
# anonymisers do this) is a second instance, not a duplicate. Jobs get the time their series' last
# association was released (a series completed by the stable wait without one may be partial) and a note.
V2 = """
ALTER TABLE jobs ADD COLUMN released_at REAL;
ALTER TABLE jobs ADD COLUMN note TEXT;
CREATE TABLE instances_v2 (
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (series_uid, sop_instance_uid)
);
INSERT INTO instances_v2 (series_uid, sop_instance_uid, job_id, sop_class_uid, path, size, received_at)
    SELECT series_uid, sop_instance_uid, job_id, sop_class_uid, path, size, received_at FROM instances;
DROP TABLE instances;
ALTER TABLE instances_v2 RENAME TO instances;
CREATE INDEX instances_by_series ON instances (series_uid, job_id);
CREATE INDEX instances_by_sop ON instances (sop_instance_uid);
"""

# v3: whether the graded value was borderline (near the threshold), for the status page.
V3 = """
ALTER TABLE jobs ADD COLUMN borderline INTEGER;
"""

# v4: which worker claimed a job (``[worker] count`` and GPUs run several): a dead worker's job only is re-queued.
V4 = """
ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
"""

MIGRATIONS = (V1, V2, V3, V4)  # MIGRATIONS[n] takes an index from version n to n + 1
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: Path, target: int = SCHEMA_VERSION) -> int:
    """Bring the index up to ``target`` inside the caller's transaction; returns the version found."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise LiverfatError(
            Reason.SPOOL_IN_USE,
            f"spool index {path} has schema version {found}, this liverfat knows up to version {SCHEMA_VERSION} "
            "(PRAGMA user_version); use a newer liverfat or a new spool folder",
        )
    for version in range(found, target):
        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {version + 1}")
    return found
