"""Fleet mode end to end, every part real: a ``liverfat serve`` node with ``[queue] broker``, ``liverfat worker``
processes (phantom backend, the only fake), RabbitMQ with the repository's definitions, and Orthanc as the
destination, all in one private network namespace (``tests/orthanc.py``, ``tests/broker.py``).

Series are sent to the node with storescu; its results must reach Orthanc exactly once per series: the
SOP classes of the instances in each series' study are those the node recorded, one of each output.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from liverfat.errors import Reason
from liverfat.service.fleet.dead_letters import DELIVERY_LIMIT_MESSAGE
from liverfat.service.spool import Job, JobState, OutboxState
from tests.broker import DEFINITIONS, RabbitMQ, rabbitmq_server
from tests.orthanc import OrthancServer, orthanc_server
from tests.service.conftest import STORESCU, phantom_series
from tests.service.fleet.worker_process import WorkerProcess
from tests.service.node_process import REPO, NodeProcess, wait_for

pytestmark = pytest.mark.slow

DELIVERY_LIMIT = json.loads(DEFINITIONS.read_text())["policies"][0]["definition"]["delivery-limit"]
DONE_S = 240.0  # a busy 2-core machine running a broker, Orthanc, a node and two Celery workers
_HTTP = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    answer = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
    "except urllib.error.HTTPError as error:\n"
    "    answer = error\n"
    "print(answer.status)\n"
    "sys.stdout.write(answer.read().decode())\n"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancServer, RabbitMQ]]:
    """Orthanc and RabbitMQ in one namespace, shared by the module: each test has its own node (AE title), series
    and workers, and leaves the broker's queues empty."""
    folder = tmp_path_factory.mktemp("site")
    with orthanc_server(folder / "orthanc") as orthanc, rabbitmq_server(folder / "rabbitmq",
                                                                        netns=orthanc.netns) as broker:  # fmt: skip
        yield orthanc, broker


def fleet_node(site: tuple[OrthancServer, RabbitMQ], folder: Path, ae_title: str, port: int) -> NodeProcess:
    """A node (not started) publishing to the site's broker and sending its results to its Orthanc."""
    orthanc, broker = site
    return NodeProcess(folder / "node", {
        "node": {"ae_title": ae_title, "host": "127.0.0.1", "port": port},
        "spool": {"dir": str(folder / "spool"), "min_free_disk_mb": 0, "nearly_full_margin_mb": 0},
        "series": {"stable_seconds": 5.0, "complete_on_release": True},
        "send": {"destinations": [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], "first_delay_s": 0.5,
                 "max_delay_s": 2.0},
        "http": {"host": "127.0.0.1", "port": port + 1000},
        "queue": {"broker": broker.url},
    }, netns=orthanc.netns)  # fmt: skip


def fleet_worker(site: tuple[OrthancServer, RabbitMQ], folder: Path, name: str | None = None) -> WorkerProcess:
    """A ``liverfat worker`` (not started) with one CPU child; ``name``: its ``[worker] name`` (several on this host)."""
    orthanc, broker = site
    named = {} if name is None else {"name": name}
    return WorkerProcess(folder, {"queue": {"broker": broker.url}, "worker": {"devices": "cpu", "count": 1, **named}},
                         netns=orthanc.netns)  # fmt: skip


def send(orthanc: OrthancServer, node: NodeProcess, files: list[Path]) -> None:
    """storescu the series to the node (one association: complete on its release)."""
    completed = orthanc.run(str(STORESCU), "-aet", "MODALITY", "-aec", node.config.node.ae_title, "127.0.0.1",
                            str(node.config.node.port), *(str(f) for f in files), env={"TCP_NODELAY": "1"},
                            check=False)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]


def uids(files: list[Path]) -> tuple[str, str]:
    """The series' (series UID, study UID)."""
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)


def jobs(node: NodeProcess) -> dict[str, Job]:
    """Every job of the node's spool by series UID (each test's series have one version)."""
    found: dict[str, Job] = {}
    for job in node.jobs():
        assert job.series_uid not in found, f"series {job.series_uid} was processed as a second version"
        found[job.series_uid] = job
    return found


def all_in(node: NodeProcess, series: list[list[Path]], state: JobState) -> bool:
    found = jobs(node)
    return all(found.get(uids(files)[0]) is not None and found[uids(files)[0]].state is state for files in series)


