"""The whole node as a subprocess: receive, process, send; restarts, SIGKILL, SIGTERM, status, resend.

The destination is a real pynetdicom storage SCP (``Receiver``); the senders are dcmtk's
storescu and pynetdicom SCUs; the only fake is the phantom segmentation backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage
from pynetdicom import AE, build_context

from liverfat.errors import LiverfatError, Reason
from liverfat.service import cli
from liverfat.service.node import Node
from liverfat.service.scp import StoreStatus
from liverfat.service.spool import ENDED_STATES, UNRELEASED_NOTE, JobState, OutboxState
from tests.service.conftest import ECHOSCU, PHANTOM_LIVER_HU, dcmtk, free_port, phantom_series, small_series, storescu
from tests.service.node_process import NodeProcess, sending_node, wait_for
from tests.service.small_disk import fill, small_disk  # noqa: F401 (a fixture)
from tests.service.test_sender import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("require_dcmtk")]

RESULT_FILES = 4  # SEG, circle SR, summary SR, key image
PATIENT = ("PHANTOM^LIVER", "PHANTOM-001")  # tests/phantom.py SeriesHeader defaults


class SlowReceiver(Receiver):
    """A destination that takes ``seconds`` per C-STORE, so the node can be killed while sending."""

    seconds: float = 0.0

    def _store(self, event: Any) -> int:
        time.sleep(self.seconds)
        return super()._store(event)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = SlowReceiver(free_port()).start()
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def _no_node_left_behind() -> Iterator[None]:
    """A failing test must not leave its node running."""
    yield
    for node in STARTED:
        node.close()
    STARTED.clear()


STARTED: list[NodeProcess] = []


def make_node(tmp_path: Path, receiver: Receiver, **extra: dict[str, Any]) -> NodeProcess:
    node = sending_node(tmp_path, receiver.port, **extra)
    STARTED.append(node)
    return node


def send_series(node: NodeProcess, folder: Path) -> None:
    result = storescu(node.config.node.port, folder, "+sd", "+r")
    assert result.returncode == 0, result.stderr


def unique_results(receiver: Receiver) -> int:
    return len(set(receiver.stored))


def only_job(node: NodeProcess) -> Any:
    [job] = node.jobs()
    return job


def run_cli(*argv: str) -> None:
    assert cli.main(list(argv)) == 0


def health(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    """``/healthz``: the HTTP status and the JSON body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.config.http.port}/healthz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def store_status(node: NodeProcess, path: Path) -> int:
    """The status of one C-STORE of ``path`` in an association of its own."""
    assoc = AE(ae_title="TESTSCU").associate("127.0.0.1", node.config.node.port, ae_title="LIVERFAT",
                                             contexts=[build_context(CTImageStorage)])  # fmt: skip
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_series_is_received_processed_and_its_results_sent_back(
    tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    node = make_node(tmp_path, receiver)
    node.start()
    try:
        phantom_series(tmp_path / "ct")
        send_series(node, tmp_path / "ct")
        wait_for(lambda: unique_results(receiver) == RESULT_FILES, 90, "SEG, SR and key image at the destination")
        job = only_job(node)
        assert job.state is JobState.DONE and job.grade == "moderate-to-severe"
        assert job.parenchymal_hu == pytest.approx(PHANTOM_LIVER_HU, abs=3.0)
        http = f"http://127.0.0.1:{node.config.http.port}"
        with urllib.request.urlopen(f"{http}/healthz", timeout=5) as response:
            assert json.load(response)["status"] == "ok"
        with urllib.request.urlopen(f"{http}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        found = {(m.name, tuple(m.labels.items())): m.value for f in text_string_to_metric_families(metrics)
                 for m in f.samples}  # fmt: skip
        assert found[("liverfat_instances_received_total", ())] == 57
        assert found[("liverfat_series", (("state", "done"),))] == 1
        assert found[("liverfat_series_by_grade", (("grade", "moderate-to-severe"),))] == 1
        with pytest.raises(LiverfatError) as second:
            Node(node.config).start()
        assert second.value.reason is Reason.SPOOL_IN_USE

        run_cli("status", "--config", str(node.config_path))
        shown = capsys.readouterr().out
        assert "running" in shown and "moderate-to-severe" in shown and f"{job.series_uid} v1  done" in shown
        run_cli("resend", job.series_uid, "--config", str(node.config_path))
        wait_for(lambda: len(receiver.stored) == 2 * RESULT_FILES, 30, "the results sent again")
        assert unique_results(receiver) == RESULT_FILES, "a resend carries the same instances"
    finally:
        assert node.terminate() == 0
    text = node.log()
    assert "liverfat.service.worker" in text and "model loaded" in text
    assert not any(secret in text for secret in PATIENT), "no patient name or ID in the INFO log"


def test_sigkill_while_receiving_loses_no_acknowledged_instance(tmp_path: Path, receiver: Receiver) -> None:
    node = make_node(tmp_path, receiver, series={"stable_seconds": 8.0})
    files = phantom_series(tmp_path / "ct")
    node.start(wait_model=False)
    acknowledged: list[str] = []
    assoc = AE(ae_title="TESTSCU").associate("127.0.0.1", node.config.node.port, ae_title="LIVERFAT",
                                             contexts=[build_context(CTImageStorage)])  # fmt: skip
    assert assoc.is_established
    for index, path in enumerate(files):
        if index == len(files) // 2:
            node.kill()  # in the middle of the association
        if not assoc.is_established:
            break
        status = assoc.send_c_store(path)
        if status and status.Status == 0x0000:
            acknowledged.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert 0 < len(acknowledged) < len(files)
    node.start()
    spool = node.spool()
    try:
        for sop_uid in acknowledged:
            assert spool.has_instance(sop_uid), f"acknowledged instance {sop_uid} was lost"
        [job] = spool.jobs()
        assert {pydicom.dcmread(p).SOPInstanceUID for p in spool.job_files(job)} == set(acknowledged)
    finally:
        spool.close()
    send_series(node, tmp_path / "ct")  # the sender tries again with the whole series
    wait_for(lambda: unique_results(receiver) == RESULT_FILES, 90, "results after the restart")
    time.sleep(2.0)
    job = only_job(node)
    assert (job.version, job.n_instances, job.state) == (1, len(files), JobState.DONE)
    assert node.terminate() == 0


def test_sigkill_while_sending_delivers_everything_after_restart(tmp_path: Path, receiver: Receiver) -> None:
    assert isinstance(receiver, SlowReceiver)
    receiver.seconds = 1.5
    node = make_node(tmp_path, receiver)
    node.start()
    send_series(node, phantom_series(tmp_path / "ct")[0].parent)
    wait_for(lambda: len(receiver.stored) >= 1, 90, "the first result at the destination")
    node.kill()
    assert unique_results(receiver) < RESULT_FILES
    receiver.seconds = 0.0
    node.start()
    wait_for(lambda: unique_results(receiver) == RESULT_FILES, 60, "every result after the restart")
    spool = node.spool()
    try:
        assert {row["state"] for row in spool.query("SELECT state FROM outbox")} == {OutboxState.SENT}
    finally:
        spool.close()
    assert node.terminate() == 0


def test_sigterm_parks_the_series_in_hand_and_a_restart_processes_it(tmp_path: Path, receiver: Receiver) -> None:
    node = make_node(tmp_path, receiver, worker={"shutdown_grace_s": 1.0})
    node.start(delay_s=60.0)
    send_series(node, phantom_series(tmp_path / "ct")[0].parent)
    wait_for(lambda: node.state() is JobState.PROCESSING, 60, "processing to start")
    started = time.monotonic()
    assert node.terminate(timeout=30) == 0
    assert time.monotonic() - started < 20
    parked = only_job(node)
    assert (parked.state, parked.attempts) == (JobState.COMPLETE, 0)
    assert "parked" in str(parked.last_error)
    node.start()
    wait_for(lambda: unique_results(receiver) == RESULT_FILES, 90, "results after the restart")
    assert only_job(node).state is JobState.DONE
    assert node.terminate() == 0


def test_a_worker_that_dies_is_restarted_and_its_series_processed(tmp_path: Path, receiver: Receiver) -> None:
    node = make_node(tmp_path, receiver)
    node.start(delay_s=4.0)
    send_series(node, phantom_series(tmp_path / "ct")[0].parent)
    wait_for(lambda: node.state() is JobState.PROCESSING, 60, "processing to start")
    first_worker = node.worker_pid
    os.kill(first_worker, signal.SIGKILL)
    wait_for(lambda: unique_results(receiver) == RESULT_FILES, 120, "results from the restarted worker")
    assert node.worker_pid != first_worker
    assert "worker process %d died" % first_worker in node.run_log()
    assert only_job(node).attempts == 2
    assert node.terminate() == 0


def test_serve_on_embedded_defaults_starts_and_says_loudly_that_nothing_is_sent(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "defaults.log"
    env = {**os.environ, "LIVERFAT_NODE_PORT": str(port), "LIVERFAT_HTTP_PORT": "0",
           "LIVERFAT_WORKER_SHUTDOWN_GRACE_S": "5"}  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "liverfat.service.cli", "serve"], cwd=tmp_path, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: "ready:" in log.read_text() and "model loaded" in log.read_text(), 90,
                 "the node on embedded defaults")  # fmt: skip
        echo = dcmtk(ECHOSCU, "-aet", "ANYONE", "-aec", "LIVERFAT", "127.0.0.1", port)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # as a shell or `timeout` stops it: the worker gets SIGTERM too
        try:
            code = process.wait(60)
        finally:
            process.kill()
    assert echo.returncode == 0, echo.stderr
    assert code == 0
    text = log.read_text()
    assert "NO DESTINATION CONFIGURED" in text and "embedded defaults" in text
    assert "died" not in text and "worker stopped" in text  # a worker stopped with the node is no death
    assert (tmp_path / "liverfat-spool" / "index.sqlite").is_file()


