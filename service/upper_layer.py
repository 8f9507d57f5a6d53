"""The node's side of a DICOM association (PS3.8): one thread per connection, for C-ECHO and C-STORE.

Why not pynetdicom's ``Association``: it runs two threads per association that poll (1 ms
sleeps) and hand each PDU from one to the other, and builds a pydicom ``Dataset`` for every
command. Each instance waited on those sleeps, and four associations spent the receivers'
CPU on the polling: the node took 0.67 of Orthanc's rate at four associations with two
receiver processes. Here one thread blocks on its socket, reads each PDU with one copy,
gathers the message's fragments and answers as soon as the handler has. pynetdicom still
decodes the A-ASSOCIATE-RQ, negotiates the presentation contexts and encodes the
A-ASSOCIATE-AC (its ``pdu`` and ``presentation`` modules): what is hand-written here is the
data transfer of the two services the node provides, and the release and abort.

The acceptor's state machine, reduced to what an acceptor of C-ECHO and C-STORE meets
(PS3.8 Section 9.2): wait for the A-ASSOCIATE-RQ (``acse_timeout_s``, the ARTIM timer), answer
AC or RJ, then read P-DATA-TF until an A-RELEASE-RQ (answered RP), an A-ABORT, the peer's close,
``network_timeout_s`` of silence (A-ABORT) or a PDU that does not belong (A-ABORT). After an RJ,
RP the connection is closed when the peer closes it, or after the ARTIM timeout; after an A-ABORT
at once.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from liverfat import __version__
from liverfat.service.dimse_command import Command, CommandError, CommandField, decode_command, encode_response

log = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # the DICOM application context (PS3.7 Annex A.2.1)
# This implementation's class UID (PS3.7 Annex D.3.3.2): a UUID-derived UID (PS3.5 Annex B.2), fixed.
IMPLEMENTATION_CLASS_UID = "2.25.83078311714575975987019620286699395891"
IMPLEMENTATION_VERSION_NAME = f"LIVERFAT_{__version__}"[:16]
# The largest P-DATA-TF the node accepts, announced in the A-ASSOCIATE-AC: dcmtk sends 128 KiB
# PDUs whatever is announced above it, pynetdicom a whole instance in one up to this size.
MAX_PDU_LENGTH = 4 * 2**20
VERIFICATION = "1.2.840.10008.1.1"
# A C-STORE data set above this is read to its end but not held, and answered 0xC210: a 4096 x 4096
# slice of 16 bits is 32 MiB, and without a bound a sender could make the node hold gigabytes.
MAX_DATA_SET_BYTES = 256 * 2**20

# PDU types (PS3.8 Section 9.3)
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

# A-ABORT source and reasons (PS3.8 Table 9-26)
ABORT_SOURCE_PROVIDER = 0x02
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06

# Statuses the upper layer answers itself (PS3.7 Annex C)
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNISED_OPERATION = 0x0211
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0xC211  # a failure the standard leaves to the implementation (PS3.4 Annex B.2.3)

_PDU_HEADER = struct.Struct(">BxI")  # type, reserved, length
_PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context ID, message control header
COMMAND_FRAGMENT = 0x01  # message control header bits (PS3.8 Annex E.2)
LAST_FRAGMENT = 0x02


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ's result, source and reason/diagnostic (PS3.8 Table 9-21)."""

    result: int
    source: int
    diagnostic: int


@dataclass
class Association:
    """One connection's association as the handlers see it."""

    address: tuple[str, int]  # the peer's host and port
    calling_ae_title: str = ""
    called_ae_title: str = ""
    accepted: dict[int, PresentationContext] = field(default_factory=dict)  # by presentation context ID
    rejected: list[PresentationContext] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """The acceptor's AE title, the contexts it supports and its timeouts."""

    ae_title: str
    supported_contexts: Sequence[PresentationContext]
    acse_timeout_s: float  # for the A-ASSOCIATE-RQ (and the TLS handshake), and for the peer's close at the end
    network_timeout_s: float  # of silence in an established association


class Handlers(Protocol):
    """What the service does with an association; each is called on the connection's thread."""

    def requested(self, association: Association) -> Rejection | None:
        """The A-ASSOCIATE-RQ arrived (titles and address are set): a rejection, or ``None`` to negotiate."""

    def accepted(self, association: Association) -> None:
        """The contexts are negotiated (set on the association); the A-ASSOCIATE-AC is sent next."""

    def store(self, association: Association, command: Command, transfer_syntax: UID, dataset: memoryview) -> int:
        """A C-STORE-RQ and its data set (valid only during the call): the status to answer."""

    def released(self, association: Association) -> None:
        """The peer released the association (the A-RELEASE-RP is sent)."""