def all_sent(node: NodeProcess) -> bool:
    spool = node.spool()
    try:
        rows = spool.query("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
    finally:
        spool.close()
    states = {row["state"]: row["n"] for row in rows}
    return bool(states) and set(states) == {OutboxState.SENT.value}


def sop_classes_in_study(orthanc: OrthancServer, study_uid: str) -> Counter[str]:
    """How many instances of each SOP class Orthanc holds in the study."""
    found: Counter[str] = Counter()
    for study in orthanc.get("/studies?expand"):
        if study["MainDicomTags"]["StudyInstanceUID"] == study_uid:
            for instance in orthanc.get(f"/studies/{study['ID']}/instances"):
                found[orthanc.get(f"/instances/{instance['ID']}/metadata?expand")["SopClassUid"]] += 1
    return found


def check_one_set_of_results_each(orthanc: OrthancServer, node: NodeProcess, series: list[list[Path]]) -> None:
    """Every series done once, its outputs sent, and Orthanc holding exactly those: one SEG, the SRs, one key image."""
    wait_for(lambda: all_in(node, series, JobState.DONE), DONE_S, "every series to be done")
    wait_for(lambda: all_sent(node), 120, "every result to be sent to Orthanc")
    found = jobs(node)
    for files in series:
        series_uid, study_uid = uids(files)
        job = found[series_uid]
        expected = Counter(output.sop_class_uid for output in job.outputs)
        assert len(job.outputs) == 4, "SEG, circle SR, summary SR, key image"
        assert sop_classes_in_study(orthanc, study_uid) == expected, f"one set of results for {series_uid}"
    assert not list(node.config.spool.dir.glob("results/*/.partial-*")), "no staging folder left, even a dead host's"


def node_health(orthanc: OrthancServer, node: NodeProcess) -> tuple[int, dict[str, Any]]:
    """``/healthz``: the HTTP status and the JSON body."""
    answer = orthanc.run(sys.executable, "-c", _HTTP, f"http://127.0.0.1:{node.config.http.port}/healthz")
    code, _, body = answer.stdout.partition("\n")
    return int(code), json.loads(body)


def liverfat_status(orthanc: OrthancServer, node: NodeProcess) -> dict[str, Any]:
    """``liverfat status --json`` next to the running node."""
    answer = orthanc.run(str(REPO / ".venv" / "bin" / "liverfat"), "status", "--json", "--config",
                         str(node.config_path))  # fmt: skip
    report: dict[str, Any] = json.loads(answer.stdout)
    return report


def test_a_worker_killed_in_the_middle_of_a_series_leaves_it_to_the_other(
        site: tuple[OrthancServer, RabbitMQ], tmp_path: Path) -> None:  # fmt: skip
    """Two workers (two ``[worker] name``s on this host) consume from the start; the slow one takes one series (its
    prefetch is one) and is killed with it in hand: the other does every series, that one too."""
    orthanc, broker = site
    node = fleet_node(site, tmp_path, "FLEETKILL", 11201)
    slow, other = fleet_worker(site, tmp_path / "slow", "slow"), fleet_worker(site, tmp_path / "other", "other")
    series = [phantom_series(tmp_path / f"ct{n}") for n in range(3)]
    try:
        node.start(wait_model=False)
        slow.start(delay_s=300.0)  # the series it takes stays in its hands until it is killed
        other.start()
        for files in series:
            send(orthanc, node, files)
        processing = f"processing {len(series[0])} file(s)"
        wait_for(lambda: processing in slow.log_text(), 120, "the slow worker to take a series")
        slow.kill()  # the Celery worker and its child, SIGKILL, as a host that dies: the broker delivers it again
        check_one_set_of_results_each(orthanc, node, series)
        assert slow.log_text().count(processing) == 1 and other.log_text().count(processing) == len(series)
        assert all(job.attempts == 1 for job in jobs(node).values()), "published once each: the broker re-delivered"
        assert node.terminate() == 0
    finally:
        node.close()
        slow.kill()
        other.stop()
    assert broker.password not in node.log() + other.log_text() + slow.log_text()


def test_a_broker_restart_with_series_queued_and_in_flight_loses_none(
        site: tuple[OrthancServer, RabbitMQ], tmp_path: Path) -> None:  # fmt: skip
    orthanc, broker = site
    node = fleet_node(site, tmp_path, "FLEETBOUNCE", 11202)
    worker = fleet_worker(site, tmp_path / "worker")
    series = [phantom_series(tmp_path / f"ct{n}") for n in range(3)]
    try:
        node.start(wait_model=False)
        worker.start(delay_s=5.0)
        for files in series:
            send(orthanc, node, files)
        wait_for(lambda: node.run_log().count("published to the fleet") == len(series), 60, "every series published")
        wait_for(lambda: "processing" in worker.log_text(), 60, "the worker to take the first series")
        broker.stop()  # one series in the worker's hands, two in the queue
        time.sleep(2.0)  # the node and the worker notice
        broker.start()
        check_one_set_of_results_each(orthanc, node, series)
        assert "Connection to broker lost" in worker.log_text()
        log = node.run_log()
        assert "unavailable" in log and log.rindex("reached: complete series are published") > log.index("unavailable")
        assert node.terminate() == 0
    finally:
        node.close()
        worker.stop()
    assert broker.password not in node.log() + worker.log_text()


def test_a_series_that_kills_its_worker_is_dead_lettered_recorded_failed_and_the_fleet_keeps_serving(
        site: tuple[OrthancServer, RabbitMQ], tmp_path: Path) -> None:  # fmt: skip
    orthanc, broker = site
    node = fleet_node(site, tmp_path, "FLEETPOISON", 11203)
    worker = fleet_worker(site, tmp_path / "worker")
    poison, good = phantom_series(tmp_path / "poison"), phantom_series(tmp_path / "good")
    try:
        node.start(wait_model=False)
        worker.start(kill_series=uids(poison)[0])
        send(orthanc, node, poison)
        send(orthanc, node, good)
        wait_for(lambda: all_in(node, [poison], JobState.FAILED), DONE_S, "the poison series to be dead-lettered")
        failed = jobs(node)[uids(poison)[0]]
        assert [reason["code"] for reason in failed.reasons] == [Reason.DEAD_LETTERED.value]
        assert failed.last_error == DELIVERY_LIMIT_MESSAGE and failed.attempts == 1 and not failed.outputs
        assert worker.log_text().count("exited with 'signal 9 (SIGKILL)'") == DELIVERY_LIMIT + 1
        check_one_set_of_results_each(orthanc, node, [good])
        assert not sop_classes_in_study(orthanc, uids(poison)[1]), "nothing sent for the dead series"

        report = liverfat_status(orthanc, node)
        assert [(e["series_uid"], e["last_error"]) for e in report["job_errors"]] == [(uids(poison)[0], DELIVERY_LIMIT_MESSAGE)]
        assert report["queue"]["dead_lettered"] == 1 and report["queue"]["connected"]
        assert any("1 series dead-lettered" in warning for warning in report["health"]["warnings"])
        assert node.terminate() == 0
    finally:
        node.close()
        worker.stop()
    assert broker.password not in node.log() + worker.log_text()


def test_a_node_started_while_the_broker_is_down_receives_and_publishes_once_it_is_back(
        site: tuple[OrthancServer, RabbitMQ], tmp_path: Path) -> None:  # fmt: skip
    orthanc, broker = site
    node = fleet_node(site, tmp_path, "FLEETLATE", 11204)
    worker = fleet_worker(site, tmp_path / "worker")
    files = phantom_series(tmp_path / "ct")
    broker.stop()
    try:
        try:
            node.start(wait_model=False)
            send(orthanc, node, files)  # received and acknowledged while the broker is down
            wait_for(lambda: all_in(node, [files], JobState.COMPLETE), 60, "the series to be complete")
            # complete at the sender's release, possibly before the dispatcher's first try has timed out
            wait_for(lambda: "unavailable" in node.run_log(), 60, "the dispatcher to find the broker down")
            assert jobs(node)[uids(files)[0]].attempts == 0, "kept, not published"
            code, health = node_health(orthanc, node)
            assert code == 503 and any("cannot be reached" in problem for problem in health["problems"])
            assert health["queue"]["connected"] is False and broker.password not in json.dumps(health)
            worker.start(wait_ready=False)  # before the broker too: it connects by itself
        finally:
            broker.start()
        check_one_set_of_results_each(orthanc, node, [files])
        wait_for(lambda: node_health(orthanc, node)[0] == 200, 60, "/healthz to be ok again")
        assert node.terminate() == 0
    finally:
        node.close()
        worker.stop()
    assert broker.password not in node.log() + worker.log_text()
