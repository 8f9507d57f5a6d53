"""The node's association acceptor (``service/upper_layer.py``) at the protocol level, over real TCP.

A real ``StorageSCP`` on localhost, talked to by pynetdicom SCUs, dcmtk's echoscu and storescu,
and a raw-socket peer whose PDUs pynetdicom builds (``pynetdicom.pdu``, ``dimse_messages``):
the raw peer sends what a conforming SCU does not, fragments as it likes and reads each byte
the node answers.
"""

from __future__ import annotations

import copy
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, build_context, build_role
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    P_DATA,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from liverfat.service import upper_layer
from liverfat.service.config import NodeConfig
from liverfat.service.dimse_command import Command
from liverfat.service.scp import StorageSCP, StoreStatus, acceptor_settings
from liverfat.service.spool import Spool
from liverfat.service.upper_layer import (
    APPLICATION_CONTEXT_NAME,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MAX_PDU_LENGTH,
    Association,
    Handlers,
    Rejection,
    Settings,
    serve,
)
from tests.service.conftest import ECHOSCU, dcmtk, node_config, small_series, storescu
from tests.service.test_dimse_command import echo_message, store_message, wire_command_set
from tests.service.test_scp_hardening import echo, wait_until

LOGGER = "liverfat.service.upper_layer"
VERIFICATION = build_context(Verification)
CT_EXPLICIT = build_context(CTImageStorage, ExplicitVRLittleEndian)  # the phantom series' transfer syntax

# PDU types (PS3.8 Section 9.3)
A_ASSOCIATE_AC_PDU, A_ASSOCIATE_RJ_PDU, P_DATA_TF_PDU, A_RELEASE_RP_PDU, A_ABORT_PDU = 0x02, 0x03, 0x04, 0x06, 0x07


@dataclass
class Node:
    """A listening ``StorageSCP`` and the series lists its ``on_release`` received."""

    scp: StorageSCP
    released: list[list[str]]


@contextmanager
def started(config: NodeConfig) -> Iterator[Node]:
    spool = Spool(config.spool.dir)
    released: list[list[str]] = []
    scp = StorageSCP(config, spool, on_release=released.append)
    scp.start()
    try:
        yield Node(scp, released)
    finally:
        scp.stop()
        spool.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with started(node_config(tmp_path)) as running:
        yield running


@pytest.fixture
def scp(node: Node) -> StorageSCP:
    return node.scp


# -- the raw peer ------------------------------------------------------------------------------


def associate_rq(contexts: Sequence[PresentationContext],
                 application_context: str = APPLICATION_CONTEXT_NAME) -> bytes:  # fmt: skip
    """An A-ASSOCIATE-RQ PDU from TESTSCU to LIVERFAT, encoded by pynetdicom; context IDs 1, 3, 5..."""
    request = A_ASSOCIATE()
    request.application_context_name = UID(application_context)
    request.calling_ae_title, request.called_ae_title = "TESTSCU", "LIVERFAT"
    proposed = [copy.copy(context) for context in contexts]  # the callers' contexts keep their (absent) IDs
    for number, context in enumerate(proposed):
        context.context_id = 2 * number + 1
    request.presentation_context_definition_list = proposed
    maximum_length, class_uid = MaximumLengthNotification(), ImplementationClassUIDNotification()
    maximum_length.maximum_length_received = 16384
    class_uid.implementation_class_uid = UID("1.2.826.0.1.3680043.9.3811.3.0.4")
    request.user_information = [maximum_length, class_uid]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return bytes(pdu.encode())


def p_data_tf(pdvs: Sequence[tuple[int, bytes]]) -> bytes:
    """One P-DATA-TF PDU (pynetdicom's encoding) of (context ID, message control header + data) values."""
    primitive = P_DATA()
    # its setter wants [ID, value] lists, though annotated (and filled by encode_msg) as tuples
    primitive.presentation_data_value_list = [[context_id, value] for context_id, value in pdvs]  # type: ignore[misc]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def message_pdus(message: DIMSEMessage, context_id: int, fragment: int = 0, per_pdu: int = 1) -> list[bytes]:
    """``message`` cut by pynetdicom into PDVs of at most ``fragment`` bytes (0: one each), ``per_pdu`` in a PDU."""
    pdvs = [pdv for p_data in message.encode_msg(context_id, fragment) for pdv in p_data.presentation_data_value_list]
    return [p_data_tf(pdvs[start : start + per_pdu]) for start in range(0, len(pdvs), per_pdu)]


