"""Receiving: writing instances durably into the spool, indexing them, duplicates and free space.

Each instance joins its series' open job, or opens the series' next version (``spool_queue``).
Its file is written and named; then three things run at once, so that one wait for the disk
covers them all: the fsync of the file and the fsync of its folder (on helper threads), and the
commit of its row to the index (in one transaction with the rows of instances that arrive at the
same time from other associations, ``group_commit``). ``store_instance`` returns, and Success is
answered, only once all three are done. The index is what says an instance is held, so a crash
in between is repaired at the next start: a file no row points at is removed
(``remove_unindexed_files``), and so is a row whose file is missing or partial
(``remove_partial_instances``); neither was acknowledged, so the sender sends it again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from liverfat.errors import LiverfatError, Reason
from liverfat.files import SyncingWrite, fsync_folder, write_and_start_sync
from liverfat.service.diskspace import DiskSpace, is_disk_full
from liverfat.service.group_commit import GroupCommit
from liverfat.service.spool_db import DB_NAME, SpoolDatabase
from liverfat.service.spool_queue import latest_job, new_version
from liverfat.service.spool_types import ENDED_STATES, OPEN_STATES, InstanceInfo, JobState, StoreOutcome

log = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]*(?<!\.)")  # kept as it is by file_name
SYNC_THREADS = 8  # a file's and a folder's fsync per association storing at the same moment, up to a PACS's usual 4


class Arrival(NamedTuple):
    """An instance whose file is written and named (its fsyncs running), to be indexed."""

    info: InstanceInfo
    relative: Path  # its file, relative to the spool's root
    size: int
    now: float


class Indexed(NamedTuple):
    """What indexing an arrival found: stored or a duplicate, and another series that holds its UID."""

    outcome: StoreOutcome
    other_series: str | None


class Instances(SpoolDatabase):
    """The spool's receiving side; ``Spool`` sets the free-space limits it checks."""

    min_free_bytes: int  # refuse an instance that would leave less free
    space: DiskSpace | None  # the node's disk-full state: stores are refused while it says full

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._arrivals = GroupCommit(self._index_arrivals)
        self._syncs = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="spool-fsync")
        self._storing = _Storing()

    def close(self) -> None:
        self._syncs.shutdown()
        super().close()

    def remove_partial_instances(self) -> int:
        """Delete the rows and files of instances whose file is missing or partial; returns how many.

        Call before receiving, and before ``remove_unindexed_files``.

        A row is committed while its file's fsyncs run, and Success is answered once all are done:
        a crash in between can leave a row whose file is missing or short, of an instance never
        acknowledged. Its sender sends it again, and without this the duplicate check would accept
        it without storing it. A file counts as whole when its size is the row's ``size``: on ext4
        (the default ``data=ordered``) and XFS the size a crash leaves on disk covers only data
        that reached it; a file system that can record the size before the data (ext4
        ``data=writeback``) could leave a file of the right size with zeros in it.

        Only the rows of jobs not yet ended are checked (received, complete, processing): such a
        row was committed into a job then receiving, and later transactions move that job on
        without waiting for the fsyncs; for it to have ended, an fsync cut off by the crash would
        have had to outlast the series' completion and its whole processing. A job that loses rows
        goes back to receiving, so that the instances sent again join it (its clock restarts with
        the restart's recovery).
        """
        states = [state for state in JobState if state not in ENDED_STATES]
        rows = self.query(f"SELECT i.series_uid, i.sop_instance_uid, i.path, i.size FROM instances AS i "
                          f"JOIN jobs AS j ON j.id = i.job_id WHERE j.state IN ({', '.join('?' * len(states))})",
                          states)  # fmt: skip
        partial = [row for row in rows if _size(self.root / row["path"]) != row["size"]]
        if partial:
            with self.transaction() as db:
                for row in partial:
                    _unindex(db, row["series_uid"], row["sop_instance_uid"], reopen=True)
            for row in partial:
                log.warning("restart: instance %s of series %s was indexed but its file is %s (a crash before its "
                            "Success): removed, to be sent again", row["sop_instance_uid"], row["series_uid"],
                            "partial" if (self.root / row["path"]).exists() else "missing")  # fmt: skip
                (self.root / row["path"]).unlink(missing_ok=True)
        return len(partial)

    def remove_unindexed_files(self) -> int:
        """Delete instance files that no index row points at; returns how many. Call before receiving.

        Such a file is what a crash between its fsync and its row's commit leaves: its C-STORE was
        never answered Success, so the sender sends it again, under a new file name (names are new per
        reception), and nothing else would ever delete it.
        """
        indexed = {row["path"] for row in self.query("SELECT path FROM instances")}
        removed = 0
        for path in (self.root / "instances").glob("*/*"):
            if str(path.relative_to(self.root)) not in indexed:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def has_instance(self, sop_instance_uid: str, series_uid: str | None = None) -> bool:
        """Whether the instance is held (in ``series_uid``, or in any series when not given), as last committed."""
        where, params = ("", [sop_instance_uid]) if series_uid is None else (" AND series_uid = ?",
                                                                             [sop_instance_uid, series_uid])  # fmt: skip
        return bool(self.read_committed(f"SELECT 1 FROM instances WHERE sop_instance_uid = ?{where}", params))

    def store_instance(self, data: bytes, info: InstanceInfo, now: float | None = None) -> StoreOutcome:
        """Write one instance durably and index it; when this returns, the instance is safe.

        An instance is identified by its series and SOP Instance UID: one already held in the
        same series is a duplicate (accepted, not written again; it re-opens a failed series);
        the same SOP Instance UID in another series is stored as that series' own instance.
        Raises ``LiverfatError`` with ``SPOOL_FULL`` while the node's disk-full state holds, when
        free space would fall below the configured minimum or the disk is full,
        ``SPOOL_WRITE_FAILED`` on any other failure. Nothing is indexed (and no file is left)
        when it raises.

        Two stores of one instance (two associations) run one after the other: a row is visible
        to the duplicate check before its file's fsyncs end, and a duplicate must not be answered
        Success for a file that is not yet safe.
        """
        with self._storing.alone((info.series_uid, info.sop_instance_uid)):
            return self._store(data, info, time.time() if now is None else now)

    def _store(self, data: bytes, info: InstanceInfo, now: float) -> StoreOutcome:
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
                self._sync_held(info)
                return StoreOutcome.DUPLICATE
        self._check_free_space(len(data))
        name = f"{file_name(info.sop_instance_uid)}.{secrets.token_hex(4)}.dcm"  # new per reception: see retention
        relative = Path("instances") / file_name(info.series_uid) / name
        target = self.root / relative
        try:
            syncing = write_and_start_sync(target, data, self.tmp_dir, self._syncs)
        except OSError as error:
            raise self._write_error(f"cannot write instance to {target}", error) from error
        try:
            indexed = self._arrivals.submit(Arrival(info, relative, len(data), now))
        except BaseException as error:
            syncing.discard()
            if isinstance(error, sqlite3.Error):
                raise self._write_error(f"cannot index instance in {self.root / DB_NAME}", error) from error
            raise
        if indexed.outcome is StoreOutcome.DUPLICATE:
            syncing.discard()  # another process on the same index stored it first: this copy is not indexed
            self._sync_held(info)
            return indexed.outcome
        self._wait_for_sync(syncing, info)
        if indexed.other_series is not None:
            log.warning("SOP Instance UID %s of series %s was already received in series %s (an anonymiser that "
                        "reuses UIDs?): kept as an instance of each series", info.sop_instance_uid, info.series_uid,
                        indexed.other_series)  # fmt: skip
        return indexed.outcome

    def _sync_held(self, info: InstanceInfo) -> None:
        """Make the held copy's file and name durable before a duplicate is answered Success.

        Its row is committed while its fsyncs run; in this process ``_Storing`` makes a second
        store wait for them, but the first may run in another process on the same spool (another
        receiver, ``service/receivers.py``), or may have died there before they ended. For a file
        already on disk the two fsyncs cost next to nothing.
        """
        rows = self.read_committed("SELECT path FROM instances WHERE series_uid = ? AND sop_instance_uid = ?",
                                   (info.series_uid, info.sop_instance_uid))  # fmt: skip
        if not rows:
            return
        path = self.root / rows[0]["path"]
        try:
            fsync_folder(path)  # a file opened read-only is fsynced as a folder is
            fsync_folder(path.parent)
        except OSError as error:
            raise self._write_error(f"cannot sync the held copy {path}", error) from error

    def _wait_for_sync(self, syncing: SyncingWrite, info: InstanceInfo) -> None:
        """Wait for the file's fsyncs; if one fails, take back its row, committed meanwhile, and raise."""
        try:
            syncing.wait()
        except OSError as error:
            try:
                with self.transaction() as db:
                    _unindex(db, info.series_uid, info.sop_instance_uid, reopen=False)
            except sqlite3.Error as undo_error:  # the row stays, its file gone: the next start removes the row
                log.error("instance %s of series %s: its fsync failed and its row could not be removed (%s); until "
                          "the node restarts it counts as held", info.sop_instance_uid, info.series_uid,
                          undo_error)  # fmt: skip
            raise self._write_error(f"cannot write instance to {syncing.target}", error) from error

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

    def _index_arrivals(self, arrivals: list[Arrival]) -> list[Indexed]:
        """Index the arrivals in one transaction: one commit, one fsync of the index for all."""
        with self.transaction() as db:
            return [_index_arrival(db, arrival) for arrival in arrivals]


