"""The node's side of the fleet: ``FleetDispatcher`` in this process on a real spool, a real RabbitMQ and a real
``liverfat worker`` subprocess (phantom backend); the status poller's view of both.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from liverfat.service.config import NodeConfig, load_config
from liverfat.service.diskspace import DiskSpace
from liverfat.service.fleet.broker import BrokerClient
from liverfat.service.fleet.dispatch import BROKER_DOWN, CLAIMED_BY, RETRY_S, FleetDispatcher
from liverfat.service.fleet.fleet_status import host_and_device
from liverfat.service.fleet.identity import FleetIdentity
from liverfat.service.fleet.messages import SeriesTask
from liverfat.service.spool import InstanceInfo, Job, JobState, Spool
from tests.broker import USER, RabbitMQ
from tests.service.conftest import phantom_series
from tests.service.fleet.worker_process import WorkerProcess
from tests.service.node_process import toml, wait_for

DONE_S = 120.0


def test_a_workers_host_and_device_come_from_its_identity_or_else_its_name() -> None:
    gpus = FleetIdentity(host="gpu-host-2", devices=("cuda:0", "cuda:1"), pid=7, version="0.1.0", model="default",
                         precision="auto")  # fmt: skip
    assert host_and_device("liverfat@rack4-a", gpus) == ("gpu-host-2", "cuda:0,1")
    assert FleetIdentity.from_json(gpus.to_json()) == gpus
    cpu = FleetIdentity(host="laptop", devices=("cpu", "cpu"), pid=8, version="0.1.0", model="default",
                        precision="fp32")  # fmt: skip
    assert host_and_device("liverfat@laptop-cpu", cpu) == ("laptop", "cpu")
    assert host_and_device("liverfat@gpu7-cuda3", None) == ("gpu7-cuda3", "unknown"), "no identity: the name"


def node_config(tmp_path: Path, broker: RabbitMQ, ae_title: str) -> NodeConfig:
    """A node publishing to ``broker`` as ``ae_title``; one destination (nothing sends here: the outbox is checked)."""
    path = tmp_path / "node.toml"
    path.write_text(toml({"node": {"ae_title": ae_title}, "spool": {"dir": str(tmp_path / "spool"),
                                                                    "min_free_disk_mb": 0},
                          "queue": {"broker": broker.url}, "send": {"destinations": ["PACS@127.0.0.1:11113"]}}))  # fmt: skip
    return load_config(path, environ={})


def store_series(spool: Spool, folder: Path) -> str:
    """A phantom series stored as the listener would, complete at once; its UID."""
    for path in phantom_series(folder):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spool.store_instance(path.read_bytes(), InstanceInfo(ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID,
                                                             ds.StudyInstanceUID, "SCU"))  # fmt: skip
    spool.complete_stable(0.0)
    return str(ds.SeriesInstanceUID)


def disk_space(config: NodeConfig) -> DiskSpace:
    """The spool's disk, its reserve written as a starting node writes it (without it the disk counts as full)."""
    space = DiskSpace(config.spool.dir)
    assert space.restore()
    return space


def newest(spool: Spool, series_uid: str) -> Job:
    return spool.jobs(series_uid, limit=1)[0]


def outbox_rows(spool: Spool, job: Job) -> int:
    return int(spool.query("SELECT COUNT(*) AS n FROM outbox WHERE job_id = ?", (job.id,))[0]["n"])


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool")
    yield spool
    spool.close()


@pytest.fixture
def fleet_worker(tmp_path: Path, broker: RabbitMQ) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(tmp_path / "worker", {"queue": {"broker": broker.url},
                                                 "worker": {"devices": "cpu", "count": 1, "name": "rack4-a"}})  # fmt: skip
    yield worker
    worker.stop()