RELEASE_RQ = bytes(A_RELEASE_RQ().encode())


class Peer:
    """A raw-socket association requestor: sends the bytes it is given, reads the node's PDUs."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=5)

    def close(self) -> None:
        self.socket.close()

    def send(self, *pdus: bytes) -> None:
        for pdu in pdus:
            self.socket.sendall(pdu)

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, length = struct.unpack(">BxI", self._read(6))
        return pdu_type, self._read(length)

    def associate(self, contexts: Sequence[PresentationContext] = (VERIFICATION, CT_EXPLICIT)) -> list[int]:
        """Send an A-ASSOCIATE-RQ; the IDs of the contexts the A-ASSOCIATE-AC accepted."""
        self.send(associate_rq(contexts))
        pdu_type, body = self.read_pdu()
        assert pdu_type == A_ASSOCIATE_AC_PDU
        accept = A_ASSOCIATE_AC()
        accept.decode(struct.pack(">BxI", pdu_type, len(body)) + body)
        results = accept.to_primitive().presentation_context_definition_results_list
        return [int(cx.context_id or 0) for cx in results if cx.result == 0x00]

    def response(self) -> Dataset:
        """The next PDU: a P-DATA-TF holding one whole response command set."""
        pdu_type, body = self.read_pdu()
        assert pdu_type == P_DATA_TF_PDU, f"PDU type 0x{pdu_type:02X}"
        length, _, control = struct.unpack_from(">IBB", body)
        assert control == 0x03 and length + 4 == len(body), "one PDV: the last command fragment"
        return read_dataset(BytesIO(body[6:]), is_implicit_VR=True, is_little_endian=True)

    def closed(self) -> bool:
        return self.socket.recv(1) == b""

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.socket.recv(size - len(data))
            assert chunk, f"the node closed the connection after {len(data)} of {size} bytes"
            data += chunk
        return data


@pytest.fixture
def peer(scp: StorageSCP) -> Iterator[Peer]:
    connected = Peer(scp.port)
    yield connected
    connected.close()


def data_set_bytes(path: Path) -> bytes:
    """A Part 10 file's data set as encoded: after preamble, prefix and the file meta group (its length at 140)."""
    raw = path.read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


def instance_message(path: Path, message_id: int = 1) -> DIMSEMessage:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return store_message(ds.SOPClassUID, ds.SOPInstanceUID, message_id, data_set_bytes(path))


# -- data transfer -----------------------------------------------------------------------------