class _Storing:
    """The instances being stored now, by (series, SOP Instance UID): a second store of one waits for the first."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._keys: set[tuple[str, str]] = set()

    @contextmanager
    def alone(self, key: tuple[str, str]) -> Iterator[None]:
        with self._changed:
            while key in self._keys:
                self._changed.wait()
            self._keys.add(key)
        try:
            yield
        finally:
            with self._changed:
                self._keys.discard(key)
                self._changed.notify_all()


def _index_arrival(db: sqlite3.Connection, arrival: Arrival) -> Indexed:
    """Index one arrival in the batch's transaction, unless its series already holds it."""
    info, now = arrival.info, arrival.now
    if _mark_held(db, info, now):
        return Indexed(StoreOutcome.DUPLICATE, None)  # another process on the same index stored it first
    job_id = _open_job(db, info, now)
    db.execute("UPDATE jobs SET n_instances = n_instances + 1, last_instance_at = ? WHERE id = ?", (now, job_id))
    db.execute(
        "INSERT INTO instances (series_uid, sop_instance_uid, job_id, sop_class_uid, path, size, received_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (info.series_uid, info.sop_instance_uid, job_id, info.sop_class_uid, str(arrival.relative), arrival.size,
         now),
    )  # fmt: skip
    other = db.execute("SELECT series_uid FROM instances WHERE sop_instance_uid = ? AND series_uid != ? LIMIT 1",
                       (info.sop_instance_uid, info.series_uid)).fetchone()  # fmt: skip
    return Indexed(StoreOutcome.STORED, None if other is None else str(other["series_uid"]))


