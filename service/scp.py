"""The DICOM listener: C-ECHO, and C-STORE of CT images into the spool.

The C-STORE handler only writes and records: the instance goes to the spool (temp file,
fsync, rename) and into the SQLite index, and only then is Success returned. Nothing is
parsed beyond the UIDs the index needs, and nothing is processed on the association thread.
The handler reads the data set only up to the Series Instance UID and encodes the file meta
itself: on a small machine its CPU time competes with the sender and pynetdicom's own threads.

References
----------
PS3.4 Annex B.2.3 (C-STORE statuses), PS3.8 Section 9.3.4 (A-ASSOCIATE-RJ reasons).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from enum import IntEnum
from io import BytesIO
from typing import Any, NamedTuple, cast

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    UncompressedTransferSyntaxes,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import Caller, NodeConfig, NodeSection
from liverfat.service.spool import InstanceInfo, Spool, StoreOutcome
from liverfat.service.tls import server_context

log = logging.getLogger(__name__)

CT_STORAGE_CLASSES = (CTImageStorage,)
# Refused at negotiation: the analysis reads single-frame CT only (dicom_io rejects multi-frame as
# unsupported_multiframe), so accepting these would only turn into a rejection after the transfer.
REFUSED_MULTIFRAME_CT = (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
VERIFICATION = UID("1.2.840.10008.1.1")  # PS3.4 Annex A, Verification SOP Class (C-ECHO)
SOP_INSTANCE_UID_TAG = 0x00080018
STUDY_UID_TAG = 0x0020000D
SERIES_UID_TAG = 0x0020000E
PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 Section 7.1

# A-ASSOCIATE-RJ: result "rejected-permanent", source "DICOM UL service-user" (PS3.8 Table 9-21)
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAGNOSTIC_CALLING_AE = 0x03
DIAGNOSTIC_CALLED_AE = 0x07

# Upper layer states (PS3.8 Section 9.2, as pynetdicom names them) in which a connection can close
# before any A-ASSOCIATE-RQ arrived: Sta2 awaits it; Sta13 follows our A-ABORT of an unrecognised PDU.
AWAITING_REQUEST_STATES = frozenset({"Sta2", "Sta13"})

# A-ASSOCIATE-RJ for a connection over [node] max_associations, as pynetdicom's own: "rejected-transient",
# source "DICOM UL service-provider (presentation related)", "local-limit-exceeded" (PS3.8 Table 9-21)
REJECTED_TRANSIENT = 0x02
SOURCE_PRESENTATION = 0x03
DIAGNOSTIC_LOCAL_LIMIT = 0x02

# Presentation context results (PS3.8 Table 9-18)
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03


class StoreStatus(IntEnum):
    """The C-STORE statuses this node answers (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC210


UID_MAX_LENGTH = 64  # PS3.5 Section 9.1


def make_ae(node: NodeSection) -> AE:
    """The listener's application entity: its title, limits and presentation contexts (no handlers)."""
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.network_timeout = node.network_timeout_s
    ae.acse_timeout = node.acse_timeout_s
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs (pynetdicom docs/examples/storage.rst)
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION)
    syntaxes = decodable_transfer_syntaxes()
    for sop_class in CT_STORAGE_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    return ae


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data this installation can decode: the only ones accepted."""
    decodable: list[str] = []
    for uid in map(UID, ALL_TRANSFER_SYNTAXES):
        if uid in UncompressedTransferSyntaxes:
            decodable.append(str(uid))
            continue
        try:
            if get_decoder(uid).is_available:
                decodable.append(str(uid))
        except NotImplementedError:
            continue
    return decodable


def refuse_caller(allowed: Sequence[Caller], ae_title: str, host: str) -> str | None:
    """Why the calling AE title at ``host`` may not associate, or ``None`` when it may."""
    if not allowed:
        return None
    ae_title = ae_title.strip()
    entries = [caller for caller in allowed if caller.ae_title.strip() == ae_title]
    if not entries:
        return f"calling AE title {ae_title!r} is not in [node] allowed_callers"
    if any(caller.host is None or caller.host == host for caller in entries):
        return None
    hosts = ", ".join(sorted(str(caller.host) for caller in entries))
    return f"calling AE title {ae_title!r} is allowed only from {hosts}, not from {host}"


class IndexUids(NamedTuple):
    """The UIDs the spool's index needs, as the data set holds them."""

    sop_instance_uid: str
    study_uid: str | None
    series_uid: str


