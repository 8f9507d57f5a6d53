"""The spool's index and job queue: versions, completion, recovery and the outbox, on real SQLite."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from liverfat.errors import LiverfatError, Reason
from liverfat.service.retention import Purged, purge_expired
from liverfat.service.spool import (
    DB_NAME,
    SCHEMA_VERSION,
    UNRELEASED_NOTE,
    InstanceInfo,
    JobResult,
    JobState,
    OutboxState,
    OutputFile,
    Spool,
    StoreOutcome,
    file_name,
)
from liverfat.service.spool_schema import migrate

SERIES = "1.2.3.4"


def info(sop: str, series: str = SERIES) -> InstanceInfo:
    return InstanceInfo(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=series,
                        study_uid="1.2.3", calling_ae="SCU")  # fmt: skip


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_schema_version_is_kept_in_user_version_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    Spool(tmp_path / "s").close()
    with sqlite3.connect(tmp_path / "s" / DB_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LiverfatError, match="schema version") as raised:
        Spool(tmp_path / "s")
    assert raised.value.reason is Reason.SPOOL_IN_USE


def test_a_version_1_index_is_migrated_keeping_its_jobs_and_instances(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    with sqlite3.connect(folder / DB_NAME, isolation_level=None) as db:
        db.execute("BEGIN")
        migrate(db, folder / DB_NAME, target=1)
        db.execute("INSERT INTO jobs (series_uid, version, state, n_instances, created_at, last_instance_at) "
                   "VALUES (?, 1, 'failed', 1, 100.0, 100.0)", (SERIES,))  # fmt: skip
        db.execute("INSERT INTO instances VALUES ('1.1', ?, 1, '1.2.840.10008.5.1.4.1.1.2', 'instances/x.dcm', 5, 100.0)",
                   (SERIES,))  # fmt: skip
        db.execute("COMMIT")
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    spool = Spool(folder)
    assert spool.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 4
    [job] = spool.jobs()
    assert (job.state, job.n_instances, job.note) == (JobState.FAILED, 1, None)
    assert spool.has_instance("1.1", SERIES) and not spool.has_instance("1.1", "9.9")
    assert spool.store_instance(b"same uid, other series", info("1.1", "9.9")) is StoreOutcome.STORED


def test_stored_instance_is_a_file_and_a_row_and_a_duplicate_is_accepted_once(spool: Spool) -> None:
    assert spool.store_instance(b"first", info("1.1"), now=100.0) is StoreOutcome.STORED
    assert spool.store_instance(b"second", info("1.1"), now=101.0) is StoreOutcome.DUPLICATE
    job = spool.jobs()[0]
    assert (job.series_uid, job.version, job.state, job.n_instances) == (SERIES, 1, JobState.RECEIVED, 1)
    files = spool.job_files(job)
    assert [f.read_bytes() for f in files] == [b"first"]
    assert list(spool.tmp_dir.iterdir()) == []


def test_files_no_row_points_at_are_removed_before_receiving_and_indexed_ones_kept(spool: Spool) -> None:
    """A crash between a file's fsync and its row's commit leaves a file that was never acknowledged."""
    spool.store_instance(b"kept", info("1.1"), now=100.0)
    [kept] = spool.job_files(spool.jobs()[0])
    orphan = kept.parent / "1.2.unacknowledged.dcm"
    orphan.write_bytes(b"never answered Success")
    other_series = spool.root / "instances" / "9.9" / "9.9.1.dcm"
    other_series.parent.mkdir()
    other_series.write_bytes(b"never indexed")
    assert spool.remove_unindexed_files() == 2
    assert [path.name for path in (spool.root / "instances").glob("*/*")] == [kept.name]
    assert kept.read_bytes() == b"kept"


def test_rows_whose_file_is_missing_or_partial_are_removed_at_start_and_the_instances_sent_again_stored(
        spool: Spool) -> None:  # fmt: skip
    """A row is committed while its file's fsyncs run: a crash between leaves a row without its whole file."""
    for sop, data in (("1.1", b"whole"), ("1.2", b"partial"), ("1.3", b"lost")):
        spool.store_instance(data, info(sop), now=100.0)
    spool.complete_series([SERIES], now=101.0)
    whole, partial, lost = spool.job_files(spool.jobs()[0])
    os.truncate(partial, 3)
    lost.unlink()
    spool.close()
    reopened = Spool(spool.root)
    assert reopened.remove_partial_instances() == 2
    [job] = reopened.jobs()
    assert (job.state, job.n_instances) == (JobState.RECEIVED, 1)  # receiving again: the sender sends them again
    assert reopened.job_files(job) == [whole] and not partial.exists()
    assert reopened.remove_unindexed_files() == 0
    assert [reopened.store_instance(data, info(sop), now=200.0) for sop, data in (("1.2", b"partial"), ("1.3", b"lost"))
            ] == [StoreOutcome.STORED] * 2  # fmt: skip
    [job] = reopened.jobs()
    assert job.n_instances == 3
    assert sorted(path.read_bytes() for path in reopened.job_files(job)) == [b"lost", b"partial", b"whole"]
    assert reopened.remove_partial_instances() == 0


