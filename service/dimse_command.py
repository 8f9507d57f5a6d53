"""DIMSE command sets of the two services the node provides: C-ECHO and C-STORE (PS3.7 Section 9).

A command set is always Implicit VR Little Endian group 0000 elements (PS3.7 Section 6.3.1).
The node reads the few elements it answers with and writes its responses directly: building
and encoding a pydicom ``Dataset`` per message, as pynetdicom does, cost more than the rest of
the C-STORE's handling in Python.

References
----------
PS3.7 Section 9.1.1 (C-STORE), Section 9.1.5 (C-ECHO), Annex E (command dictionary).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE_UID = 0x1000
NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 Annex E.1)
RESPONSE_BIT = 0x8000  # a response's Command Field is its request's with this bit set

_ELEMENT_HEADER = struct.Struct("<HHI")  # group, element, value length (Implicit VR Little Endian)
_US = struct.Struct("<H")


class CommandField(IntEnum):
    """The requests the node answers (PS3.7 Annex E.1)."""

    C_STORE_RQ = 0x0001
    C_ECHO_RQ = 0x0030


class CommandError(ValueError):
    """The command set cannot be read: the association is aborted."""


@dataclass(frozen=True)
class Command:
    """A received request's command set: the elements the node answers with."""

    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str
    affected_sop_instance_uid: str


def decode_command(encoded: bytes | bytearray | memoryview) -> Command:
    """The request in a command set; raises :class:`CommandError` for one that is cut short or lacks its ID."""
    values: dict[int, bytes] = {}
    view, offset = memoryview(encoded), 0
    while offset < len(view):
        if offset + _ELEMENT_HEADER.size > len(view):
            raise CommandError("the command set ends inside an element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(view, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0x0000 or offset + length > len(view):
            raise CommandError(f"element ({group:04X},{element:04X}) is not a command element or is cut short")
        values[element] = bytes(view[offset : offset + length])
        offset += length
    try:
        command_field, message_id = _us(values[COMMAND_FIELD]), _us(values[MESSAGE_ID])
    except KeyError as missing:
        raise CommandError(f"the command set has no element (0000,{missing.args[0]:04X})") from None
    data_set_type = _us(values.get(COMMAND_DATA_SET_TYPE, _US.pack(NO_DATA_SET)))
    return Command(command_field, message_id, data_set_type != NO_DATA_SET,
                   _uid(values.get(AFFECTED_SOP_CLASS_UID, b"")),
                   _uid(values.get(AFFECTED_SOP_INSTANCE_UID, b"")))  # fmt: skip


def encode_response(request: Command, status: int) -> bytes:
    """The response to ``request`` with ``status``, as a command set (no data set follows)."""
    elements = [
        _element(AFFECTED_SOP_CLASS_UID, _uid_value(request.affected_sop_class_uid)),
        _element(COMMAND_FIELD, _US.pack(request.command_field | RESPONSE_BIT)),
        _element(MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(request.message_id)),
        _element(COMMAND_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        _element(STATUS, _US.pack(status)),
    ]
    if request.command_field == CommandField.C_STORE_RQ:
        elements.append(_element(AFFECTED_SOP_INSTANCE_UID, _uid_value(request.affected_sop_instance_uid)))
    body = b"".join(elements)
    return _element(GROUP_LENGTH, struct.pack("<I", len(body))) + body


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _us(value: bytes) -> int:
    if len(value) != _US.size:
        raise CommandError(f"a US element holds {len(value)} bytes, not 2")
    return int(_US.unpack(value)[0])


def _uid(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def _uid_value(uid: str) -> bytes:
    encoded = uid.encode("ascii", "replace")
    return encoded + b"\x00" * (len(encoded) % 2)  # UI values are padded with NUL to even length (PS3.5 6.2)
