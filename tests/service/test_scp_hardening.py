"""The listener under hostile or odd input: silent and closed connections, bad UIDs, deep nesting, refused classes.

Every test runs a real ``StorageSCP`` on localhost and talks to it over TCP: raw sockets,
pynetdicom SCUs and dcmtk's echoscu.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import NodeConfig, TlsSection, load_config
from liverfat.service.scp import StorageSCP, StoreStatus, acceptor_settings, check_uid
from liverfat.service.spool import Spool
from liverfat.service.tls import client_context
from tests.service.conftest import ECHOSCU, dcmtk, node_config, small_series, storescu
from tests.service.test_scp import make_certificates

SCP_LOGGER = "liverfat.service.scp"


@pytest.fixture
def started() -> Iterator[list[tuple[StorageSCP, Spool]]]:
    nodes: list[tuple[StorageSCP, Spool]] = []
    yield nodes
    for scp, spool in nodes:
        scp.stop()
        spool.close()


def start(started: list[tuple[StorageSCP, Spool]], config: NodeConfig) -> StorageSCP:
    spool = Spool(config.spool.dir)
    scp = StorageSCP(config, spool)
    scp.start()
    started.append((scp, spool))
    return scp


def echo(scp: StorageSCP, contexts: tuple[str, ...] = (Verification,)) -> bool:
    """One C-ECHO from a pynetdicom SCU; whether it got Success."""
    ae = AE(ae_title="TESTSCU")
    assoc = ae.associate("127.0.0.1", scp.port, contexts=[build_context(c) for c in contexts], ae_title="LIVERFAT")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def held_slots(scp: StorageSCP) -> int:
    return scp.open_connections


def wait_until(predicate: object, timeout: float) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    assert callable(predicate)
    start_time = time.monotonic()
    while not predicate():
        assert time.monotonic() - start_time < timeout, f"not within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - start_time


# -- association slots (issue 17 item 3) -----------------------------------------------------


def test_silent_connections_closed_by_their_peer_give_their_slots_back_at_once(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path
) -> None:
    """All ten slots held by silent connections that then close: C-ECHOs succeed again within a second.

    Before, each slot stayed held for the whole ACSE timeout (10 s) after its peer had gone.
    """
    scp = start(started, node_config(tmp_path))
    connections = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(10)]
    wait_until(lambda: held_slots(scp) == 10, timeout=5)
    assert not echo(scp), "all ten slots are held: the eleventh association must be refused"
    for connection in connections:
        connection.close()
    closed_at = time.monotonic()
    while not echo(scp):
        assert time.monotonic() - closed_at < 1.0, "no C-ECHO succeeded within 1 s of the connections closing"
    assert all(echo(scp) for _ in range(10))
    assert held_slots(scp) <= 1


def test_connections_sending_garbage_are_closed_and_free_their_slots_at_once(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path
) -> None:
    """Ten connections send an unknown PDU type and stay open: the node aborts them and serves C-ECHOs."""
    scp = start(started, node_config(tmp_path))
    connections = [socket.create_connection(("127.0.0.1", scp.port), timeout=5) for _ in range(10)]
    try:
        for connection in connections:
            connection.sendall(b"\x09\x00\x00\x00\x00\x00")
        sent_at = time.monotonic()
        while not echo(scp):
            assert time.monotonic() - sent_at < 1.0, "no C-ECHO succeeded within 1 s"
        assert all(echo(scp) for _ in range(10))
        for connection in connections:
            assert connection.recv(10)[:1] == b"\x07"  # an A-ABORT PDU (PS3.8 Section 9.3.8), then the close
    finally:
        for connection in connections:
            connection.close()


def test_a_port_monitor_connecting_all_the_time_does_not_lock_out_echoes(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path
) -> None:
    """A bare connect and close every 20 ms (50 a second) while 25 C-ECHOs run one after another."""
    scp = start(started, node_config(tmp_path))
    stop = threading.Event()
    probes = 0

    def monitor() -> None:
        nonlocal probes
        while not stop.is_set():
            socket.create_connection(("127.0.0.1", scp.port)).close()
            probes += 1
            time.sleep(0.02)

    thread = threading.Thread(target=monitor)
    thread.start()
    try:
        time.sleep(0.5)  # ~25 probes before the first C-ECHO: before the fix they held 10 slots for 10 s
        results = [echo(scp) for _ in range(25)]
    finally:
        stop.set()
        thread.join()
    assert probes > 25
    assert results.count(True) == 25


def test_a_connection_that_stays_silent_is_closed_after_acse_timeout_s(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path
) -> None:
    scp = start(started, node_config(tmp_path, acse_timeout_s=1.0, max_associations=1))
    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as silent:
        wait_until(lambda: held_slots(scp) == 1, timeout=5)
        refused = dcmtk(ECHOSCU, "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1", scp.port)
        opened = time.monotonic()
        assert silent.recv(1) == b""  # the node closed it
        closed_after = time.monotonic() - opened
    assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stdout + refused.stderr
    assert closed_after < 3.0
    wait_until(lambda: held_slots(scp) == 0, timeout=2)
    assert echo(scp)


def echo_over_tls(scp: StorageSCP, tls: TlsSection) -> bool:
    """One C-ECHO over TLS from a pynetdicom SCU; whether it got Success."""
    ae = AE(ae_title="TESTSCU")
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", scp.port, contexts=[build_context(Verification)], ae_title="LIVERFAT",
                         tls_args=(client_context(tls), "localhost"))  # fmt: skip
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def test_with_tls_a_silent_connection_neither_blocks_the_listener_nor_keeps_its_slot(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path
) -> None:
    """Before, the listener's one accepting thread did each TLS handshake: one silent connection stopped it."""
    tls = make_certificates(tmp_path / "tls")
    scp = start(started, replace(node_config(tmp_path, max_associations=2), tls=tls))

    def tls_echo() -> bool:
        return echo_over_tls(scp, tls)

    silent = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(2)]
    try:
        wait_until(lambda: held_slots(scp) == 2, timeout=5)
        assert not tls_echo(), "both slots are held by the silent connections"
        silent.pop().close()
        closed_at = time.monotonic()
        while not tls_echo():
            assert time.monotonic() - closed_at < 1.0, "no TLS C-ECHO within 1 s of a silent connection closing"
    finally:
        for connection in silent:
            connection.close()


