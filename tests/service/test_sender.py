"""The sender against a real pynetdicom storage SCP: contexts, retries, backoff, restarts, TLS,
a destination that is down or silent (probed, and never delaying another destination)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event

from liverfat.service import sender as sender_module
from liverfat.service.config import Destination, NodeConfig, SendSection
from liverfat.service.health import NodeStatus, assess
from liverfat.service.sender import Reachability, RetryPolicy, Sender
from liverfat.service.spool import InstanceInfo, JobResult, JobState, OutboxState, OutputFile, Spool
from tests.service.conftest import free_port, node_config, small_series
from tests.service.node_process import wait_for
from tests.service.test_scp import make_certificates

RESULT_CLASSES = (SegmentationStorage, Comprehensive3DSRStorage, SecondaryCaptureImageStorage)


@dataclass
class Receiver:
    """A real storage SCP standing in for the PACS; records what it was offered and what it got."""

    port: int
    status: int = 0x0000
    offered: list[set[str]] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    server: Any = None

    def start(self, tls: Any = None) -> Receiver:
        ae = AE(ae_title="PACS")
        for sop_class in RESULT_CLASSES:
            ae.add_supported_context(sop_class)
        handlers: list[Any] = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=tls)
        return self

    def stop(self) -> None:
        self.server.shutdown()

    def _requested(self, event: Event) -> None:
        self.offered.append({str(cx.abstract_syntax) for cx in event.assoc.requestor.requested_contexts})

    def _store(self, event: Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        return self.status


@dataclass
class SilentListener:
    """A destination that accepts TCP connections and never says a word (a hung PACS, a wrong port behind a proxy)."""

    port: int
    server: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port), backlog=16)  # the kernel completes handshakes

    def close(self) -> None:
        self.server.close()


def queue_results(
    tmp_path: Path, *destinations: Destination, send: SendSection | None = None
) -> tuple[NodeConfig, Spool]:
    """A finished job whose three result files (SEG, SR, secondary capture) are queued for each destination."""
    config = node_config(tmp_path)
    config = replace(config, send=replace(send or SendSection(first_delay_s=0.2, max_delay_s=1.0),
                                          destinations=destinations))  # fmt: skip
    spool = Spool(config.spool.dir)
    add_results(spool, tmp_path / "src", destinations)
    return config, spool


def add_results(spool: Spool, folder: Path, destinations: tuple[Destination, ...], series_uid: str = "9.9") -> None:
    """A series processed: its three result files queued for each destination."""
    spool.store_instance(b"ct", InstanceInfo(f"{series_uid}.1", "1.2.840.10008.5.1.4.1.1.2", series_uid, "9", "SCU"))
    spool.complete_stable(0.0)
    job = spool.claim_next()
    assert job is not None
    sources = small_series(folder, slices=3)
    outputs = []
    for index, (source, sop_class) in enumerate(zip(sources, RESULT_CLASSES)):
        ds = pydicom.dcmread(source)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        path = spool.results_dir / str(job.id) / f"result{index}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path)
        outputs.append(OutputFile(str(path.relative_to(spool.root)), sop_class, ds.SOPInstanceUID,
                                  str(ds.file_meta.TransferSyntaxUID)))  # fmt: skip
    spool.finish_job(job.id, JobResult(JobState.DONE, outputs=tuple(outputs)), [str(d) for d in destinations])


def outbox_states(spool: Spool) -> list[str]:
    return [row["state"] for row in spool.query("SELECT state FROM outbox ORDER BY id")]


def test_results_are_sent_with_contexts_for_exactly_their_sop_classes(tmp_path: Path, receiver: Receiver) -> None:
    config, spool = queue_results(tmp_path, Destination("PACS", "127.0.0.1", receiver.port))
    assert Sender(config, spool).send_due() == 3
    assert receiver.offered == [set(RESULT_CLASSES)]
    assert len(receiver.stored) == 3
    assert outbox_states(spool) == [OutboxState.SENT] * 3


def test_a_configured_destination_is_used_as_configured(tmp_path: Path, receiver: Receiver) -> None:
    destination = Destination("PACS", "127.0.0.1", receiver.port)
    config, spool = queue_results(tmp_path, destination)
    assert Sender(config, spool).destination(str(destination)).destination is destination


def test_results_queued_for_a_destination_no_longer_configured_are_still_sent_to_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    config, spool = queue_results(tmp_path, Destination("PACS", "127.0.0.1", receiver.port))
    reconfigured = replace(config, send=replace(config.send, destinations=()))
    assert Sender(reconfigured, spool).send_due() == 3
    assert len(receiver.stored) == 3 and outbox_states(spool) == [OutboxState.SENT] * 3


def test_destination_down_is_retried_with_backoff_and_gets_everything_after_a_restart(tmp_path: Path) -> None:
    port = free_port()
    config, spool = queue_results(tmp_path, Destination("PACS", "127.0.0.1", port))
    before = time.time()
    assert Sender(config, spool).send_due() == 0
    rows = spool.query("SELECT attempts, next_attempt_at, last_error FROM outbox")
    assert all(r["attempts"] == 1 and r["next_attempt_at"] >= before + 0.2 for r in rows)
    assert "association with PACS@127.0.0.1" in rows[0]["last_error"]
    assert Sender(config, spool).send_due() == 0, "a restarted sender probes first, and nothing answers"
    assert [r["attempts"] for r in spool.query("SELECT attempts FROM outbox")] == [1, 1, 1], "probes use no attempt"
    spool.close()
    receiver = Receiver(port).start()
    try:
        time.sleep(0.25)
        restarted = Spool(config.spool.dir)  # a new process would open the same outbox
        assert Sender(config, restarted).send_due() == 3
    finally:
        receiver.stop()
    assert outbox_states(restarted) == [OutboxState.SENT] * 3


def test_a_failure_status_is_retried_and_gives_up_after_max_attempts_until_resend(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.status = 0xA700
    send = SendSection(max_attempts=2, first_delay_s=0.0, max_delay_s=0.0)
    config, spool = queue_results(tmp_path, Destination("PACS", "127.0.0.1", receiver.port), send=send)
    sender = Sender(config, spool)
    assert sender.send_due() == 0 and outbox_states(spool) == [OutboxState.PENDING] * 3
    assert sender.send_due() == 0 and outbox_states(spool) == [OutboxState.FAILED] * 3
    assert "status 0xA700" in spool.query("SELECT last_error FROM outbox")[0]["last_error"]
    receiver.status = 0x0000
    spool.requeue_series("9.9", [str(d) for d in config.send.destinations])
    assert sender.send_due() == 3
    failures = spool.query("SELECT SUM(failures) AS n FROM outbox")[0]["n"]
    assert failures == 6, "failed attempts stay counted for the metrics"


def test_retry_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=5, first_delay_s=10, backoff_factor=2, max_delay_s=60)
    assert [policy.delay_s(n) for n in range(1, 6)] == [10, 20, 40, 60, 60]
    assert policy.retry_at(4, now=100.0) == 160.0
    assert policy.retry_at(5, now=100.0) is None


def test_results_go_over_tls_to_a_tls_destination(tmp_path: Path) -> None:
    from liverfat.service.tls import server_context

    tls = make_certificates(tmp_path / "tls")
    receiver = Receiver(free_port()).start(tls=server_context(tls))
    try:
        config, spool = queue_results(tmp_path, Destination("PACS", "127.0.0.1", receiver.port))
        assert Sender(replace(config, tls=tls), spool).send_due() == 3
    finally:
        receiver.stop()
    assert len(receiver.stored) == 3


def test_a_destination_that_returns_gets_its_results_at_the_next_probe_not_after_the_backoff(tmp_path: Path) -> None:
    port = free_port()
    send = SendSection(first_delay_s=600.0, max_delay_s=600.0, probe_interval_s=0.5, connect_timeout_s=1.0)
    config, spool = queue_results(tmp_path, Destination("PACS", "127.0.0.1", port), send=send)
    sender = Sender(config, spool)
    sender.start()
    receiver = None
    try:
        wait_for(lambda: spool.query("SELECT MIN(attempts) AS n FROM outbox")[0]["n"] == 1, 10, "the failed attempt")
        time.sleep(2.0)  # about four probes, none answered
        assert sender.destination(f"PACS@127.0.0.1:{port}").reachability is Reachability.DOWN
        assert [r["attempts"] for r in spool.query("SELECT attempts FROM outbox")] == [1, 1, 1], "probes use none"
        receiver = Receiver(port).start()
        back = time.monotonic()
        wait_for(lambda: len(receiver.stored) == 3, 10, "the results at the destination that came back")
        delay_s = time.monotonic() - back
    finally:
        sender.stop()
        if receiver is not None:
            receiver.stop()
    print(f"delivered {delay_s:.2f} s after the destination returned")
    assert delay_s < 2.0, f"delivered {delay_s:.1f} s after the destination returned (probe every 0.5 s, backoff 600 s)"
    assert outbox_states(spool) == [OutboxState.SENT] * 3


def test_a_silent_destination_does_not_delay_a_live_one_and_is_reported_with_its_reason(
    tmp_path: Path, receiver: Receiver
) -> None:
    silent = SilentListener(free_port())
    send = SendSection(first_delay_s=0.2, max_delay_s=1.0, acse_timeout_s=4.0, probe_interval_s=1.0,
                       unhealthy_after_s=2.0)  # fmt: skip
    dead, live = Destination("HUNG", "127.0.0.1", silent.port), Destination("PACS", "127.0.0.1", receiver.port)
    config, spool = queue_results(tmp_path, dead, live, send=send)
    sender = Sender(config, spool)
    started = time.monotonic()
    sender.start()
    try:
        wait_for(lambda: len(receiver.stored) == 3, 10, "the results at the live destination")
        live_s = time.monotonic() - started
        wait_for(lambda: spool.query("SELECT MIN(failures) AS n FROM outbox WHERE destination = ?", (str(dead),))[0]["n"],
                 10, "the silent destination's association to time out")  # fmt: skip
        failed_s = time.monotonic() - started
        time.sleep(2.5)  # past unhealthy_after_s
        health = assess(NodeStatus(counts=spool.counts(), spool_free_bytes=2**30, min_free_bytes=0, destinations=2,
                                   unhealthy_after_s=config.send.unhealthy_after_s))  # fmt: skip
    finally:
        sender.stop()
        silent.close()
    print(f"live destination served after {live_s:.2f} s; the silent one failed after {failed_s:.2f} s")
    assert live_s < 2.0, f"the live destination waited {live_s:.1f} s behind a silent one (ACSE timeout 4 s)"
    assert failed_s >= 3.5, "the silent destination failed by the ACSE timeout, not by a refused connection"
    assert not health.ok
    (problem,) = health.problems
    assert problem.startswith(f"destination {dead} failing since ") and "no answer within the timeouts" in problem
    assert str(live) not in " ".join(health.problems + health.warnings)
    assert [r["state"] for r in spool.query("SELECT state FROM outbox WHERE destination = ?", (str(live),))] == [
        OutboxState.SENT
    ] * 3


def test_results_queued_while_the_sender_waits_go_at_once_when_the_doorbell_rings(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker rings ``results_queued`` after recording a series: no wait for the next poll (made 60 s here)."""
    monkeypatch.setattr(sender_module, "POLL_S", 60.0)
    destination = Destination("PACS", "127.0.0.1", receiver.port)
    config, spool = queue_results(tmp_path, destination)
    doorbell = threading.Event()
    sender = Sender(config, Spool(config.spool.dir), doorbell)
    sender.start()
    try:
        wait_for(lambda: len(receiver.stored) == 3, 10, "the first series' results, sent at start")
        add_results(spool, tmp_path / "second", (destination,), series_uid="9.10")
        doorbell.set()
        wait_for(lambda: len(receiver.stored) == 6, 10, "the second series' results, sent on the doorbell")
    finally:
        sender.stop()
    assert outbox_states(spool) == ["sent"] * 6