def _open_job(db: sqlite3.Connection, info: InstanceInfo, now: float) -> int:
    """The job a new instance joins: the series' open version, or a new version."""
    latest = latest_job(db, info.series_uid)
    if latest is not None and latest["state"] in OPEN_STATES:
        db.execute("UPDATE jobs SET state = ?, completed_at = NULL WHERE id = ?", (JobState.RECEIVED, latest["id"]))
        return int(latest["id"])
    return new_version(db, latest, JobState.RECEIVED, now, info=info)


def _unindex(db: sqlite3.Connection, series_uid: str, sop_instance_uid: str, *, reopen: bool) -> None:
    """Remove an instance's row from its job; with ``reopen``, a job complete or processing goes back to receiving."""
    row = db.execute("DELETE FROM instances WHERE series_uid = ? AND sop_instance_uid = ? RETURNING job_id",
                     (series_uid, sop_instance_uid)).fetchone()  # fmt: skip
    if row is None:
        return
    job_id = row["job_id"]
    db.execute("UPDATE jobs SET n_instances = n_instances - 1 WHERE id = ?", (job_id,))
    if reopen:  # a processing job was interrupted, not failed: that attempt does not count (as park_processing)
        db.execute("UPDATE jobs SET state = ?, completed_at = NULL, attempts = CASE WHEN state = ? THEN "
                   "MAX(attempts - 1, 0) ELSE attempts END WHERE id = ? AND state IN (?, ?)",
                   (JobState.RECEIVED, JobState.PROCESSING, job_id, JobState.COMPLETE, JobState.PROCESSING))  # fmt: skip


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _mark_held(db: sqlite3.Connection, info: InstanceInfo, now: float) -> bool:
    """Whether the instance is held in its series; if it is, the series counts as active now.

    Retention waits for an active series; a failed series sent again opens a new version,
    processed with every instance held once it is complete.
    """
    held = db.execute("SELECT 1 FROM instances WHERE series_uid = ? AND sop_instance_uid = ?",
                      (info.series_uid, info.sop_instance_uid)).fetchone()  # fmt: skip
    latest = latest_job(db, info.series_uid)
    if held is None or latest is None:
        return False
    job_id = int(latest["id"])
    if latest["state"] == JobState.FAILED:
        job_id = new_version(db, latest, JobState.RECEIVED, now, info=info,
                             note=f"sent again after v{latest['version']} failed")  # fmt: skip
        log.info("series %s was sent again after v%d failed: v%d opened", info.series_uid, latest["version"],
                 latest["version"] + 1)  # fmt: skip
    db.execute("UPDATE jobs SET last_instance_at = MAX(last_instance_at, ?) WHERE id = ?", (now, job_id))
    return True


def file_name(uid: str) -> str:
    """A UID as a file or folder name; a non-conformant UID gets a hash so names never collide."""
    if _PLAIN_NAME.fullmatch(uid):  # every conformant UID: no per-character work on the receive path
        return uid
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in uid).strip(".")
    if cleaned == uid and cleaned:
        return uid
    return f"{cleaned[:64] or 'uid'}-{hashlib.sha256(uid.encode()).hexdigest()[:12]}"
