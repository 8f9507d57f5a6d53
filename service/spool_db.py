"""The spool's folders and its SQLite index: one connection, transactions and queries, the schema at open.

``SpoolDatabase`` is the base of the spool's parts (``spool_instances``, ``spool_queue``,
``spool_outbox``): they share its one connection and its lock. The schema and its migrations
are in ``spool_schema``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from liverfat.service.spool_schema import SCHEMA_VERSION, migrate

log = logging.getLogger(__name__)

DB_NAME = "index.sqlite"
BUSY_TIMEOUT_S = 30.0
# New spool folders: patient images inside, so no access for others whatever the umask (the index and
# SQLite's -wal/-shm files are created by SQLite with the umask's mode; the folder keeps others out).
SPOOL_FOLDER_MODE = 0o750


class SpoolDatabase:
    """The spool folder and one connection to its index; safe to share between the threads of one process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.results_dir = root / "results"
        for folder in (root, root / "instances", self.tmp_dir, self.results_dir):
            folder.mkdir(mode=SPOOL_FOLDER_MODE, parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = _connect(root / DB_NAME)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before Success is answered
            self._db.execute("PRAGMA foreign_keys=ON")
            self._create_schema()
        except BaseException:
            self._db.close()
            raise
        # Reads that must not wait behind a commit's fsync (the receiver's duplicate check): in WAL
        # mode a second connection reads the last committed state while the first one writes.
        self._read_lock = threading.Lock()
        self._reader = _connect(root / DB_NAME)
        self._reader.execute("PRAGMA query_only=ON")

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()

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

    def read_committed(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """``query`` on the read connection: the last committed state, without waiting for a writer."""
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def clear_tmp(self) -> int:
        """Remove partial writes left by a crash; returns how many."""
        leftovers = list(self.tmp_dir.iterdir())
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)


def _connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), rows by name, shared by threads."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db