def test_retention_deletes_the_series_files_once_its_results_are_sent(tmp_path: Path, receiver: Receiver) -> None:
    """keep_days of about a second; a retention pass runs at every start, then every 10 minutes."""
    node = make_node(tmp_path, receiver, spool={"keep_days": 1e-5})
    node.start()
    try:
        phantom_series(tmp_path / "ct")
        send_series(node, tmp_path / "ct")
        wait_for(lambda: unique_results(receiver) == RESULT_FILES, 90, "SEG, SR and key image at the destination")
    finally:
        assert node.terminate() == 0
    spool_dir = Path(node.config.spool.dir)
    assert list((spool_dir / "instances").rglob("*.dcm")) and list((spool_dir / "results").iterdir())
    time.sleep(1.0)
    node.start()
    try:
        wait_for(lambda: "retention: deleted 1 series" in node.run_log(), 30, "the retention pass")
        assert list((spool_dir / "instances").rglob("*.dcm")) == [] and list((spool_dir / "results").iterdir()) == []
        assert only_job(node).state is JobState.DONE  # the history stays
    finally:
        assert node.terminate() == 0


def test_a_full_disk_parks_the_series_and_the_node_serves_until_space_returns(
    tmp_path: Path, receiver: Receiver, small_disk: Path
) -> None:
    """Issue 17 item 1: the spool on an 8 MiB tmpfs, filled while the series is processed, then freed."""
    node = make_node(tmp_path, receiver, spool={"dir": str(small_disk / "spool")})
    node.start(delay_s=5.0)
    send_series(node, phantom_series(tmp_path / "ct")[0].parent)
    wait_for(lambda: node.state() is JobState.PROCESSING, 60, "processing to start")
    filler = fill(small_disk)
    [other] = small_series(tmp_path / "other", slices=1)
    assert store_status(node, other) == StoreStatus.OUT_OF_RESOURCES
    wait_for(lambda: node.state() is JobState.COMPLETE, 60, "the series parked")
    parked = only_job(node)
    assert parked.attempts == 0 and "disk is full" in str(parked.last_error)
    code, body = health(node)
    assert code == 503 and any("disk is full" in problem for problem in body["problems"]), body
    time.sleep(2 * 2.0)  # two probes of the disk: still full, the node still serves
    assert node.process is not None and node.process.poll() is None
    assert "died" not in node.run_log() and only_job(node).state is JobState.COMPLETE
    assert node.terminate() == 0  # its index's log file goes: fill that space too, but for room to open the index
    fill(small_disk, leave=128 << 10)
    node.start(delay_s=5.0)  # on the still-full disk
    assert store_status(node, other) == StoreStatus.OUT_OF_RESOURCES
    assert health(node)[0] == 503
    filler.unlink()
    wait_for(lambda: unique_results(receiver) == RESULT_FILES, 120, "results once space returned")
    done = only_job(node)
    assert (done.state, done.attempts) == (JobState.DONE, 1)
    assert store_status(node, other) == StoreStatus.SUCCESS
    assert health(node)[0] == 200
    assert node.terminate() == 0
    assert "space returned" in node.run_log()


