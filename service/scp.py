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
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from enum import IntEnum
from io import BytesIO
from typing import Any, cast

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    UncompressedTransferSyntaxes,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from liverfat.dicom_io.errors import LiverfatError, Reason
from liverfat.service.config import Caller, NodeConfig, NodeSection
from liverfat.service.spool import InstanceInfo, Spool, StoreOutcome
from liverfat.service.tls import server_context

log = logging.getLogger(__name__)

CT_STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
VERIFICATION = UID("1.2.840.10008.1.1")  # PS3.4 Annex A, Verification SOP Class (C-ECHO)
STUDY_UID_TAG = 0x0020000D
SERIES_UID_TAG = 0x0020000E
PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 Section 7.1

# A-ASSOCIATE-RJ: result "rejected-permanent", source "DICOM UL service-user" (PS3.8 Table 9-21)
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAGNOSTIC_CALLING_AE = 0x03
DIAGNOSTIC_CALLED_AE = 0x07

# A sender sends its A-ASSOCIATE-RQ at once; a connection that has not (garbage, port scanners)
# gives its association slot back after this, not after pynetdicom's 30 s default.
ACSE_TIMEOUT_S = 10.0

# Presentation context results (PS3.8 Table 9-18)
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03


class StoreStatus(IntEnum):
    """The C-STORE statuses this node answers (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC210


def make_ae(node: NodeSection) -> AE:
    """The listener's application entity: its title, limits and presentation contexts (no handlers)."""
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.network_timeout = node.network_timeout_s
    ae.acse_timeout = ACSE_TIMEOUT_S
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


def index_uids(dataset: bytes, transfer_syntax: UID) -> tuple[str | None, str]:
    """The Study and Series Instance UIDs of an encoded data set (no file meta), read up to (0020,000E) only."""
    if transfer_syntax.is_deflated:
        dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
    header = read_dataset(BytesIO(dataset), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                          stop_when=_after_series_uid, specific_tags=[STUDY_UID_TAG, SERIES_UID_TAG])  # fmt: skip
    study_uid = str(header.get("StudyInstanceUID", "")).strip()
    return study_uid or None, str(header.get("SeriesInstanceUID", "")).strip()


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


def _listed(names: Sequence[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class StorageSCP:
    """The node's listener; call :meth:`start` then :meth:`stop`.

    ``on_release`` receives the series UIDs stored during an association that ended with
    an A-RELEASE (the optional fast path to series completion).
    """

    def __init__(self, config: NodeConfig, spool: Spool,
                 on_release: Callable[[list[str]], None] | None = None) -> None:  # fmt: skip
        self.config = config
        self.spool = spool
        self.on_release = on_release
        self._server: ThreadedAssociationServer | None = None
        self._series_by_assoc: dict[int, set[str]] = {}
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
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        address = (self.config.node.host, self.config.node.port)
        try:
            self._server = self.ae.start_server(address, block=False, evt_handlers=handlers,
                                                ssl_context=server_context(self.config.tls))  # fmt: skip
        except OSError as error:
            why = f"cannot listen on {address[0]}:{address[1]} ([node] host, port): {error}"
            raise LiverfatError(Reason.CONFIG_INVALID, why) from error
        tls = " with TLS" if self.config.tls.enabled else ""
        log.info("listening as %s on %s:%d%s", self.config.node.ae_title, address[0], self.port, tls)

    def stop(self) -> None:
        """Stop accepting and close every association (in-flight stores get no Success)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    # -- handlers (run on the association's thread) ---------------------------------------

    def _on_requested(self, event: Event) -> None:
        request = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ; negotiation has not run yet
        if request is None:
            return
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        host = str(event.assoc.requestor.address)
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
        """One log line per association for the refused presentation contexts, with the reason.

        Many SCUs (dcmtk's storescu among them) propose every storage class they know; that
        is only worth a warning when no CT storage context was accepted at all.
        """
        refused = event.assoc.rejected_contexts
        if not refused:
            return
        calling = str(event.assoc.requestor.ae_title).strip()
        unknown_class = [c for c in refused if c.result == ABSTRACT_SYNTAX_NOT_SUPPORTED]
        classes = sorted({UID(str(c.abstract_syntax)).name for c in unknown_class})
        syntaxes = sorted({UID(str(c.abstract_syntax)).name for c in refused if c not in unknown_class})
        accepted_ct = any(c.abstract_syntax in CT_STORAGE_CLASSES for c in event.assoc.accepted_contexts)
        level = logging.INFO if accepted_ct else logging.WARNING
        if classes:
            log.log(level, "refused %d presentation context(s) from %s: this node accepts only CT Image Storage and "
                    "Enhanced CT Image Storage, not %s", len(classes), calling, _listed(classes))  # fmt: skip
        if syntaxes:
            log.log(level, "refused presentation context(s) for %s from %s: none of the proposed transfer syntaxes "
                    "can be decoded here", _listed(syntaxes), calling)  # fmt: skip

    def _on_echo(self, event: Event) -> int:
        log.debug("C-ECHO from %s", str(event.assoc.requestor.ae_title).strip())
        return int(StoreStatus.SUCCESS)

    def _on_store(self, event: Event) -> int:
        request = cast(C_STORE, event.request)
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_uid = str(request.AffectedSOPInstanceUID)
        sop_class = str(request.AffectedSOPClassUID)
        transfer_syntax = UID(event.context.transfer_syntax)
        dataset = event.encoded_dataset(include_meta=False)
        try:
            study_uid, series_uid = index_uids(dataset, transfer_syntax)
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError, zlib.error) as error:
            log.warning("instance %s from %s cannot be read: %s", sop_uid, calling, error)
            return int(StoreStatus.CANNOT_UNDERSTAND)
        if not series_uid:
            log.warning("instance %s from %s has no (0020,000E) 'Series Instance UID'", sop_uid, calling)
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
        with self._lock:
            self._series_by_assoc.pop(id(event.assoc), None)