def test_an_instance_in_many_fragments_and_pdus_is_stored_byte_identical(scp: StorageSCP, peer: Peer,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """Command and data set in 58-byte fragments, five PDVs a PDU (one holds command and data set fragments)."""
    [path] = small_series(tmp_path / "series", slices=1, size=64)
    [_, ct] = peer.associate()
    pdus = message_pdus(instance_message(path), ct, fragment=64, per_pdu=5)
    assert len(pdus) > 20
    peer.send(*pdus)
    response = peer.response()
    assert (response.Status, response.MessageIDBeingRespondedTo) == (StoreStatus.SUCCESS, 1)
    [job] = scp.spool.jobs()
    [stored] = scp.spool.job_files(job)
    assert data_set_bytes(stored) == data_set_bytes(path)
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_a_data_set_above_the_bound_is_read_to_its_end_not_held_and_answered_cannot_understand(
    scp: StorageSCP, peer: Peer, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    [path] = small_series(tmp_path / "series", slices=1, size=64)
    size = len(data_set_bytes(path))
    monkeypatch.setattr(upper_layer, "MAX_DATA_SET_BYTES", size - 1)
    verification, ct = peer.associate()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        peer.send(*message_pdus(instance_message(path), ct, fragment=1024))
        assert peer.response().Status == StoreStatus.CANNOT_UNDERSTAND
    assert f"its data set has {size} bytes, above the" in caplog.text
    assert scp.spool.jobs() == []
    peer.send(*message_pdus(echo_message(message_id=2), verification))
    assert peer.response().Status == 0x0000  # the association goes on


def test_the_release_is_answered_and_reports_the_series_stored(node: Node, peer: Peer, tmp_path: Path) -> None:
    files = small_series(tmp_path / "series", slices=2)
    [_, ct] = peer.associate()
    for number, path in enumerate(files, start=1):
        peer.send(*message_pdus(instance_message(path, number), ct))
        assert peer.response().Status == StoreStatus.SUCCESS
    peer.send(RELEASE_RQ)
    assert peer.read_pdu() == (A_RELEASE_RP_PDU, b"\x00" * 4)
    wait_until(lambda: node.released, timeout=5)  # called once the A-RELEASE-RP is sent
    assert node.released == [[pydicom.dcmread(files[0]).SeriesInstanceUID]]
    peer.close()
    wait_until(lambda: node.scp.open_connections == 0, timeout=5)


def test_a_store_on_the_wrong_context_is_refused_and_the_association_goes_on(peer: Peer) -> None:
    verification, ct = peer.associate()
    peer.send(*message_pdus(store_message(message_id=1), verification))
    assert peer.response().Status == 0x0211  # Unrecognized Operation: Verification has no C-STORE
    peer.send(*message_pdus(store_message(MRImageStorage, message_id=2), ct))
    assert peer.response().Status == 0x0122  # SOP Class Not Supported: the context is CT Image Storage
    peer.send(*message_pdus(echo_message(message_id=3), verification))
    response = peer.response()
    assert (response.Status, response.MessageIDBeingRespondedTo, response.CommandField) == (0x0000, 3, 0x8030)
    peer.send(RELEASE_RQ)
    assert peer.read_pdu()[0] == A_RELEASE_RP_PDU


# -- association negotiation ----------------------------------------------------------------


def test_the_accept_carries_the_identity_and_maximum_length_and_survives_extended_negotiation(
    scp: StorageSCP, tmp_path: Path
) -> None:
    """An SCU that proposes its roles and an asynchronous operations window: answered with the defaults."""
    [path] = small_series(tmp_path / "series", slices=1)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 4
    assoc = AE(ae_title="TESTSCU").associate(
        "127.0.0.1", scp.port, ae_title="LIVERFAT", max_pdu=4096,
        contexts=[build_context(CTImageStorage), VERIFICATION],
        ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=True), window],
    )  # fmt: skip
    assert assoc.is_established
    try:
        acceptor = assoc.acceptor
        assert acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        assert acceptor.maximum_length == MAX_PDU_LENGTH
        assert acceptor.asynchronous_operations == (1, 1)  # no window in the AC: one operation at a time
        assert not acceptor.role_selection  # no role item in the AC: the default roles apply (PS3.7 D.3.3.4)
        [ct] = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
        assert (ct.as_scu, ct.as_scp) == (True, False)  # the requestor sends, the node stores
        assert assoc.send_c_store(path).Status == StoreStatus.SUCCESS
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released


def test_an_unknown_application_context_is_rejected(peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        peer.send(associate_rq([VERIFICATION], application_context="1.2.3.4.5"))
        pdu_type, body = peer.read_pdu()
    assert pdu_type == A_ASSOCIATE_RJ_PDU
    assert body[1:] == bytes([1, 1, 2])  # permanent, service-user, application context name not supported
    assert "unknown application context 1.2.3.4.5" in caplog.text


# -- protocol errors: A-ABORT, the connection closed, the node serves on --------------------------


def assert_aborted(scp: StorageSCP, peer: Peer, caplog: pytest.LogCaptureFixture, why: str,
                   calling: str = "TESTSCU") -> None:  # fmt: skip
    """The node sent an A-ABORT (service provider), closed the connection, logged ``why``, and serves on."""
    pdu_type, body = peer.read_pdu()
    assert pdu_type == A_ABORT_PDU and body[2] == 0x02, "an A-ABORT from the service provider"
    assert peer.closed()
    assert f"aborted the association from {calling} at 127.0.0.1: {why}" in caplog.text
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.WARNING]
    wait_until(lambda: scp.open_connections == 0, timeout=5)
    assert echo(scp)