def test_an_instance_whose_fsync_fails_is_refused_and_its_committed_row_taken_back(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    spool.store_instance(b"a", info("1.1"), now=100.0)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if "1.2." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(LiverfatError, match="Input/output error") as raised:
        spool.store_instance(b"b", info("1.2"), now=101.0)
    assert raised.value.reason is Reason.SPOOL_WRITE_FAILED
    assert not spool.has_instance("1.2", SERIES)
    [job] = spool.jobs()
    assert job.n_instances == 1 and [path.read_bytes() for path in spool.job_files(job)] == [b"a"]
    assert spool.remove_unindexed_files() == 0
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert spool.store_instance(b"b", info("1.2"), now=102.0) is StoreOutcome.STORED


def test_the_same_instance_from_a_second_association_waits_until_the_first_copy_is_on_disk(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Its row is visible before its file's fsync ends: a duplicate must not be answered Success before that."""
    spool.store_instance(b"a", info("1.1"), now=100.0)  # the series' folder exists: the next fsyncs are the file's
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if "1.2." in os.readlink(f"/proc/self/fd/{fd}"):
            assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    outcomes: dict[str, StoreOutcome] = {}

    def store(name: str) -> None:
        outcomes[name] = spool.store_instance(b"b", info("1.2"), now=101.0)

    first = threading.Thread(target=store, args=("first",))
    first.start()
    deadline = time.monotonic() + 10
    while not spool.has_instance("1.2", SERIES) and time.monotonic() < deadline:  # committed, fsync still held
        time.sleep(0.01)
    second = threading.Thread(target=store, args=("second",))
    second.start()
    second.join(0.5)
    assert second.is_alive() and first.is_alive()  # neither answered while the file's fsync is held
    release.set()
    first.join(10)
    second.join(10)
    assert outcomes == {"first": StoreOutcome.STORED, "second": StoreOutcome.DUPLICATE}


def test_new_spool_folders_keep_others_out_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "spool")
    finally:
        os.umask(previous)
    for folder in (spool.root, spool.root / "instances", spool.tmp_dir, spool.results_dir):
        assert folder.stat().st_mode & 0o777 == 0o750, folder


def test_series_completes_after_stable_seconds_without_new_instances(spool: Spool) -> None:
    spool.store_instance(b"a", info("1.1"), now=100.0)
    spool.store_instance(b"b", info("1.2"), now=105.0)
    assert spool.complete_stable(10.0, now=114.9) == []
    assert spool.complete_stable(10.0, now=115.0) == [spool.jobs()[0].id]
    assert spool.jobs()[0].state is JobState.COMPLETE


def test_a_restart_gives_series_still_receiving_a_full_stable_time(spool: Spool) -> None:
    spool.store_instance(b"a", info("1.1"), now=100.0)
    assert spool.restart_clocks(now=500.0) == 1
    assert spool.complete_stable(10.0, now=509.0) == []
    assert spool.complete_stable(10.0, now=510.0) == [spool.jobs()[0].id]


def test_instance_arriving_before_processing_starts_joins_the_same_version(spool: Spool) -> None:
    spool.store_instance(b"a", info("1.1"), now=100.0)
    spool.complete_stable(10.0, now=200.0)
    spool.store_instance(b"b", info("1.2"), now=201.0)
    job = spool.jobs()[0]
    assert (job.version, job.state, job.n_instances) == (1, JobState.RECEIVED, 2)


def test_instance_arriving_after_processing_started_opens_a_new_version_with_all_instances(spool: Spool) -> None:
    spool.store_instance(b"a", info("1.1"), now=100.0)
    spool.complete_stable(10.0, now=200.0)
    first = spool.claim_next(now=201.0)
    assert first is not None and first.state is JobState.PROCESSING
    spool.store_instance(b"b", info("1.2"), now=202.0)
    second, again_first = spool.jobs()
    assert (second.version, second.state) == (2, JobState.RECEIVED)
    assert again_first.state is JobState.PROCESSING
    assert [p.read_bytes() for p in spool.job_files(first)] == [b"a"]
    assert sorted(p.read_bytes() for p in spool.job_files(second)) == [b"a", b"b"]


def test_a_duplicate_of_a_processed_series_opens_no_new_version(spool: Spool) -> None:
    spool.store_instance(b"a", info("1.1"), now=100.0)
    spool.complete_stable(10.0, now=200.0)
    job = spool.claim_next(now=201.0)
    assert job is not None
    spool.finish_job(job.id, JobResult(JobState.DONE), destinations=[])
    assert spool.store_instance(b"a", info("1.1"), now=300.0) is StoreOutcome.DUPLICATE
    assert len(spool.jobs()) == 1


def test_a_sop_instance_uid_reused_in_another_series_is_kept_in_both_with_a_warning(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    spool.store_instance(b"first series", info("1.1", "9.1"), now=100.0)
    with caplog.at_level(logging.WARNING, logger="liverfat.service.spool"):
        assert spool.store_instance(b"second series", info("1.1", "9.2"), now=101.0) is StoreOutcome.STORED
    assert "1.1 of series 9.2 was already received in series 9.1" in caplog.text
    second, first = spool.jobs()
    assert [p.read_bytes() for p in spool.job_files(first)] == [b"first series"]
    assert [p.read_bytes() for p in spool.job_files(second)] == [b"second series"]
    assert spool.store_instance(b"again", info("1.1", "9.2"), now=102.0) is StoreOutcome.DUPLICATE


def failed_series(spool: Spool) -> int:
    """A series of two instances whose only version failed; returns its job id."""
    spool.store_instance(b"a", info("1.1"), now=100.0)
    spool.store_instance(b"b", info("1.2"), now=100.0)
    spool.complete_stable(1.0, now=200.0)
    job = spool.claim_next()
    assert job is not None
    spool.finish_job(job.id, JobResult(JobState.FAILED, error="model not found"), destinations=[], now=250.0)
    return job.id


def test_a_failed_series_sent_again_opens_a_new_version_with_every_instance(spool: Spool) -> None:
    failed_id = failed_series(spool)
    assert spool.store_instance(b"a", info("1.1"), now=300.0) is StoreOutcome.DUPLICATE
    assert spool.store_instance(b"b", info("1.2"), now=301.0) is StoreOutcome.DUPLICATE
    again, failed = spool.jobs()
    assert failed.id == failed_id and failed.state is JobState.FAILED
    assert (again.version, again.state, again.last_instance_at) == (2, JobState.RECEIVED, 301.0)
    assert again.note == "sent again after v1 failed"
    assert spool.complete_stable(1.0, now=302.0) == [again.id]
    assert sorted(p.read_bytes() for p in spool.job_files(spool.job(again.id))) == [b"a", b"b"]


def test_retry_queues_a_new_version_of_an_ended_series_only(spool: Spool) -> None:
    failed_series(spool)
    job, queued = spool.retry_series(SERIES, now=400.0)
    assert queued and (job.version, job.state, job.attempts, job.completed_at) == (2, JobState.COMPLETE, 0, 400.0)
    assert job.note == "retry of v1 (failed) by liverfat retry"
    assert spool.retry_series(SERIES) == (job, False)  # already queued
    claimed = spool.claim_next()
    assert claimed is not None and claimed.id == job.id and len(spool.job_files(claimed)) == 2
    with pytest.raises(LiverfatError, match="never received") as raised:
        spool.retry_series("9.9.9")
    assert raised.value.reason is Reason.UNKNOWN_SERIES


def test_retry_of_a_series_whose_instances_retention_deleted_says_so(spool: Spool) -> None:
    failed_series(spool)
    assert purge_expired(spool, keep_days=1, now=300.0 + 2 * DAY).series == 1
    with pytest.raises(LiverfatError, match="send the series again"):
        spool.retry_series(SERIES)


def test_a_series_completed_without_an_association_release_carries_a_note(spool: Spool) -> None:
    spool.store_instance(b"a", info("1.1", "9.1"), now=100.0)
    spool.store_instance(b"b", info("1.2", "9.2"), now=100.0)
    spool.note_released(["9.2"], now=100.5)
    spool.complete_stable(1.0, now=200.0)
    notes = {job.series_uid: job.note for job in spool.jobs()}
    assert notes == {"9.1": UNRELEASED_NOTE, "9.2": None}


def test_recover_requeues_processing_jobs_until_max_attempts(spool: Spool) -> None:
    spool.store_instance(b"a", info("1.1", "9.1"), now=100.0)
    spool.complete_stable(1.0, now=200.0)
    for attempt in (1, 2):
        assert spool.claim_next() is not None
        [job] = spool.recover(max_attempts=2, why="worker died")
        assert job.attempts == attempt
    assert job.state is JobState.FAILED and job.last_error == "worker died"


def test_each_claim_records_its_worker_and_recovery_takes_back_only_the_dead_workers_job(spool: Spool) -> None:
    for series in ("9.1", "9.2"):
        spool.store_instance(b"a", info("1.1", series), now=100.0)
    spool.complete_stable(1.0, now=200.0)
    first, second = spool.claim_next("worker-0"), spool.claim_next("worker-1")
    assert first is not None and second is not None and spool.claim_next("worker-0") is None
    assert (first.claimed_by, second.claimed_by) == ("worker-0", "worker-1")
    [requeued] = spool.recover(max_attempts=3, why="worker-1 died", claimed_by="worker-1")
    assert (requeued.id, requeued.state) == (second.id, JobState.COMPLETE)
    assert spool.job(first.id).state is JobState.PROCESSING
    again = spool.claim_next("worker-0")
    assert again is not None and (again.id, again.claimed_by, again.attempts) == (second.id, "worker-0", 2)


def test_parked_job_goes_back_to_the_queue_without_counting_the_attempt(spool: Spool) -> None:
    spool.store_instance(b"a", info("1.1"), now=100.0)
    spool.complete_stable(1.0, now=200.0)
    job = spool.claim_next()
    assert job is not None and job.attempts == 1
    assert spool.park_processing("parked at shutdown") == [job.id]
    parked = spool.job(job.id)
    assert (parked.state, parked.attempts, parked.last_error) == (JobState.COMPLETE, 0, "parked at shutdown")


def test_parking_one_job_leaves_the_others_processing(spool: Spool) -> None:
    for series in ("9.1", "9.2"):
        spool.store_instance(b"a", info("1.1", series), now=100.0)
    spool.complete_stable(1.0, now=200.0)
    first, second = spool.claim_next(), spool.claim_next()
    assert first is not None and second is not None
    assert spool.park_processing("disk full", job_id=second.id) == [second.id]
    assert (spool.job(first.id).state, spool.job(second.id).state) == (JobState.PROCESSING, JobState.COMPLETE)


def finished_job_with_outputs(spool: Spool, destinations: list[str]) -> int:
    spool.store_instance(b"a", info("1.1"), now=100.0)
    spool.complete_stable(1.0, now=200.0)
    job = spool.claim_next()
    assert job is not None
    outputs = tuple(OutputFile(f"results/{job.id}/{name}.dcm", "1.2.840.10008.5.1.4.1.1.66.4", f"2.25.{i}",
                               "1.2.840.10008.1.2.1") for i, name in enumerate(("seg", "sr")))  # fmt: skip
    spool.finish_job(job.id, JobResult(JobState.DONE, grade="none-or-mild", outputs=outputs), destinations, now=300.0)
    return job.id


def test_finish_queues_every_output_for_every_destination(spool: Spool) -> None:
    job_id = finished_job_with_outputs(spool, ["A@h:1", "B@h:2"])
    due = spool.due_sends(now=300.0)
    assert sorted((s.destination, s.path.name) for s in due) == [
        ("A@h:1", "seg.dcm"), ("A@h:1", "sr.dcm"), ("B@h:2", "seg.dcm"), ("B@h:2", "sr.dcm")]  # fmt: skip
    assert spool.job(job_id).grade == "none-or-mild"


def test_failed_send_waits_until_its_retry_time_and_gives_up_when_told(spool: Spool) -> None:
    finished_job_with_outputs(spool, ["A@h:1"])
    first, second = spool.due_sends(now=300.0)
    spool.mark_send_failed(first.id, "connection refused", retry_at=310.0)
    spool.mark_send_failed(second.id, "refused for good", retry_at=None)
    assert spool.due_sends(now=309.0) == []
    assert [s.id for s in spool.due_sends(now=310.0)] == [first.id]
    assert spool.query("SELECT state FROM outbox WHERE id = ?", (second.id,))[0]["state"] == OutboxState.FAILED


def test_requeue_sends_the_newest_result_again_and_reaches_new_destinations(spool: Spool) -> None:
    job_id = finished_job_with_outputs(spool, ["A@h:1"])
    for send in spool.due_sends(now=300.0):
        spool.mark_sent(send.id, now=301.0)
    assert spool.due_sends(now=400.0) == []
    job = spool.requeue_series(SERIES, ["A@h:1", "B@h:2"], now=400.0)
    assert job.id == job_id
    assert len(spool.due_sends(now=400.0)) == 4


def test_requeue_of_a_series_without_results_says_why(spool: Spool) -> None:
    with pytest.raises(LiverfatError, match="never received") as raised:
        spool.requeue_series("9.9.9", ["A@h:1"])
    assert raised.value.reason is Reason.UNKNOWN_SERIES


def test_store_refuses_when_free_space_would_drop_below_the_minimum(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)
    with pytest.raises(LiverfatError, match="min_free_disk_mb") as raised:
        spool.store_instance(b"a", info("1.1"))
    assert raised.value.reason is Reason.SPOOL_FULL
    assert spool.jobs() == [] and list((spool.root / "instances").iterdir()) == []


def test_non_conformant_uids_become_distinct_safe_file_names() -> None:
    assert file_name("1.2.3") == "1.2.3"
    names = {file_name(uid) for uid in ("1.2/3", "1.2\\3", "1.2 3", "..")}
    assert len(names) == 4
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in names)


DAY = 86400.0


def ended_series_with_results(spool: Spool, destinations: list[str]) -> int:
    """A series received at t=100, processed and finished at t=300, its results written into results/<job>."""
    job_id = finished_job_with_outputs(spool, destinations)
    folder = spool.results_dir / str(job_id) / SERIES  # as the worker writes them
    folder.mkdir(parents=True)
    for name in ("seg", "sr"):
        (folder / f"{name}.dcm").write_bytes(b"result")
    return job_id


def test_retention_deletes_files_of_series_ended_more_than_keep_days_ago(spool: Spool) -> None:
    job_id = ended_series_with_results(spool, destinations=[])
    [instance_file] = spool.job_files(spool.job(job_id))
    assert purge_expired(spool, keep_days=7, now=300.0 + 7 * DAY - 1) == Purged()
    purged = purge_expired(spool, keep_days=7, now=300.0 + 7 * DAY + 1)
    assert (purged.series, purged.instances, purged.result_folders) == (1, 1, 1)
    assert not instance_file.exists() and not (spool.results_dir / str(job_id)).exists()
    job = spool.job(job_id)
    assert job.state is JobState.DONE and job.grade == "none-or-mild" and job.outputs == ()  # history stays
    assert spool.counts().instances == 1  # a counter: received instances, not instances held
    assert purge_expired(spool, keep_days=7, now=300.0 + 30 * DAY) == Purged()
    with pytest.raises(LiverfatError, match="no result to send"):
        spool.requeue_series(SERIES, ["A@h:1"])


def test_retention_keeps_series_with_results_still_to_send_or_a_version_still_open(spool: Spool) -> None:
    ended_series_with_results(spool, destinations=["A@h:1"])  # both results still pending
    later = 300.0 + 30 * DAY
    assert purge_expired(spool, keep_days=7, now=later) == Purged()
    for send in spool.due_sends(now=later):
        spool.mark_sent(send.id)
    spool.store_instance(b"b", info("1.2"), now=400.0)  # a new version, still receiving
    assert purge_expired(spool, keep_days=7, now=later) == Purged()


def test_a_duplicate_keeps_its_series_from_expiring_and_a_later_copy_is_stored_anew(spool: Spool) -> None:
    """The race a purge must not lose: a sender re-sends an instance of an old series just before the purge."""
    job_id = ended_series_with_results(spool, destinations=[])
    resent_at = 300.0 + 10 * DAY
    assert spool.store_instance(b"a", info("1.1"), now=resent_at) is StoreOutcome.DUPLICATE
    assert purge_expired(spool, keep_days=7, now=resent_at + 1) == Purged()  # "already held" stays true
    assert spool.job_files(spool.job(job_id))[0].read_bytes() == b"a"
    assert purge_expired(spool, keep_days=7, now=resent_at + 7 * DAY + 1).series == 1
    assert spool.store_instance(b"a again", info("1.1"), now=resent_at + 8 * DAY) is StoreOutcome.STORED
    newest = spool.jobs()[0]
    assert newest.version == 2 and [f.read_bytes() for f in spool.job_files(newest)] == [b"a again"]


def test_every_reception_gets_its_own_file_and_a_lost_race_leaves_no_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.store_instance(b"a", info("1.1"), now=100.0)
    [held] = spool.job_files(spool.jobs()[0])
    assert held.name.startswith("1.1.") and held.suffix == ".dcm"
    # a second association that checked before the first one indexed: it writes its copy, then loses
    monkeypatch.setattr(spool, "has_instance", lambda sop_instance_uid, series_uid=None: False)
    assert spool.store_instance(b"a", info("1.1"), now=101.0) is StoreOutcome.DUPLICATE
    assert [p.name for p in held.parent.iterdir()] == [held.name]
    assert spool.jobs()[0].last_instance_at == 101.0
