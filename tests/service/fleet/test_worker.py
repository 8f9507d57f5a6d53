"""``liverfat worker`` against a real RabbitMQ: a real worker subprocess (phantom backend) takes published tasks."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from liverfat.errors import Reason
from liverfat.service.config import NodeConfig, QueueSection
from liverfat.service.fleet.broker import BrokerClient, celery_app
from liverfat.service.fleet.dead_letters import DELIVERY_LIMIT_MESSAGE, forward_dead_letters
from liverfat.service.fleet.messages import (
    DEAD_QUEUE,
    JOB_RECORD,
    Completion,
    SeriesTask,
    node_reply_queue,
    publisher_settings,
)
from liverfat.service.spool_types import JobState
from tests.broker import DEFINITIONS, RabbitMQ
from tests.service.conftest import phantom_series
from tests.service.fleet.worker_process import WorkerProcess
from tests.service.node_process import wait_for

pytestmark = pytest.mark.slow  # a real broker, a real Celery worker, the real pipeline on phantom series

REPLY_TO = node_reply_queue("FLEETTEST")
DELIVERY_LIMIT = json.loads(DEFINITIONS.read_text())["policies"][0]["definition"]["delivery-limit"]
COMPLETION_S = 120.0


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One phantom series, shared: each task writes to its own results folder."""
    return phantom_series(tmp_path_factory.mktemp("ct"))


@pytest.fixture
def client(broker: RabbitMQ) -> Iterator[BrokerClient]:
    client = BrokerClient(celery_app(QueueSection(broker=broker.url)))
    client.declare(REPLY_TO)
    yield client
    client.close()


def worker(folder: Path, broker: RabbitMQ, name: str | None = None) -> WorkerProcess:
    named = {} if name is None else {"name": name}
    return WorkerProcess(folder, {"queue": {"broker": broker.url}, "worker": {"devices": "cpu", "count": 1, **named},
                                  "log": {"level": "INFO"}})  # fmt: skip


def node_task(root: Path, files: list[Path], job_id: int) -> SeriesTask:
    """A node's task for job ``job_id``, that job's own series version (its own task id)."""
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    return SeriesTask.create(kind="node", publisher="FLEETTEST", series_uid=uid, version=job_id, files=files,
                             out_dir=root / "results" / str(job_id), root=root, reply_to=REPLY_TO,
                             settings=publisher_settings(NodeConfig()), job_id=job_id)  # fmt: skip


def completions(client: BrokerClient, count: int, timeout: float = COMPLETION_S) -> list[Completion]:
    """Wait for completions of ``count`` different tasks in the reply queue, acknowledging each; one per task.

    A task can complete twice (delivered again after a broker restart): as a node does, the
    first is kept and a duplicate ignored (it must report the same result).
    """
    received: dict[str, Completion] = {}

    def take() -> bool:
        for delivery in client.fetch(REPLY_TO):
            completion = delivery.completion
            assert received.setdefault(completion.task_id, completion).result == completion.result
            delivery.ack()
        return len(received) >= count

    wait_for(take, timeout, f"{count} completion(s)", interval=0.2)
    return list(received.values())


def test_a_published_series_is_analysed_once_and_its_completion_arrives(tmp_path: Path, broker: RabbitMQ,
                                                                        client: BrokerClient, series: list[Path]) -> None:  # fmt: skip
    fleet = worker(tmp_path / "worker", broker)
    fleet.start()
    try:
        task = node_task(tmp_path / "spool", series, job_id=7)
        client.publish_task(task)
        [completion] = completions(client, 1)
        assert completion.task_id == task.task_id and completion.job_id == 7 and completion.kind == "node"
        result = completion.result
        assert result.state is JobState.DONE and result.grade is not None and result.parenchymal_hu is not None
        assert result.outputs, "SEG, SR and key image are reported"
        for output in result.outputs:
            assert output.path.startswith("results/7/"), "relative to the publisher's root"
            assert (tmp_path / "spool" / output.path).is_file()
        assert completion.worker is not None and completion.worker.name.startswith("liverfat@")
        assert completion.worker.device == "cpu"
        case = tmp_path / "spool" / "results" / "7" / task.series_uid
        assert (case / JOB_RECORD).is_file() and (case / "result.json").is_file()
        left = sorted(path.name for path in (tmp_path / "spool" / "results" / "7").iterdir())
        assert left == [task.series_uid], "the staging folder (inside out_dir) is gone"

        client.publish_task(task)  # the same task id again: a node that restarted re-publishes what it waits for
        [again] = completions(client, 1)
        assert again.result == result, "the finished result is reported again, not recomputed"
        assert fleet.log_text().count(f"processing {len(series)} file(s)") == 1
        assert "already done by an earlier delivery" in fleet.log_text()
    finally:
        fleet.stop()
    assert broker.password not in fleet.log_text()


def test_a_worker_started_before_the_broker_connects_when_it_comes_up(tmp_path: Path, broker: RabbitMQ,
                                                                       series: list[Path]) -> None:  # fmt: skip
    broker.stop()
    fleet = worker(tmp_path / "worker", broker)
    try:
        fleet.start(wait_ready=False)
        wait_for(lambda: "Cannot connect" in fleet.log_text(), 60, "the worker to try the broker")
        broker.start()
        client = BrokerClient(celery_app(QueueSection(broker=broker.url)))
        client.declare(REPLY_TO)
        client.publish_task(node_task(tmp_path / "spool", series, job_id=11))
        [completion] = completions(client, 1)
        assert completion.job_id == 11 and completion.result.state is JobState.DONE
        client.close()
    finally:
        fleet.stop()
    assert broker.password not in fleet.log_text()