ECHO_PDV_LENGTH = 2 + len(wire_command_set(echo_message()))  # context ID, control header, command set


def truncated_pdv(context_id: int) -> bytes:
    """A C-ECHO-RQ whose PDV (of ``ECHO_PDV_LENGTH``) lacks its last 4 bytes: its P-DATA-TF ends before it does."""
    [pdu] = message_pdus(echo_message(), context_id)
    body = pdu[6:-4]
    return struct.pack(">BxI", P_DATA_TF_PDU, len(body)) + body


@pytest.mark.parametrize(
    ("pdus", "why"),
    [
        (lambda ct, rejected: message_pdus(echo_message(), rejected),
         "a message on presentation context 5, which was not accepted"),
        (lambda ct, rejected: [p_data_tf([(ct, b"\x02" + b"\x00" * 8)])], "a data set fragment that no command announced"),
        (lambda ct, rejected: [truncated_pdv(ct)], f"a PDV of {ECHO_PDV_LENGTH} bytes does not fit its P-DATA-TF"),
        (lambda ct, rejected: [struct.pack(">BxI", P_DATA_TF_PDU, 2 * MAX_PDU_LENGTH)],
         f"a PDU of {2 * MAX_PDU_LENGTH} bytes, above the {MAX_PDU_LENGTH} announced"),
        (lambda ct, rejected: [message_pdus(store_message(), ct)[0], RELEASE_RQ],
         "an A-RELEASE-RQ in the middle of a message"),
    ],
    ids=["context not accepted", "data set first", "truncated pdv", "pdu too long", "release mid-message"],
)  # fmt: skip
def test_a_protocol_error_in_an_association_is_aborted(
    scp: StorageSCP, peer: Peer, caplog: pytest.LogCaptureFixture, pdus: Callable[[int, int], list[bytes]], why: str
) -> None:  # fmt: skip
    [_, ct] = peer.associate((VERIFICATION, CT_EXPLICIT, build_context(MRImageStorage)))  # MR: ID 5
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        peer.send(*pdus(ct, 5))
        assert_aborted(scp, peer, caplog, why)