def index_uids(dataset: bytes | memoryview, transfer_syntax: UID) -> IndexUids:
    """The SOP Instance, Study and Series Instance UIDs of an encoded data set (no file meta), read up to (0020,000E)."""
    if transfer_syntax.is_deflated:
        dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
    header = read_dataset(BytesIO(dataset), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                          stop_when=_after_series_uid, specific_tags=[SOP_INSTANCE_UID_TAG, STUDY_UID_TAG,
                                                                      SERIES_UID_TAG])  # fmt: skip
    study_uid = str(header.get("StudyInstanceUID", "")).strip()
    return IndexUids(str(header.get("SOPInstanceUID", "")).strip(), study_uid or None,
                     str(header.get("SeriesInstanceUID", "")).strip())  # fmt: skip


def check_uid(value: str) -> str | None:
    """Why ``value`` is not a UID under PS3.5 Section 9.1, or ``None`` when it is one.

    At most 64 characters, digits in dot-separated components, none empty. Components with a
    leading zero, which PS3.5 forbids, are let through: older equipment writes them and they
    are harmless as file names and index keys.
    """
    if not value:
        return "is empty"
    if len(value) > UID_MAX_LENGTH:
        return f"has {len(value)} characters, at most {UID_MAX_LENGTH} are allowed"
    if not all(part.isascii() and part.isdigit() for part in value.split(".")):
        return "is not digits in dot-separated components"
    return None