def test_with_tls_connections_reset_before_they_are_served_do_not_stop_the_listener(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path
) -> None:
    """A connection reset before its TLS wrap made the wrap raise on the accepting thread, which then ended."""
    tls = make_certificates(tmp_path / "tls")
    scp = start(started, replace(node_config(tmp_path), tls=tls))
    for _ in range(50):  # some reach the listener already reset
        probe = socket.create_connection(("127.0.0.1", scp.port))
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        probe.close()
    assert echo_over_tls(scp, tls)


def test_association_limit_and_timeouts_come_from_the_node_section(tmp_path: Path) -> None:
    environ = {"LIVERFAT_NODE_MAX_ASSOCIATIONS": "3", "LIVERFAT_NODE_ACSE_TIMEOUT_S": "2.5",
               "LIVERFAT_NODE_NETWORK_TIMEOUT_S": "30"}  # fmt: skip
    node = load_config(None, environ=environ).node
    settings = acceptor_settings(node)
    assert (node.max_associations, settings.acse_timeout_s, settings.network_timeout_s) == (3, 2.5, 30.0)
    defaults = load_config(None, environ={}).node
    assert (defaults.max_associations, acceptor_settings(defaults).acse_timeout_s,
            acceptor_settings(defaults).network_timeout_s) == (10, 10.0, 60.0)  # fmt: skip
    with pytest.raises(LiverfatError, match=r"\[node\] acse_timeout_s must be greater than 0") as raised:
        load_config(None, environ={"LIVERFAT_NODE_ACSE_TIMEOUT_S": "0"})
    assert raised.value.reason is Reason.CONFIG_INVALID


# -- statuses for the sender's errors (item 8) ------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "value", "why"),
    [
        ("SeriesInstanceUID", "1." + "2" * 998, "has 1000 characters"),
        ("StudyInstanceUID", "1.2.ABC", "is not digits"),
        ("SeriesInstanceUID", "1..2", "is not digits"),
    ],
)
def test_an_invalid_uid_is_the_senders_error_not_out_of_resources(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    attribute: str, value: str, why: str,
) -> None:  # fmt: skip
    scp = start(started, node_config(tmp_path))
    [path] = small_series(tmp_path / "series", slices=1)
    ds = pydicom.dcmread(path)
    with pydicom_config.disable_value_validation():
        setattr(ds, attribute, value)
        ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    assoc = AE(ae_title="TESTSCU").associate("127.0.0.1", scp.port, contexts=[build_context(CTImageStorage)],
                                             ae_title="LIVERFAT")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=SCP_LOGGER):
        status = assoc.send_c_store(tmp_path / "bad.dcm")
        assoc.release()
    assert status.Status & 0xF000 == 0xC000 and status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert why in caplog.text and "0xC210" in caplog.text
    assert scp.spool.jobs() == [] and list((scp.spool.root / "instances").rglob("*.dcm")) == []


