"""DIMSE command sets: requests encoded by pynetdicom are decoded, responses are read back by pydicom."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from liverfat.service.dimse_command import Command, CommandError, CommandField, decode_command, encode_response

INSTANCE_UID = "1.2.826.0.1.3680043.8.498.123"  # odd length: padded with a NUL on the wire


def wire_command_set(message: DIMSEMessage) -> bytes:
    """The command set exactly as pynetdicom sends it: its first (and, unfragmented, only) command PDV."""
    first = next(message.encode_msg(context_id=1, max_pdu_length=0))
    [(_, value)] = first.presentation_data_value_list
    assert value[0] == 0x03, "one command fragment, the last"
    return bytes(value[1:])


def store_message(sop_class: str = CTImageStorage, sop_instance: str = INSTANCE_UID, message_id: int = 7,
                  data_set: bytes | None = b"\x00" * 10) -> C_STORE_RQ:  # fmt: skip
    """A C-STORE-RQ as pynetdicom builds it; ``data_set`` is the encoded data set (``None``: no data set)."""
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = message_id, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = sop_class, sop_instance
    primitive.DataSet = BytesIO(data_set) if data_set is not None else None
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return message


def echo_message(message_id: int | None = 3) -> C_ECHO_RQ:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)  # an element whose parameter is None is left out
    return message


def store_rq(message_id: int = 7, data_set: bytes | None = b"\x00" * 10) -> bytes:
    return wire_command_set(store_message(message_id=message_id, data_set=data_set))


def echo_rq(message_id: int | None = 3) -> bytes:
    return wire_command_set(echo_message(message_id))


def element(number: int, value: bytes, group: int = 0x0000) -> bytes:
    """One Implicit VR Little Endian element."""
    return struct.pack("<HHI", group, number, len(value)) + value


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (store_rq(), Command(CommandField.C_STORE_RQ, 7, True, CTImageStorage, INSTANCE_UID)),
        (store_rq(message_id=65535, data_set=None),
         Command(CommandField.C_STORE_RQ, 65535, False, CTImageStorage, INSTANCE_UID)),
        (echo_rq(), Command(CommandField.C_ECHO_RQ, 3, False, Verification, "")),
    ],
    ids=["c-store with data set", "c-store without data set", "c-echo"],
)  # fmt: skip
def test_requests_encoded_by_pynetdicom_are_decoded(encoded: bytes, expected: Command) -> None:
    assert decode_command(encoded) == expected
    assert decode_command(memoryview(bytearray(encoded))) == expected  # as the upper layer hands it over


def read_response(encoded: bytes) -> Dataset:
    return read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)


@pytest.mark.parametrize(("request_set", "status"), [(store_rq(), 0x0000), (store_rq(), 0xC211), (echo_rq(), 0x0000)],
                         ids=["c-store success", "c-store failure", "c-echo success"])  # fmt: skip
def test_responses_are_read_by_pydicom_as_the_request_asks(request_set: bytes, status: int) -> None:
    request = decode_command(request_set)
    encoded = encode_response(request, status)
    response = read_response(encoded)
    assert response.CommandGroupLength == len(encoded) - 12  # the elements after (0000,0000) itself
    assert response.CommandField == request.command_field | 0x8000
    assert response.MessageIDBeingRespondedTo == request.message_id
    assert (response.Status, response.CommandDataSetType) == (status, 0x0101)
    assert response.AffectedSOPClassUID == request.affected_sop_class_uid
    if request.command_field == CommandField.C_STORE_RQ:
        assert response.AffectedSOPInstanceUID == INSTANCE_UID
    else:
        assert "AffectedSOPInstanceUID" not in response
    uids = {0x00000002: request.affected_sop_class_uid, 0x00001000: response.get("AffectedSOPInstanceUID")}
    for tag, uid in uids.items():
        if uid is not None:  # every UID here has an odd length: one NUL pads it to even (PS3.5 Section 6.2)
            raw = read_response(encoded).get_item(tag)  # as read: the bytes, before pydicom converts the value
            assert len(uid) % 2 == 1 and raw is not None and raw.value == uid.encode() + b"\x00"


@pytest.mark.parametrize(
    ("encoded", "why"),
    [
        (store_rq() + b"\x00\x00\x00\x09", "ends inside an element header"),
        (store_rq()[:-1], r"element \(0000,1000\) .* is cut short"),
        (echo_rq() + element(0x0018, b"1\x00", group=0x0008), r"element \(0008,0018\) is not a command element"),
        (echo_rq(message_id=None), r"no element \(0000,0110\)"),
        (element(0x0100, b"\x30\x00") + element(0x0110, b"\x01\x00\x00\x00"), "holds 4 bytes, not 2"),
        (element(0x0100, b"\x30") + element(0x0110, b"\x01\x00"), "holds 1 bytes, not 2"),
    ],
    ids=["element header cut", "value cut", "not group 0000", "no message id", "US of 4 bytes", "US of 1 byte"],
)  # fmt: skip
def test_a_command_set_cut_short_or_garbled_is_a_command_error(encoded: bytes, why: str) -> None:
    with pytest.raises(CommandError, match=why):
        decode_command(encoded)
