"""The DICOM listener: C-ECHO, and C-STORE of CT images into the spool.

The C-STORE handler only writes and records: the instance goes to the spool (temp file,
fsync, rename) and into the SQLite index, and only then is Success returned. Nothing is
parsed beyond the UIDs the index needs, and nothing is processed on the association's thread.
The handler reads the data set only up to the Series Instance UID and encodes the file meta
itself: on a small machine its CPU time competes with the sender and the other associations.
The associations themselves run in :mod:`liverfat.service.upper_layer`, one thread each.

References
----------
PS3.4 Annex B.2.3 (C-STORE statuses), PS3.8 Section 9.3.4 (A-ASSOCIATE-RJ reasons).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from enum import IntEnum
from io import BytesIO
from typing import NamedTuple

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
from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import Caller, NodeConfig, NodeSection
from liverfat.service.dimse_command import Command
from liverfat.service.spool import InstanceInfo, Spool, StoreOutcome
from liverfat.service.tls import server_context
from liverfat.service.upper_layer import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Association,
    Rejection,
    Settings,
    serve,
)

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

# A-ASSOCIATE-RJ for a connection over [node] max_associations, as pynetdicom's: "rejected-transient",
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


STOP_S = 10.0  # stop() waits this long for each association's thread after closing its connection
ACCEPT_RETRY_S = 0.1  # after accept() failed (too many open files)


def acceptor_settings(node: NodeSection) -> Settings:
    """The listener's AE title, presentation contexts and timeouts."""
    syntaxes = decodable_transfer_syntaxes()
    contexts = [build_context(VERIFICATION), *(build_context(sop_class, syntaxes) for sop_class in CT_STORAGE_CLASSES)]
    return Settings(node.ae_title, contexts, node.acse_timeout_s, node.network_timeout_s)


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

    The same bytes as pynetdicom's ``Event.encoded_dataset()`` writes, with this implementation's
    class UID and version name, without building and encoding a pydicom ``FileMetaDataset`` (about
    half a millisecond per instance).
    """
    elements = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME, b" ")),
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


class StorageSCP:
    """The node's listener; call :meth:`start` (or :meth:`start_handed`) then :meth:`stop`.

    Each connection runs on its own thread (:func:`upper_layer.serve`) with this object's
    handlers. ``on_release`` receives the series UIDs stored during an association that ended
    with an A-RELEASE (the optional fast path to series completion); ``on_closed`` is called once
    per connection when it closes (the receiver processes count them for the node).
    """

    def __init__(self, config: NodeConfig, spool: Spool, on_release: Callable[[list[str]], None] | None = None,
                 on_closed: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.config = config
        self.spool = spool
        self.on_release = on_release
        self.on_closed = on_closed
        self.settings = acceptor_settings(config.node)
        self._tls = server_context(config.tls)
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] | None = None  # the listening address, once started
        self._connections: dict[socket.socket, threading.Thread] = {}  # open connections (under the lock)
        self._series_by_assoc: dict[int, set[str]] = {}
        self._over_limit: set[int] = set()  # ids of the associations to refuse: the node's limit is reached
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._address is None:
            raise RuntimeError("the listener is not started")
        return self._address[1]

    @property
    def running(self) -> bool:
        return self._address is not None

    @property
    def open_connections(self) -> int:
        """Connections being served: each holds one of ``[node] max_associations`` slots until it closes."""
        with self._lock:
            return len(self._connections)

    def start(self) -> None:
        """Listen on ``[node] host`` and ``port`` and serve the associations in this process."""
        node = self.config.node
        listener = listen((node.host, node.port))
        self._listener, self._address = listener, (node.host, int(listener.getsockname()[1]))
        threading.Thread(target=self._accept, args=(listener,), name="liverfat-accept", daemon=True).start()
        tls = " with TLS" if self.config.tls.enabled else ""
        log.info("listening as %s on %s:%d%s", node.ae_title, node.host, self.port, tls)

    def start_handed(self, address: tuple[str, int]) -> None:
        """Serve connections that the node accepted on ``address`` and hands to this process (:meth:`serve`)."""
        self._address = address

    def serve(self, connection: socket.socket, address: tuple[str, int], over_limit: bool = False) -> None:
        """Start an association on a connection accepted elsewhere (its own thread); ``start_handed`` first.

        ``over_limit``: the node holds ``[node] max_associations`` connections already; the
        association is refused with "local limit exceeded". When this raises, no association
        started: ``on_closed`` is not called for the connection.
        """
        assert self._address is not None and self._listener is None, "start_handed() first"
        self._start_thread(connection, address, over_limit)

    def stop(self) -> None:
        """Stop accepting and close every association (in-flight stores get no Success)."""
        listener, self._listener, self._address = self._listener, None, None
        if listener is not None:
            close_listening(listener)
        with self._lock:
            connections = dict(self._connections)
        for connection in connections:
            shut(connection, socket.SHUT_RDWR)
        for thread in connections.values():
            thread.join(STOP_S)

    def _accept(self, listener: socket.socket) -> None:
        accept_each(listener, lambda: self._listener is not listener, self._take)

    def _take(self, connection: socket.socket, address: tuple[str, int]) -> None:
        with self._lock:
            over_limit = len(self._connections) >= self.config.node.max_associations
        try:
            self._start_thread(connection, address, over_limit)
        except OSError as error:  # gone before it was served (TLS wraps need a connected socket)
            log.debug("the connection from %s closed before it was served: %s", address[0], error)
            connection.close()

    def _start_thread(self, connection: socket.socket, address: tuple[str, int], over_limit: bool) -> None:
        association = Association((str(address[0]), int(address[1])))
        if self._tls is not None:  # the handshake runs on the connection's thread, under acse_timeout_s
            connection = self._tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        thread = threading.Thread(target=self._serve, args=(connection, association), daemon=True,
                                  name=f"liverfat-association-{address[0]}:{address[1]}")  # fmt: skip
        with self._lock:
            self._connections[connection] = thread
            if over_limit:
                self._over_limit.add(id(association))
        thread.start()

    def _serve(self, connection: socket.socket, association: Association) -> None:
        try:
            serve(connection, association, self.settings, self)
        finally:
            with self._lock:
                del self._connections[connection]
                self._series_by_assoc.pop(id(association), None)
                self._over_limit.discard(id(association))
            if self.on_closed is not None:
                self.on_closed()

    # -- handlers (run on the association's thread) ---------------------------------------

    def requested(self, association: Association) -> Rejection | None:
        calling, host = association.calling_ae_title, association.address[0]
        with self._lock:
            over_limit = id(association) in self._over_limit
        if over_limit:
            log.warning("refused association from %s at %s: %d associations are open already ([node] "
                        "max_associations); the sender may try again", calling, host,
                        self.config.node.max_associations)  # fmt: skip
            return Rejection(REJECTED_TRANSIENT, SOURCE_PRESENTATION, DIAGNOSTIC_LOCAL_LIMIT)
        why: str | None
        if association.called_ae_title != self.config.node.ae_title.strip():
            why = f"called AE title {association.called_ae_title!r} is not ours ({self.config.node.ae_title!r})"
            diagnostic = DIAGNOSTIC_CALLED_AE
        else:
            why, diagnostic = refuse_caller(self.config.node.allowed_callers, calling, host), DIAGNOSTIC_CALLING_AE
        if why is None:
            return None
        log.warning("refused association from %s at %s: %s", calling, host, why)
        return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic)

    def accepted(self, association: Association) -> None:
        """Log the refused presentation contexts at a level that says whether anything was lost.

        Refusals are ordinary negotiation (Orthanc proposes query/retrieve classes with each
        C-ECHO, dcmtk's storescu every storage class it knows): DEBUG. Multi-frame CT is
        refused on purpose: INFO, with the reason. A sender that proposed storage and got no
        CT Image Storage context meant to send something this node does not take: WARNING.
        """
        refused = association.rejected
        if not refused:
            return
        calling = association.calling_ae_title
        unknown_class = [c for c in refused if c.result == ABSTRACT_SYNTAX_NOT_SUPPORTED]
        multiframe = sorted({UID(str(c.abstract_syntax)).name for c in unknown_class
                             if c.abstract_syntax in REFUSED_MULTIFRAME_CT})  # fmt: skip
        classes = sorted({UID(str(c.abstract_syntax)).name for c in unknown_class
                          if c.abstract_syntax not in REFUSED_MULTIFRAME_CT})  # fmt: skip
        syntaxes = sorted({UID(str(c.abstract_syntax)).name for c in refused if c not in unknown_class})
        accepted_ct = any(c.abstract_syntax in CT_STORAGE_CLASSES for c in association.accepted.values())
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

    def store(self, association: Association, command: Command, transfer_syntax: UID, dataset: memoryview) -> int:
        calling = association.calling_ae_title
        sop_uid, sop_class = command.affected_sop_instance_uid, command.affected_sop_class_uid
        try:
            indexed = index_uids(dataset, transfer_syntax)
        except RecursionError:  # one line, not a logged traceback of a thousand frames
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
            self._series_by_assoc.setdefault(id(association), set()).add(series_uid)
        if outcome is StoreOutcome.DUPLICATE:
            log.debug("instance %s of series %s from %s is already held: accepted, not stored again", sop_uid,
                      series_uid, calling)  # fmt: skip
        else:
            log.debug("stored instance %s of series %s from %s", sop_uid, series_uid, calling)
        return int(StoreStatus.SUCCESS)

    def released(self, association: Association) -> None:
        with self._lock:
            series = sorted(self._series_by_assoc.pop(id(association), set()))
        if series and self.on_release is not None:
            self.on_release(series)


def cannot_listen(address: tuple[str, int], error: OSError) -> LiverfatError:
    """The error for a listening address that cannot be bound (in use, not this host's)."""
    why = f"cannot listen on {address[0]}:{address[1]} ([node] host, port): {error}"
    return LiverfatError(Reason.CONFIG_INVALID, why)


def listen(address: tuple[str, int]) -> socket.socket:
    """A socket listening on ``address`` (IPv6 where the host is one); a clear error when it cannot."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        return socket.create_server(address, family=family, backlog=64)
    except OSError as error:
        raise cannot_listen(address, error) from error


def accept_each(listener: socket.socket, stopped: Callable[[], bool],
                take: Callable[[socket.socket, tuple[str, int]], None]) -> None:  # fmt: skip
    """Accept connections on ``listener`` and give each to ``take``, until an accept fails once ``stopped()``.

    An accept that fails while running (too many open files) is logged and tried again shortly.
    """
    while True:
        try:
            connection, address = listener.accept()
        except OSError as error:
            if stopped():
                return  # the listener was closed
            log.warning("cannot accept a connection: %s", error)  # too many open files: wait for some to close
            time.sleep(ACCEPT_RETRY_S)
            continue
        take(connection, (str(address[0]), int(address[1])))


def close_listening(listener: socket.socket) -> None:
    """Close a listening socket and wake the thread blocked in its ``accept()`` (Linux; ``close`` alone does not)."""
    shut(listener, socket.SHUT_RDWR)
    listener.close()


def shut(sock: socket.socket, how: int) -> None:
    """``sock.shutdown(how)``, whatever state the connection is in."""
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed by its peer