def _after_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > SERIES_UID_TAG


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 Section 7.1) to put before a received data set.

    The same bytes as pynetdicom's ``Event.encoded_dataset()`` writes, without building and
    encoding a pydicom ``FileMetaDataset`` (about half a millisecond per instance).
    """
    elements = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))  # fmt: skip
    return PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, explicit VR little endian (PS3.5 Section 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str, padding: bytes) -> bytes:
    encoded = value.encode("ascii", "replace")
    return encoded + padding * (len(encoded) % 2)


def _shown(value: str, limit: int = UID_MAX_LENGTH) -> str:
    """``value`` cut to ``limit`` characters for a log line, saying how long it was."""
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


def _is_storage(sop_class: str) -> bool:
    return issubclass(uid_to_service_class(sop_class), StorageServiceClass)


def _listed(names: Sequence[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class HandedConnections(AssociationServer):
    """An association server for connections another process accepted: it binds and listens on nothing.

    ``server_address`` stays the node's listening address, which each association reports as its own.
    """

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass


class StorageSCP:
    """The node's listener; call :meth:`start` (or :meth:`start_handed`) then :meth:`stop`.

    ``on_release`` receives the series UIDs stored during an association that ended with
    an A-RELEASE (the optional fast path to series completion); ``on_closed`` is called once
    per connection when it closes (the receiver processes count them for the node).
    """

    def __init__(self, config: NodeConfig, spool: Spool, on_release: Callable[[list[str]], None] | None = None,
                 on_closed: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.config = config
        self.spool = spool
        self.on_release = on_release
        self.on_closed = on_closed
        self._server: ThreadedAssociationServer | HandedConnections | None = None
        self._series_by_assoc: dict[int, set[str]] = {}
        self._over_limit: set[tuple[str, int]] = set()  # handed connections to refuse: the node's limit is reached
        self._lock = threading.Lock()
        self.ae = make_ae(config.node)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen on ``[node] host`` and ``port`` and serve the associations in this process."""
        address = (self.config.node.host, self.config.node.port)
        try:
            self._server = self.ae.start_server(address, block=False, evt_handlers=self._handlers(),
                                                ssl_context=_deferred_handshake(server_context(self.config.tls)))  # fmt: skip
        except OSError as error:
            raise cannot_listen(address, error) from error
        tls = " with TLS" if self.config.tls.enabled else ""
        log.info("listening as %s on %s:%d%s", self.config.node.ae_title, address[0], self.port, tls)

    def start_handed(self, address: tuple[str, int]) -> None:
        """Serve connections that the node accepted on ``address`` and hands to this process (:meth:`serve`)."""
        self._server = self.ae.make_server(address, evt_handlers=self._handlers(), server_class=HandedConnections,
                                           ssl_context=_deferred_handshake(server_context(self.config.tls)))  # fmt: skip

    def serve(self, connection: socket.socket, address: tuple[str, int], over_limit: bool = False) -> None:
        """Start an association on a connection accepted elsewhere (its own thread); ``start_handed`` first.

        ``over_limit``: the node holds ``[node] max_associations`` connections already; the
        association is refused as pynetdicom refuses one over its own limit. When this raises,
        no association started: ``on_closed`` is not called for the connection.
        """
        server = self._server
        assert isinstance(server, HandedConnections), "start_handed() first"
        if over_limit:
            with self._lock:
                self._over_limit.add(address)
        if server.ssl_context is not None:  # the handshake runs at the association's first read
            connection = server.ssl_context.wrap_socket(connection, server_side=True)
        server.finish_request(connection, address)  # creates the association and starts its thread

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]

    def stop(self) -> None:
        """Stop accepting and close every association (in-flight stores get no Success)."""
        server, self._server = self._server, None
        if isinstance(server, HandedConnections):  # never served forever: nothing to shut down but its sockets
            for assoc in server.active_associations:
                assoc.abort()
            server.server_close()
        elif server is not None:
            server.shutdown()
        self.ae.shutdown()

    # -- handlers (run on the association's thread) ---------------------------------------

    def _on_requested(self, event: Event) -> None:
        request = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ; negotiation has not run yet
        if request is None:
            return
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        host = str(event.assoc.requestor.address)
        with self._lock:
            over_limit = (host, event.assoc.requestor.port) in self._over_limit
        if over_limit:
            log.warning("refused association from %s at %s: %d associations are open already ([node] "
                        "max_associations); the sender may try again", calling, host,
                        self.config.node.max_associations)  # fmt: skip
            event.assoc.acse.send_reject(REJECTED_TRANSIENT, SOURCE_PRESENTATION, DIAGNOSTIC_LOCAL_LIMIT)
            event.assoc.kill()
            return
        why: str | None
        if called != self.config.node.ae_title.strip():
            why = f"called AE title {called!r} is not ours ({self.config.node.ae_title!r})"
            diagnostic = DIAGNOSTIC_CALLED_AE
        else:
            why, diagnostic = refuse_caller(self.config.node.allowed_callers, calling, host), DIAGNOSTIC_CALLING_AE
        if why is not None:
            log.warning("refused association from %s at %s: %s", calling, host, why)
            event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
            event.assoc.kill()  # waits until the A-ASSOCIATE-RJ is out, as pynetdicom's own rejections do

    def _on_accepted(self, event: Event) -> None:
        """Log the refused presentation contexts at a level that says whether anything was lost.

        Refusals are ordinary negotiation (Orthanc proposes query/retrieve classes with each
        C-ECHO, dcmtk's storescu every storage class it knows): DEBUG. Multi-frame CT is
        refused on purpose: INFO, with the reason. A sender that proposed storage and got no
        CT Image Storage context meant to send something this node does not take: WARNING.
        """
        refused = event.assoc.rejected_contexts
        if not refused:
            return
        calling = str(event.assoc.requestor.ae_title).strip()
        unknown_class = [c for c in refused if c.result == ABSTRACT_SYNTAX_NOT_SUPPORTED]
        multiframe = sorted({UID(str(c.abstract_syntax)).name for c in unknown_class
                             if c.abstract_syntax in REFUSED_MULTIFRAME_CT})  # fmt: skip
        classes = sorted({UID(str(c.abstract_syntax)).name for c in unknown_class
                          if c.abstract_syntax not in REFUSED_MULTIFRAME_CT})  # fmt: skip
        syntaxes = sorted({UID(str(c.abstract_syntax)).name for c in refused if c not in unknown_class})
        accepted_ct = any(c.abstract_syntax in CT_STORAGE_CLASSES for c in event.assoc.accepted_contexts)
        lost = not accepted_ct and (bool(syntaxes) or any(_is_storage(str(c.abstract_syntax)) for c in unknown_class))
        level = logging.WARNING if lost else logging.DEBUG
        if multiframe:
            log.info("refused %s from %s: multi-frame CT is not analysed here; send the series as single-frame "
                     "CT Image Storage (see docs/connect-to-pacs.md)", _listed(multiframe), calling)  # fmt: skip
        if classes:
            log.log(level, "refused %d presentation context(s) from %s: this node accepts only CT Image Storage "
                    "and Verification, not %s", len(classes), calling, _listed(classes))  # fmt: skip
        if syntaxes:
            log.log(level, "refused presentation context(s) for %s from %s: none of the proposed transfer syntaxes "
                    "can be decoded here", _listed(syntaxes), calling)  # fmt: skip

    def _on_echo(self, event: Event) -> int:
        log.debug("C-ECHO from %s", str(event.assoc.requestor.ae_title).strip())
        return int(StoreStatus.SUCCESS)

    def _on_store(self, event: Event) -> int:
        # The received data set as pynetdicom holds it, without the copy ``Event.encoded_dataset`` makes;
        # the view is released before pynetdicom is handed the answer.
        with cast(BytesIO, cast(C_STORE, event.request).DataSet).getbuffer() as dataset:
            return self._store(event, dataset)

    def _store(self, event: Event, dataset: memoryview) -> int:
        request = cast(C_STORE, event.request)
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_uid = str(request.AffectedSOPInstanceUID)
        sop_class = str(request.AffectedSOPClassUID)
        transfer_syntax = UID(event.context.transfer_syntax)
        try:
            indexed = index_uids(dataset, transfer_syntax)
        except RecursionError:  # one line, not pynetdicom's logged traceback of a thousand frames
            log.warning("answered 0xC210 to %s for instance %s: its sequences are nested too deep to read",
                        calling, _shown(sop_uid))  # fmt: skip
            return int(StoreStatus.CANNOT_UNDERSTAND)
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError, zlib.error) as error:
            log.warning("answered 0xC210 to %s for instance %s: it cannot be read: %s", calling, _shown(sop_uid),
                        _shown(str(error), 200))  # fmt: skip
            return int(StoreStatus.CANNOT_UNDERSTAND)
        study_uid, series_uid = indexed.study_uid, indexed.series_uid
        uids = {"(0000,1000) 'Affected SOP Instance UID'": sop_uid, "(0020,000E) 'Series Instance UID'": series_uid}
        uids |= {"(0020,000D) 'Study Instance UID'": study_uid} if study_uid is not None else {}
        uids |= {"(0008,0018) 'SOP Instance UID'": indexed.sop_instance_uid} if indexed.sop_instance_uid else {}
        invalid = [f"{name} {why}" for name, uid in uids.items() if (why := check_uid(uid))]
        if invalid:  # the sender's error (not Out of Resources, which it would retry forever)
            log.warning("answered 0xC210 to %s for instance %s: %s (PS3.5 Section 9.1)", calling, _shown(sop_uid),
                        "; ".join(invalid))  # fmt: skip
            return int(StoreStatus.CANNOT_UNDERSTAND)
        info = InstanceInfo(sop_uid, sop_class, series_uid, study_uid, calling)
        try:
            outcome = self.spool.store_instance(part10_header(sop_class, sop_uid, transfer_syntax) + dataset, info)
        except LiverfatError as error:
            log.error("answered 0xA700 Out of Resources to %s for instance %s [%s]: %s",
                      calling, sop_uid, error.reason.value, error.message)  # fmt: skip
            return int(StoreStatus.OUT_OF_RESOURCES)
        with self._lock:
            self._series_by_assoc.setdefault(id(event.assoc), set()).add(series_uid)
        if outcome is StoreOutcome.DUPLICATE:
            log.debug("instance %s of series %s from %s is already held: accepted, not stored again", sop_uid,
                      series_uid, calling)  # fmt: skip
        else:
            log.debug("stored instance %s of series %s from %s", sop_uid, series_uid, calling)
        return int(StoreStatus.SUCCESS)

    def _on_released(self, event: Event) -> None:
        with self._lock:
            series = sorted(self._series_by_assoc.pop(id(event.assoc), set()))
        if series and self.on_release is not None:
            self.on_release(series)

    def _on_closed(self, event: Event) -> None:
        """Forget the association's series; free the slot of a connection that closed before associating."""
        with self._lock:
            self._series_by_assoc.pop(id(event.assoc), None)
            self._over_limit.discard((str(event.assoc.requestor.address), event.assoc.requestor.port))
        release_waiting_acceptor(event.assoc)
        if self.on_closed is not None:
            self.on_closed()