@pytest.mark.slow  # a real broker and a real Celery worker
def test_series_are_published_their_completions_recorded_once_and_the_fleet_is_shown(
        tmp_path: Path, broker: RabbitMQ, spool: Spool, fleet_worker: WorkerProcess,
        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="liverfat")
    config = node_config(tmp_path, broker, "DISPATCH1")
    left = store_series(spool, tmp_path / "left")
    assert spool.claim_next(CLAIMED_BY) is not None  # in flight when a node stopped: published again at start
    fresh = store_series(spool, tmp_path / "fresh")
    fleet_worker.start()
    dispatcher = FleetDispatcher(config, spool, disk_space(config))
    dispatcher.start()
    try:
        wait_for(lambda: all(newest(spool, uid).state is JobState.DONE for uid in (left, fresh)), DONE_S,
                 "both series to be done by the fleet")  # fmt: skip
        for uid in (left, fresh):
            job = newest(spool, uid)
            assert job.claimed_by == CLAIMED_BY and job.attempts == 1 and job.grade is not None
            assert job.outputs and all((spool.root / output.path).is_file() for output in job.outputs)
            assert outbox_rows(spool, job) == len(job.outputs), "each output queued once for the destination"
        assert dispatcher.results_queued.is_set(), "the node's sender is told at once"
        assert "1 series in flight when the node stopped published again" in caplog.text

        job = newest(spool, fresh)  # the same task again (a node restarted): the worker sends the completion again
        client = BrokerClient(dispatcher.app)
        client.publish_task(SeriesTask.create(kind="node", publisher="DISPATCH1", series_uid=fresh,
                                              version=job.version, files=spool.job_files(job),
                                              out_dir=spool.results_dir / str(job.id), root=spool.root,
                                              reply_to=dispatcher.reply_to, settings=dispatcher.settings,
                                              job_id=job.id))  # fmt: skip
        wait_for(lambda: "received again), ignored" in caplog.text, DONE_S, "the second completion")
        assert newest(spool, fresh) == job and outbox_rows(spool, job) == len(job.outputs), "nothing recorded twice"
        assert fleet_worker.log_text().count("already done by an earlier delivery") == 1

        dispatcher.monitor.poll(client)
        [worker] = dispatcher.workers()
        assert worker.name == "liverfat@rack4-a" and worker.up and worker.last_seen is not None
        assert (worker.host, worker.device, worker.jobs_done) == (socket.gethostname(), "cpu", 3), "its identity"
        queue = dispatcher.queue()
        assert queue is not None and queue.connected and broker.password not in queue.broker
        assert (queue.waiting, queue.in_flight, queue.dead_lettered) == (0, 0, 0)

        fleet_worker.stop()
        dispatcher.monitor.poll(client)
        [gone] = dispatcher.workers()
        assert not gone.up and gone.last_seen == worker.last_seen, "a worker that stopped answering stays listed"
        client.close()
    finally:
        dispatcher.stop()
    assert broker.password not in caplog.text


@pytest.mark.slow  # a real broker and a real Celery worker
def test_a_node_whose_broker_is_down_keeps_its_series_and_publishes_them_when_it_returns(
        tmp_path: Path, broker: RabbitMQ, spool: Spool, fleet_worker: WorkerProcess,
        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    config = node_config(tmp_path, broker, "DISPATCH2")
    uid = store_series(spool, tmp_path / "ct")
    broker.stop()
    dispatcher = FleetDispatcher(config, spool, disk_space(config))
    try:
        dispatcher.start()
        wait_for(lambda: "unavailable" in caplog.text, 30, "the dispatcher to find the broker down")
        dispatcher.wake()  # a series completing while the broker is down: tried again, still nothing claimed
        time.sleep(2 * RETRY_S[0])
        job = newest(spool, uid)
        assert job.state is JobState.COMPLETE and job.attempts == 0, "left in the queue, no attempt counted"
        queue = dispatcher.queue()
        assert queue is not None and not queue.connected and queue.in_flight == 0
        assert caplog.text.count("unavailable") == 1, "an outage is logged once"
    finally:
        broker.start()
    published_and_done_once(dispatcher, spool, uid, fleet_worker)


@pytest.mark.slow  # a real broker and a real Celery worker
def test_a_publish_the_broker_refuses_puts_the_series_back_in_the_queue_without_counting_the_attempt(
        tmp_path: Path, broker: RabbitMQ, spool: Spool, fleet_worker: WorkerProcess) -> None:  # fmt: skip
    config = node_config(tmp_path, broker, "DISPATCH3")
    uid = store_series(spool, tmp_path / "ct")
    broker.ctl("set_permissions", "-p", "/", USER, ".*", "^$", ".*")  # it may declare and read, not publish
    dispatcher = FleetDispatcher(config, spool, disk_space(config))
    try:
        dispatcher.start()
        wait_for(lambda: newest(spool, uid).last_error == BROKER_DOWN, 30, "a publish that failed")
        job = newest(spool, uid)
        assert job.state is JobState.COMPLETE and job.attempts == 0, "back in the queue, the attempt not counted"
        assert not dispatcher.connected
    finally:
        broker.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*")
    published_and_done_once(dispatcher, spool, uid, fleet_worker)


def published_and_done_once(dispatcher: FleetDispatcher, spool: Spool, uid: str, fleet_worker: WorkerProcess) -> None:
    """Once the broker takes it, the series is published, processed by a worker and recorded, on one attempt."""
    fleet_worker.start()
    try:
        wait_for(lambda: newest(spool, uid).state is JobState.DONE, DONE_S, "the series to be published and done")
        assert newest(spool, uid).attempts == 1 and dispatcher.connected
    finally:
        dispatcher.stop()