def test_a_node_started_on_a_disk_without_a_free_byte_waits_for_space_instead_of_exiting(
    tmp_path: Path, receiver: Receiver, small_disk: Path
) -> None:
    """Filled completely while the node was in its disk-full state: its index cannot even be opened."""
    node = make_node(tmp_path, receiver, spool={"dir": str(small_disk / "spool")})
    node.start(wait_model=False)
    filler = fill(small_disk)
    wait_for(lambda: health(node)[0] == 503, 30, "the disk-full state")  # the reserve is released
    assert node.terminate() == 0
    fill(small_disk)
    threading.Timer(8.0, filler.unlink).start()
    node.start()  # ready only once the filler is gone
    assert "cannot open the spool's index" in node.run_log() and "disk is full" in node.run_log()
    send_series(node, phantom_series(tmp_path / "ct")[0].parent)
    wait_for(lambda: unique_results(receiver) == RESULT_FILES, 90, "results")
    assert health(node)[0] == 200
    assert node.terminate() == 0


def test_a_failed_series_is_processed_again_by_retry_or_by_sending_it_again(tmp_path: Path, receiver: Receiver) -> None:
    """Issue 17 item 2: a model that cannot be loaded fails both series; fixed, one is retried, one re-sent."""
    node = make_node(tmp_path, receiver, model={"name": str(tmp_path / "no-such-model")})
    node.start(real_model=True, wait_model=False)
    retried, resent = tmp_path / "retried", tmp_path / "resent"
    for folder in (retried, resent):
        phantom_series(folder)
        send_series(node, folder)
    wait_for(lambda: [job.state for job in node.jobs()] == [JobState.FAILED] * 2, 90, "both series failed")
    assert node.terminate() == 0
    series = {folder: pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID
              for folder in (retried, resent)}  # fmt: skip
    node.start()  # the model is fixed
    run_cli("retry", series[retried], "--config", str(node.config_path))
    send_series(node, resent)
    wait_for(lambda: unique_results(receiver) == 2 * RESULT_FILES, 120, "results of both series")
    newest = {job.series_uid: job for job in node.jobs() if job.version == 2}
    assert {uid: job.state for uid, job in newest.items()} == {uid: JobState.DONE for uid in series.values()}
    assert newest[series[retried]].note == "retry of v1 (failed) by liverfat retry"
    assert newest[series[resent]].note == "sent again after v1 failed"
    assert node.terminate() == 0