def test_a_broker_restart_with_tasks_queued_and_in_flight_loses_none(tmp_path: Path, broker: RabbitMQ,
                                                                       client: BrokerClient, series: list[Path]) -> None:  # fmt: skip
    fleet = worker(tmp_path / "worker", broker)
    fleet.start(delay_s=2.0)
    try:
        tasks = [node_task(tmp_path / "spool", series, job_id=job_id) for job_id in (21, 22, 23)]
        for task in tasks:
            client.publish_task(task)
        wait_for(lambda: "processing" in fleet.log_text(), 60, "the first series to start")
        broker.stop()  # one series in the worker's hands, two waiting in the queue
        client.close()
        broker.start()
        done = completions(client, 3)
        assert sorted(c.job_id or 0 for c in done) == [21, 22, 23]
        assert all(c.result.state is JobState.DONE for c in done)
        assert fleet.log_text().count("Connection to broker lost") >= 1
    finally:
        fleet.stop()
    assert broker.password not in fleet.log_text()


def test_a_series_that_kills_its_worker_is_dead_lettered_and_the_worker_keeps_serving(
        tmp_path: Path, broker: RabbitMQ, client: BrokerClient, series: list[Path]) -> None:  # fmt: skip
    poison = phantom_series(tmp_path / "poison")
    poisoned = node_task(tmp_path / "spool", poison, job_id=31)
    fleet = worker(tmp_path / "worker", broker)
    fleet.start(kill_series=poisoned.series_uid)
    try:
        client.publish_task(poisoned)
        wait_for(lambda: client.depth(DEAD_QUEUE).ready == 1, COMPLETION_S, "the poison series to be dead-lettered")
        assert fleet.log_text().count(f"processing {len(poison)} file(s)") == 0, "killed before it began"
        assert fleet.log_text().count("exited with 'signal 9 (SIGKILL)'") == DELIVERY_LIMIT + 1
        [forwarded] = forward_dead_letters(client)
        assert client.depth(DEAD_QUEUE).ready == 0
        [completion] = completions(client, 1)
        assert completion == forwarded and completion.job_id == 31 and completion.worker is None
        assert completion.result.state is JobState.FAILED
        [finding] = completion.result.reasons
        assert finding["code"] == Reason.DEAD_LETTERED.value
        assert finding["message"] == completion.result.error == DELIVERY_LIMIT_MESSAGE
        assert not (tmp_path / "spool" / "results" / "31").exists(), "no result folder for the dead series"

        client.publish_task(node_task(tmp_path / "spool", series, job_id=32))
        [served] = completions(client, 1)
        assert served.job_id == 32 and served.result.state is JobState.DONE
    finally:
        fleet.stop()


def assert_exited_because_the_name_is_taken(fleet: WorkerProcess, name: str) -> None:
    """Exit status 2 and one line saying why, no traceback."""
    assert fleet.process is not None and fleet.process.wait(timeout=90) == 2
    text = fleet.log_text()
    [line] = [line for line in text.splitlines() if "already connected" in line]
    assert line.endswith(f"a liverfat worker named liverfat@{name} is already connected to the broker; give this one "
                         "another [worker] name (LIVERFAT_WORKER_NAME)")  # fmt: skip
    assert "Traceback" not in text and "ResourceLocked" not in text


def test_a_second_worker_of_the_same_name_exits_saying_so_and_the_first_keeps_serving(
        tmp_path: Path, broker: RabbitMQ, client: BrokerClient, series: list[Path]) -> None:  # fmt: skip
    first, second = worker(tmp_path / "first", broker, "twin"), worker(tmp_path / "second", broker, "twin")
    first.start()
    try:
        second.start(wait_ready=False)
        assert_exited_because_the_name_is_taken(second, "twin")
        assert "model loaded" not in second.log_text(), "it stopped before it took anything"
        client.publish_task(node_task(tmp_path / "spool", series, job_id=41))
        [completion] = completions(client, 1)
        assert completion.result.state is JobState.DONE and completion.worker is not None
        assert completion.worker.name == "liverfat@twin" and completion.worker.pid in child_pids(first)
    finally:
        second.kill()
        first.stop()


def child_pids(fleet: WorkerProcess) -> set[int]:
    assert fleet.process is not None
    found = subprocess.run(["ps", "-o", "pid=", "--ppid", str(fleet.process.pid)], check=True,
                           capture_output=True, text=True)  # fmt: skip
    return {int(pid) for pid in found.stdout.split()}


def test_a_worker_that_loses_the_race_for_its_name_exits_saying_so(tmp_path: Path, broker: RabbitMQ) -> None:
    """Another connection holds the name's remote-control queue but does not answer the ping (it connected after it)."""
    app = celery_app(QueueSection(broker=broker.url))
    with app.connection_for_write() as connection:
        app.control.mailbox.get_queue("liverfat@racer")(connection.default_channel).declare()
        racer = worker(tmp_path / "racer", broker, "racer")
        try:
            racer.start(wait_ready=False)
            assert_exited_because_the_name_is_taken(racer, "racer")
        finally:
            racer.kill()
