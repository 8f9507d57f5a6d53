"""Receiving: writing instances durably into the spool, indexing them, duplicates and free space.

Each instance joins its series' open job, or opens the series' next version (``spool_queue``).
Its file is written, named, and fsynced together with its folder (the folder's fsync on a
helper thread, so that both wait for the disk once); only then is its row committed to the
index, in one transaction with the rows of instances that arrive at the same time from other
associations (``group_commit``), and only then does ``store_instance`` return. The index is
what says an instance is held: a crash before the commit can leave a file that no row points at,
never a row without its whole file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from liverfat.errors import LiverfatError, Reason
from liverfat.files import write_and_sync_at_once
from liverfat.service.diskspace import DiskSpace, is_disk_full
from liverfat.service.group_commit import GroupCommit
from liverfat.service.spool_db import DB_NAME, SpoolDatabase
from liverfat.service.spool_queue import latest_job, new_version
from liverfat.service.spool_types import OPEN_STATES, InstanceInfo, JobState, StoreOutcome

log = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]*(?<!\.)")  # kept as it is by file_name
FOLDER_SYNC_THREADS = 4  # one per association storing at the same moment, up to a PACS's usual few


class Arrival(NamedTuple):
    """An instance whose file and folder are fsynced, to be indexed."""

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
        self._folder_syncs = ThreadPoolExecutor(max_workers=FOLDER_SYNC_THREADS, thread_name_prefix="spool-fsync")

    def close(self) -> None:
        self._folder_syncs.shutdown()
        super().close()

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
            write_and_sync_at_once(target, data, self.tmp_dir, self._folder_syncs)
        except OSError as error:
            raise self._write_error(f"cannot write instance to {target}", error) from error
        try:
            indexed = self._arrivals.submit(Arrival(info, relative, len(data), now))
        except sqlite3.Error as error:
            target.unlink(missing_ok=True)
            raise self._write_error(f"cannot index instance in {self.root / DB_NAME}", error) from error
        if indexed.outcome is StoreOutcome.DUPLICATE:
            target.unlink(missing_ok=True)  # a concurrent association stored it first: this copy is not indexed
        elif indexed.other_series is not None:
            log.warning("SOP Instance UID %s of series %s was already received in series %s (an anonymiser that "
                        "reuses UIDs?): kept as an instance of each series", info.sop_instance_uid, info.series_uid,
                        indexed.other_series)  # fmt: skip
        return indexed.outcome

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


def _index_arrival(db: sqlite3.Connection, arrival: Arrival) -> Indexed:
    """Index one arrival in the batch's transaction, unless its series already holds it."""
    info, now = arrival.info, arrival.now
    if _mark_held(db, info, now):
        return Indexed(StoreOutcome.DUPLICATE, None)  # a concurrent association stored it first
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