class ProtocolError(Exception):
    """The peer broke the protocol: the association is aborted with ``reason`` (PS3.8 Table 9-26)."""

    def __init__(self, message: str, reason: int = ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class _Closed(Exception):
    """The peer closed the connection."""


def serve(connection: socket.socket, association: Association, settings: Settings, handlers: Handlers) -> None:
    """Run the association on ``connection`` until it ends; closes the connection.

    An ``ssl.SSLSocket`` made with ``do_handshake_on_connect=False`` is handshaken here, under
    ``acse_timeout_s``. Errors of the connection and of the peer are logged, never raised.
    """
    try:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each answer is one small PDU
        connection.settimeout(settings.acse_timeout_s)
        if isinstance(connection, ssl.SSLSocket):
            connection.do_handshake()
        _Conversation(connection, association, settings, handlers).run()
    except (_Closed, ConnectionError):
        log.debug("the connection from %s closed", association.address[0])
    except ssl.SSLError as error:
        log.warning("closed the connection from %s: TLS failed: %s", association.address[0], error)
    except TimeoutError:
        log.info("closed the connection from %s: no A-ASSOCIATE-RQ within %g s ([node] acse_timeout_s)",
                 association.address[0], settings.acse_timeout_s)  # fmt: skip
    except OSError as error:
        log.debug("the connection from %s failed: %s", association.address[0], error)
    except Exception:  # a handler's or a decoder's bug: this connection ends, the node keeps serving
        log.exception("the association from %s at %s failed", association.calling_ae_title or "a peer",
                      association.address[0])  # fmt: skip
    finally:
        connection.close()


class _Conversation:
    """The PDUs of one association, in order (see the module docstring)."""

    def __init__(self, connection: socket.socket, association: Association, settings: Settings,
                 handlers: Handlers) -> None:  # fmt: skip
        self.connection = connection
        self.association = association
        self.settings = settings
        self.handlers = handlers
        self._header = bytearray(_PDU_HEADER.size)

    def run(self) -> None:
        try:
            request = self._read_request()
        except ProtocolError as error:
            self._abort(error.reason, str(error))
            return
        rejection = self.handlers.requested(self.association)
        if rejection is None and str(request.application_context_name) != APPLICATION_CONTEXT_NAME:
            log.warning("refused association from %s at %s: unknown application context %s",
                        self.association.calling_ae_title, self.association.address[0],
                        request.application_context_name)  # fmt: skip
            rejection = Rejection(0x01, 0x01, 0x02)  # permanent, service-user, application context not supported
        if rejection is not None:
            self._send(struct.pack(">BxIxBBB", A_ASSOCIATE_RJ_PDU, 4, rejection.result, rejection.source,
                                   rejection.diagnostic))  # fmt: skip
            self._await_close()
            return
        accept = self._accept(request)
        self.handlers.accepted(self.association)
        self.connection.settimeout(self.settings.network_timeout_s)
        self._send(accept)
        try:
            self._transfer()
        except ProtocolError as error:
            self._abort(error.reason, str(error))
        except (_Closed, ConnectionError):
            log.info("the association from %s at %s ended without a release: its connection closed",
                     self.association.calling_ae_title, self.association.address[0])  # fmt: skip
        except TimeoutError:
            self._abort(ABORT_NOT_SPECIFIED, f"no PDU for {self.settings.network_timeout_s:g} s "
                                             "([node] network_timeout_s)")  # fmt: skip

    def _read_request(self) -> A_ASSOCIATE:
        """The A-ASSOCIATE-RQ, decoded by pynetdicom; the titles are set on the association."""
        pdu_type, body = self._read_pdu(deadline=time.monotonic() + self.settings.acse_timeout_s)
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise ProtocolError(f"a PDU of type 0x{pdu_type:02X} before any A-ASSOCIATE-RQ")
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(_PDU_HEADER.pack(A_ASSOCIATE_RQ_PDU, len(body)) + body)
            request = pdu.to_primitive()
        except Exception as error:  # pynetdicom's decoders raise what the bytes provoke
            raise ProtocolError(f"the A-ASSOCIATE-RQ cannot be read: {error!r}", ABORT_INVALID_PARAMETER) from error
        self.association.calling_ae_title = str(request.calling_ae_title).strip()
        self.association.called_ae_title = str(request.called_ae_title).strip()
        return request

    def _accept(self, request: A_ASSOCIATE) -> bytes:
        """Negotiate the presentation contexts and roles (pynetdicom's rules); the encoded A-ASSOCIATE-AC."""
        roles = {UID(str(item.sop_class_uid)): (item.scu_role, item.scp_role) for item in request.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}  # fmt: skip
        contexts, role_items = negotiate_as_acceptor(request.presentation_context_definition_list,
                                                     list(self.settings.supported_contexts), roles or None)  # fmt: skip
        self.association.accepted = {int(cx.context_id or 0): cx for cx in contexts if cx.result == 0x00}
        self.association.rejected = [cx for cx in contexts if cx.result != 0x00]
        accept = A_ASSOCIATE()
        accept.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result, accept.result_source = 0x00, 0x01
        accept.presentation_context_definition_results_list = contexts
        maximum_length = MaximumLengthNotification()
        maximum_length.maximum_length_received = MAX_PDU_LENGTH
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        accept.user_information = [maximum_length, class_uid, version, *role_items]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(accept)
        return bytes(pdu.encode())

    def _transfer(self) -> None:
        """P-DATA-TF until the association ends: each complete message is answered."""
        message = _Message()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == P_DATA_TF_PDU:
                for context_id, control, start, end in _fragments(body):
                    if context_id not in self.association.accepted:  # checked before a data set is gathered
                        raise ProtocolError(f"a message on presentation context {context_id}, which was not "
                                            "accepted", ABORT_INVALID_PARAMETER)  # fmt: skip
                    if message.add(context_id, control, memoryview(body)[start:end]):
                        self._answer(message)
                        message = _Message()
            elif pdu_type == A_RELEASE_RQ_PDU:
                if message.context_id is not None:
                    raise ProtocolError("an A-RELEASE-RQ in the middle of a message")
                self._send(struct.pack(">BxI4x", A_RELEASE_RP_PDU, 4))
                self.handlers.released(self.association)
                self._await_close()
                return
            elif pdu_type == A_ABORT_PDU:
                log.info("the association from %s at %s was aborted by the peer",
                         self.association.calling_ae_title, self.association.address[0])  # fmt: skip
                return
            else:
                raise ProtocolError(f"a PDU of type 0x{pdu_type:02X} in an established association")

    def _answer(self, message: _Message) -> None:
        command, context_id = message.command, message.context_id
        assert command is not None and context_id is not None
        context = self.association.accepted[context_id]
        abstract_syntax = str(context.abstract_syntax)
        if command.command_field == CommandField.C_ECHO_RQ and abstract_syntax == VERIFICATION:
            log.debug("C-ECHO from %s", self.association.calling_ae_title)
            status = SUCCESS
        elif command.command_field == CommandField.C_STORE_RQ and abstract_syntax != VERIFICATION:
            if command.affected_sop_class_uid != abstract_syntax:
                status = SOP_CLASS_NOT_SUPPORTED  # the context was negotiated for another class
            elif message.dataset_bytes > MAX_DATA_SET_BYTES:
                log.warning("answered 0xC210 to %s for instance %s: its data set has %d bytes, above the %d MiB "
                            "that any single-frame CT stays far below", self.association.calling_ae_title,
                            command.affected_sop_instance_uid, message.dataset_bytes, MAX_DATA_SET_BYTES // 2**20)  # fmt: skip
                status = CANNOT_UNDERSTAND
            else:
                status = self._store(command, UID(str(context.transfer_syntax[0])), message.dataset)
        else:
            status = UNRECOGNISED_OPERATION
        self._send(_command_pdu(context_id, encode_response(command, status)))

    def _store(self, command: Command, transfer_syntax: UID, dataset: bytearray) -> int:
        """The handler's status; a handler that raises is logged and answered 0xC211, the association goes on."""
        try:
            with memoryview(dataset) as view:
                return self.handlers.store(self.association, command, transfer_syntax, view)
        except Exception:
            log.exception("answered 0xC211 to %s for instance %s: storing it failed",
                          self.association.calling_ae_title, command.affected_sop_instance_uid)  # fmt: skip
            return PROCESSING_FAILURE

    def _read_pdu(self, deadline: float | None = None) -> tuple[int, bytearray]:
        """The next PDU's type and body; by ``deadline`` (monotonic) when given, however slowly it comes."""
        _read_into(self.connection, memoryview(self._header), deadline)
        pdu_type, length = _PDU_HEADER.unpack(self._header)
        if pdu_type not in KNOWN_PDU_TYPES:
            raise ProtocolError(f"an unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
        if length > MAX_PDU_LENGTH + 6 * 1024:  # the data's limit and room for the PDV headers
            raise ProtocolError(f"a PDU of {length} bytes, above the {MAX_PDU_LENGTH} announced",
                                ABORT_INVALID_PARAMETER)  # fmt: skip
        body = bytearray(length)
        _read_into(self.connection, memoryview(body), deadline)
        return pdu_type, body

    def _abort(self, reason: int, why: str) -> None:
        title = self.association.calling_ae_title or "a peer"
        log.warning("aborted the association from %s at %s: %s", title, self.association.address[0], why)
        try:  # closed at once after it: a peer that broke the protocol does not keep its slot for the ARTIM time
            self._send(struct.pack(">BxIxxBB", A_ABORT_PDU, 4, ABORT_SOURCE_PROVIDER, reason))
        except OSError:
            pass  # the peer is gone already

    def _send(self, pdu: bytes) -> None:
        self.connection.sendall(pdu)

    def _await_close(self) -> None:
        """Wait, up to the ARTIM timeout, for the peer to close the connection (PS3.8 Section 9.1.5)."""
        deadline = time.monotonic() + self.settings.acse_timeout_s
        scratch = memoryview(bytearray(4096))
        try:
            while True:
                _read_into(self.connection, scratch, deadline)
        except (_Closed, OSError):
            pass  # closed, timed out or reset: closed by us now


class _Message:
    """The fragments of one DIMSE message as they arrive (PS3.8 Annex E)."""

    def __init__(self) -> None:
        self.context_id: int | None = None
        self.command: Command | None = None
        self._command = bytearray()
        self.dataset = bytearray()
        self.dataset_bytes = 0  # as received: above MAX_DATA_SET_BYTES the data is dropped, not kept

    def add(self, context_id: int, control: int, data: memoryview) -> bool:
        """Add one fragment; whether the message is now complete."""
        if self.context_id is None:
            self.context_id = context_id
        elif context_id != self.context_id:
            raise ProtocolError("a fragment on another presentation context in the middle of a message")
        if control & COMMAND_FRAGMENT:
            if self.command is not None:
                raise ProtocolError("a command fragment after the command's last")
            self._command += data
            if not control & LAST_FRAGMENT:
                return False
            try:
                self.command = decode_command(self._command)
            except CommandError as error:
                raise ProtocolError(f"the command set cannot be read: {error}", ABORT_INVALID_PARAMETER) from error
            return not self.command.has_data_set
        if self.command is None or not self.command.has_data_set:
            raise ProtocolError("a data set fragment that no command announced")
        self.dataset_bytes += len(data)
        if self.dataset_bytes > MAX_DATA_SET_BYTES:
            self.dataset = bytearray()  # read to its end (the association goes on), never held
        else:
            self.dataset += data
        return bool(control & LAST_FRAGMENT)


def _fragments(body: bytearray) -> list[tuple[int, int, int, int]]:
    """The presentation data values of a P-DATA-TF: context ID, control header, start and end of the data."""
    fragments: list[tuple[int, int, int, int]] = []
    offset = 0
    while offset < len(body):
        if offset + _PDV_HEADER.size > len(body):
            raise ProtocolError("a P-DATA-TF ends inside a PDV header", ABORT_INVALID_PARAMETER)
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            raise ProtocolError(f"a PDV of {length} bytes does not fit its P-DATA-TF", ABORT_INVALID_PARAMETER)
        fragments.append((context_id, control, offset + _PDV_HEADER.size, end))
        offset = end
    if not fragments:
        raise ProtocolError("an empty P-DATA-TF", ABORT_INVALID_PARAMETER)
    return fragments


def _command_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF holding ``command`` as one last command fragment."""
    pdv = _PDV_HEADER.pack(2 + len(command), context_id, COMMAND_FRAGMENT | LAST_FRAGMENT) + command
    return _PDU_HEADER.pack(P_DATA_TF_PDU, len(pdv)) + pdv


def _read_into(connection: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` from the connection; :class:`_Closed` when the peer closes first.

    With a ``deadline`` (monotonic), ``TimeoutError`` once it passes; without, the connection's own
    timeout bounds each read.
    """
    while view:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            connection.settimeout(remaining)
        read = connection.recv_into(view)
        if not read:
            raise _Closed
        view = view[read:]