def test_a_node_stopped_as_a_whole_does_not_count_an_attempt_against_its_series(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Issue 17 item 2: killed with the series in hand as often as max_attempts; it is still processed."""
    node = make_node(tmp_path, receiver, worker={"max_attempts": 2})
    node.start(delay_s=60.0)
    send_series(node, phantom_series(tmp_path / "ct")[0].parent)
    for _ in range(2):
        wait_for(lambda: node.state() is JobState.PROCESSING, 60, "processing to start")
        node.kill()
        node.start(delay_s=60.0, wait_model=False)
    wait_for(lambda: node.state() is JobState.PROCESSING, 60, "processing after the last restart")
    assert "not counted as an attempt" in node.run_log()
    node.kill()
    node.start()
    wait_for(lambda: unique_results(receiver) == RESULT_FILES, 90, "results after the restarts")
    job = only_job(node)
    assert (job.state, job.attempts) == (JobState.DONE, 1)
    assert node.terminate() == 0


def test_a_series_from_an_aborted_association_is_processed_with_a_note(tmp_path: Path, receiver: Receiver) -> None:
    node = make_node(tmp_path, receiver)
    files = phantom_series(tmp_path / "ct")
    node.start()
    assoc = AE(ae_title="TESTSCU").associate("127.0.0.1", node.config.node.port, ae_title="LIVERFAT",
                                             contexts=[build_context(CTImageStorage)])  # fmt: skip
    for path in files[: len(files) // 2]:
        assert assoc.send_c_store(path).Status == StoreStatus.SUCCESS
    assoc.abort()
    wait_for(lambda: node.state() in ENDED_STATES, 90, "the partial series processed")
    job = only_job(node)
    assert job.n_instances == len(files) // 2 and job.note == UNRELEASED_NOTE
    assert UNRELEASED_NOTE in node.run_log()
    assert node.terminate() == 0