def cannot_listen(address: tuple[str, int], error: OSError) -> LiverfatError:
    """The error for a listening address that cannot be bound (in use, not this host's)."""
    why = f"cannot listen on {address[0]}:{address[1]} ([node] host, port): {error}"
    return LiverfatError(Reason.CONFIG_INVALID, why)


class HandshakeOnFirstRead:
    """Stands in for the listener's ``SSLContext``: wraps accepted sockets without the TLS handshake.

    pynetdicom wraps each accepted socket on the listener's one accepting thread, and
    ``SSLContext.wrap_socket`` does the server handshake right there by default, so a single
    TCP connection that never sends a ClientHello stopped the listener accepting anyone.
    Deferred, the handshake runs on the association's own thread at its first read, under
    ``acse_timeout_s`` like any connection that has not associated yet.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def wrap_socket(self, sock: socket.socket, server_side: bool = False) -> ssl.SSLSocket:
        return self.context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)


def _deferred_handshake(context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    # pynetdicom's listener only calls ``wrap_socket(sock, server_side=True)`` on its context
    return None if context is None else cast(ssl.SSLContext, HandshakeOnFirstRead(context))


def release_waiting_acceptor(assoc: Association) -> None:
    """End an acceptor thread still waiting for an A-ASSOCIATE-RQ on a connection that is now closed.

    pynetdicom's acceptor waits for the request on its DUL queue for the whole ACSE timeout
    even when the peer has gone (a port monitor's bare connect), holding one of
    ``maximum_associations`` slots meanwhile. An empty item on that queue is what the wait
    returns on timeout, so the thread closes the association and ends at once.
    """
    dul = assoc.dul
    waiting = assoc.is_acceptor and assoc.requestor.primitive is None
    if waiting and dul.state_machine.current_state in AWAITING_REQUEST_STATES:
        dul.to_user_queue.put(None)  # type: ignore[arg-type]  # the timeout's "nothing received"
