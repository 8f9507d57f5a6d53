"""A full spool disk on a real (tmpfs) file system: the reserve, the refused store, a failed commit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from liverfat.errors import LiverfatError, Reason
from liverfat.service.diskspace import RESERVE_BYTES, DiskSpace, is_disk_full
from liverfat.service.health import NodeStatus, assess
from liverfat.service.spool import InstanceInfo, JobState, Spool, StoreOutcome
from tests.service.small_disk import fill, small_disk  # noqa: F401 (a fixture)


def info(sop: str) -> InstanceInfo:
    return InstanceInfo(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid="1.2.3.4",
                        study_uid="1.2.3", calling_ae="SCU")  # fmt: skip


def test_the_reserve_goes_when_the_disk_fills_and_comes_back_only_when_space_returns(small_disk: Path) -> None:
    space = DiskSpace(small_disk)
    assert space.is_full() and space.restore() and not space.is_full()
    assert space.reserve.stat().st_size == RESERVE_BYTES
    filler = fill(small_disk)
    space.check()
    assert space.is_full() and space.free_bytes() >= RESERVE_BYTES  # the reserve's space is the index's now
    assert not space.restore() and space.is_full()
    assert list((small_disk / "tmp").iterdir()) == []  # no partial reserve left behind
    filler.unlink()
    assert space.restore() and not space.is_full()


def test_a_store_that_meets_a_full_disk_is_refused_and_so_is_every_store_until_space_returns(small_disk: Path) -> None:
    space = DiskSpace(small_disk)
    spool = Spool(small_disk, space=space)
    assert space.restore()
    assert spool.store_instance(b"a", info("1.1")) is StoreOutcome.STORED
    filler = fill(small_disk)
    with pytest.raises(LiverfatError, match="KiB free, the instance needs 65 KiB") as raised:
        spool.store_instance(bytes(64 << 10), info("1.2"))
    assert raised.value.reason is Reason.SPOOL_FULL and space.is_full()
    with pytest.raises(LiverfatError, match="full: nothing is stored until space returns"):
        spool.store_instance(b"small enough to fit", info("1.3"))
    filler.unlink()
    assert space.restore()
    assert spool.store_instance(b"c", info("1.3")) is StoreOutcome.STORED
    assert spool.jobs()[0].n_instances == 2


def test_a_commit_that_fails_for_a_full_disk_leaves_the_index_usable(small_disk: Path) -> None:
    spool = Spool(small_disk)
    spool.store_instance(b"a", info("1.1"), now=100.0)
    spool.complete_stable(1.0, now=200.0)
    job = spool.claim_next()
    assert job is not None
    filler = fill(small_disk)
    with pytest.raises(sqlite3.OperationalError) as raised:
        spool.park_processing("disk full", job.id)
    assert is_disk_full(raised.value)
    assert spool.job(job.id).state is JobState.PROCESSING  # rolled back
    filler.unlink()
    assert spool.park_processing("disk full", job.id) == [job.id]  # no transaction left open by the failed commit
    assert spool.job(job.id).state is JobState.COMPLETE


def test_health_reports_a_full_spool_disk_as_a_problem(tmp_path: Path) -> None:
    counts = Spool(tmp_path / "spool").counts()
    full = assess(NodeStatus(counts=counts, spool_free_bytes=4096, min_free_bytes=0, destinations=1, spool_full=True))
    assert not full.ok and full.problems == ("the spool's disk is full (4 KiB free): new instances are answered "
                                             "0xA700 and no series is processed until space returns",)  # fmt: skip
    assert assess(NodeStatus(counts=counts, spool_free_bytes=4096, min_free_bytes=0, destinations=1,
                             spool_full=False)).ok  # fmt: skip