def test_an_over_long_sop_instance_uid_in_the_data_set_is_answered_cannot_understand(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dcmtk's storescu cuts the command's Affected SOP Instance UID to 64 characters; the data set keeps all 202."""
    scp = start(started, node_config(tmp_path))
    [path] = small_series(tmp_path / "series", slices=1)
    ds = pydicom.dcmread(path)
    with pydicom_config.disable_value_validation():
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1." + "3" * 200
        ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger=SCP_LOGGER):
        result = storescu(scp.port, tmp_path / "bad.dcm", "-R", "-v")
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr
    assert "(0008,0018) 'SOP Instance UID' has 202 characters" in caplog.text
    assert scp.spool.jobs() == []


def test_check_uid_follows_ps3_5_section_9_1() -> None:
    assert check_uid("1.2.840.10008.5.1.4.1.1.2") is None
    assert check_uid("1.2.840.0123") is None  # a leading zero: non-conformant, written by older equipment, kept
    assert check_uid("1" * 64) is None
    assert "65 characters" in str(check_uid("1" * 65))
    for bad in ("", ".1.2", "1.2.", "1.2.3a", "1.2 .3", "1.２"):
        assert check_uid(bad) is not None, bad


def nested_sequence_instance(depth: int) -> bytes:
    """A CT data set (Explicit VR Little Endian, no file meta) with a sequence nested ``depth`` deep before its UIDs.

    Written by hand: pydicom's own writer recurses too and cannot write it.
    """

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    def uid(value: str) -> bytes:
        raw = value.encode()
        return raw + b"\x00" * (len(raw) % 2)

    sequence_start = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)  # Referenced Series Sequence
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = (sequence_start + item_start) * depth + (item_end + sequence_end) * depth
    return (element(0x00080016, b"UI", uid(CTImageStorage)) + element(0x00080018, b"UI", uid("1.2.3.4"))
            + nested + element(0x0020000D, b"UI", uid("1.2.3.5")) + element(0x0020000E, b"UI", uid("1.2.3.6")))  # fmt: skip


def test_a_sequence_nested_3000_deep_is_answered_cannot_understand_in_one_log_line(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Sent as the file's bytes (pynetdicom would parse and re-encode it, and recurse as deep itself)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    scp = start(started, node_config(tmp_path))
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    encoded = nested_sequence_instance(3000)
    path = tmp_path / "deep.dcm"
    with path.open("wb") as file:
        file.write(b"\x00" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(file), meta)
        file.write(encoded)
    assoc = AE(ae_title="TESTSCU").associate("127.0.0.1", scp.port, contexts=[build_context(CTImageStorage, ExplicitVRLittleEndian)],
                                             ae_title="LIVERFAT")  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        status = assoc.send_c_store(path)
        assoc.release()
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    ours = [r for r in caplog.records if r.name == SCP_LOGGER and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in ours] == [
        "answered 0xC210 to TESTSCU for instance 1.2.3.4: its sequences are nested too deep to read"
    ]
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in caplog.text and len(caplog.text) < len(encoded), "the log is smaller than the instance"
    assert scp.spool.jobs() == []


# -- negotiation: multi-frame CT refused, ordinary refusals quiet (decide item, usability) -----


def test_enhanced_ct_is_refused_at_negotiation_with_the_reason_at_info(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scp = start(started, node_config(tmp_path))
    with caplog.at_level(logging.DEBUG, logger=SCP_LOGGER):
        assoc = AE(ae_title="TESTSCU").associate("127.0.0.1", scp.port, ae_title="LIVERFAT",
                                                 contexts=[build_context(EnhancedCTImageStorage),
                                                           build_context(Verification)])  # fmt: skip
        accepted = [str(c.abstract_syntax) for c in assoc.accepted_contexts]
        assoc.release()
    assert accepted == [Verification]
    [record] = [r for r in caplog.records if "Enhanced CT Image Storage" in r.getMessage()]
    assert record.levelno == logging.INFO and "multi-frame CT is not analysed here" in record.getMessage()


def test_refused_contexts_of_an_orthanc_style_echo_are_logged_at_debug_only(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Orthanc proposes query/retrieve classes beside Verification with each C-ECHO: normal negotiation."""
    scp = start(started, node_config(tmp_path))
    contexts = (Verification, PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove)
    with caplog.at_level(logging.DEBUG, logger=SCP_LOGGER):
        assert echo(scp, contexts)
    refusals = [r for r in caplog.records if r.name == SCP_LOGGER and "refused" in r.getMessage()]
    assert refusals and all(r.levelno == logging.DEBUG for r in refusals)
    assert "Patient Root Query/Retrieve Information Model - FIND" in refusals[0].getMessage()


def test_a_store_of_another_class_with_no_ct_context_still_warns(
    started: list[tuple[StorageSCP, Spool]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scp = start(started, node_config(tmp_path))
    mr = "1.2.840.10008.5.1.4.1.1.4"
    with caplog.at_level(logging.DEBUG, logger=SCP_LOGGER):
        assert echo(scp, (Verification, mr))
    [record] = [r for r in caplog.records if "MR Image Storage" in r.getMessage()]
    assert record.levelno == logging.WARNING


def test_generated_uids_pass(tmp_path: Path) -> None:
    assert all(check_uid(generate_uid()) is None for _ in range(100))