def test_an_associate_rq_that_cannot_be_decoded_is_aborted(scp: StorageSCP, peer: Peer,
                                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    request = associate_rq([VERIFICATION])
    variable_items = 6 + 68  # after the PDU header and the fixed fields (PS3.8 Table 9-11)
    assert request[variable_items] == 0x10, "the application context item"
    broken = request[: variable_items + 2] + b"\xff\xff" + request[variable_items + 4 :]  # its length overruns the PDU
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        peer.send(broken)
        assert_aborted(scp, peer, caplog, "the A-ASSOCIATE-RQ cannot be read: ", calling="a peer")
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert not record.getMessage().endswith(": "), "names what pynetdicom raised (an AssertionError has no text)"


def test_an_idle_association_is_aborted_after_network_timeout_s(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with started(node_config(tmp_path, network_timeout_s=0.5)) as node:
        peer = Peer(node.scp.port)
        try:
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                peer.associate()
                assert node.scp.open_connections == 1
                assert_aborted(node.scp, peer, caplog, "no PDU for 0.5 s ([node] network_timeout_s)")
        finally:
            peer.close()


def test_a_data_set_on_a_context_not_accepted_is_aborted_at_its_first_fragment(
    scp: StorageSCP, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    """The node does not gather a whole data set it would refuse: the first PDU of the message is enough."""
    peer.associate((VERIFICATION, CT_EXPLICIT, build_context(MRImageStorage)))  # MR refused: ID 5
    first, *rest = message_pdus(store_message(), 5, fragment=16)
    assert rest, "the message spans several PDUs"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        peer.send(first)
        assert_aborted(scp, peer, caplog, "a message on presentation context 5, which was not accepted")


def test_a_request_sent_a_byte_at_a_time_is_cut_at_acse_timeout_s(tmp_path: Path) -> None:
    """acse_timeout_s bounds the whole A-ASSOCIATE-RQ, not each read: a trickling peer loses its slot."""
    with started(node_config(tmp_path, acse_timeout_s=1.0)) as node:
        request = associate_rq([VERIFICATION])
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as trickle:
            opened = time.monotonic()
            try:
                for byte in request:
                    trickle.sendall(bytes([byte]))
                    time.sleep(0.2)
                answer = trickle.recv(16)
            except OSError:
                answer = b""  # the node closed it: a reset once it has gone
            closed_after = time.monotonic() - opened
        assert answer == b"", "closed without an A-ASSOCIATE-AC"
        assert 0.9 < closed_after < 3.0
        wait_until(lambda: node.scp.open_connections == 0, timeout=2)
        assert echo(node.scp)


# -- a handler that fails ---------------------------------------------------------------------------


class FailingStore:
    """Handlers whose ``store`` raises: what the node answers to a failure nobody foresaw."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def requested(self, association: Association) -> Rejection | None:
        return None

    def accepted(self, association: Association) -> None:
        pass

    def store(self, association: Association, command: Command, transfer_syntax: UID, dataset: memoryview) -> int:
        raise RuntimeError("the index is gone")

    def released(self, association: Association) -> None:
        self.ended.set()


def serve_one(listener: socket.socket, settings: Settings, handlers: Handlers) -> None:
    """Accept one connection and run its association with ``handlers``: the upper layer without a StorageSCP."""
    connection, address = listener.accept()
    serve(connection, Association(address[:2]), settings, handlers)


def test_a_handler_that_raises_is_answered_0xc211_and_the_association_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    handlers = FailingStore()
    settings = acceptor_settings(node_config(tmp_path).node)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve_one, args=(listener, settings, handlers))
        thread.start()
        [path] = small_series(tmp_path / "series", slices=1)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assoc = AE(ae_title="TESTSCU").associate("127.0.0.1", listener.getsockname()[1], ae_title="LIVERFAT",
                                                     contexts=[build_context(CTImageStorage),
                                                               VERIFICATION])  # fmt: skip
            stored = assoc.send_c_store(path)
            echoed = assoc.send_c_echo()
            assoc.release()
        thread.join(5)
    assert stored.Status == 0xC211
    assert echoed.Status == 0x0000 and handlers.ended.is_set()
    [record] = [r for r in caplog.records if r.name == LOGGER]
    sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert record.getMessage() == f"answered 0xC211 to TESTSCU for instance {sop_uid}: storing it failed"
    assert record.exc_info is not None and "the index is gone" in caplog.text


# -- dcmtk -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("require_dcmtk")
@pytest.mark.parametrize("options", [(), ("--max-pdu", "4096")], ids=["default", "max-pdu 4096"])
def test_dcmtk_storescu_sends_a_series(scp: StorageSCP, tmp_path: Path, options: tuple[str, ...]) -> None:
    """``--max-pdu`` is storescu's receive size; it sends in PDUs of at most 128 KiB, so each instance in two."""
    small_series(tmp_path / "series", slices=2, size=300)  # 176 KiB of pixels each
    result = storescu(scp.port, tmp_path / "series", "+sd", *options)
    assert result.returncode == 0, result.stderr
    [job] = scp.spool.jobs()
    assert job.n_instances == 2


@pytest.mark.usefixtures("require_dcmtk")
def test_dcmtk_echoscu_gets_success(scp: StorageSCP) -> None:
    result = dcmtk(ECHOSCU, "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1", scp.port)
    assert result.returncode == 0, result.stderr
