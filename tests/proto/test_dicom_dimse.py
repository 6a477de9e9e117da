"""Tests for medlb.proto.dicom_dimse: command sets against pynetdicom, the observer, C-ECHO, fuzzing.

Command sets and P-DATA-TF PDUs are produced by pynetdicom's DIMSE message classes (``encode_msg``),
so fragmentation, padding and element order are those of an implementation nobody here wrote.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pynetdicom import dimse_messages as dm
from pynetdicom import dimse_primitives as dp
from pynetdicom.dsutils import encode as pn_encode
from pynetdicom.pdu import P_DATA_TF

from medlb.errors import DicomProtocolError
from medlb.proto import dicom_dimse as m
from medlb.proto import dicom_pdu as d

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


def _message(kind: str, **fields: Any) -> Any:
    """A pynetdicom DIMSE message object, e.g. ``_message("C_STORE_RQ", MessageID=1, ...)``."""
    primitive = getattr(dp, kind.rsplit("_", 1)[0])()
    for name, value in fields.items():
        setattr(primitive, name, value)
    msg = getattr(dm, kind)()
    msg.primitive_to_message(primitive)
    return msg


def command_bytes(msg: Any) -> bytes:
    """The encoded command set of a pynetdicom message (Implicit VR Little Endian)."""
    return bytes(pn_encode(msg.command_set, True, True))


def pdata_bodies(msg: Any, context_id: int = 1, max_pdu: int = 16382) -> list[bytes]:
    """The P-DATA-TF bodies pynetdicom sends for ``msg``."""
    out = []
    for prim in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        out.append(bytes(pdu.encode())[6:])
    return out


def c_store_rq(size: int = 1000, **extra: Any) -> Any:
    data = BytesIO(bytes(i % 251 for i in range(size)))
    return _message(
        "C_STORE_RQ",
        MessageID=11,
        AffectedSOPClassUID=CT,
        AffectedSOPInstanceUID="1.2.826.0.1.3680043.2.1125.1.1",
        Priority=2,
        DataSet=data,
        **extra,
    )


def c_move_rq() -> Any:
    return _message(
        "C_MOVE_RQ",
        MessageID=9,
        AffectedSOPClassUID=STUDY_ROOT_MOVE,
        Priority=0,
        MoveDestination="WORKSTATION1",
        Identifier=BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "),
    )


# --------------------------------------------------------------------------- command set parsing


def test_parse_c_store_rq() -> None:
    msg = c_store_rq(MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3)
    cmd = m.parse_command_set(command_bytes(msg))
    assert cmd == m.CommandSet(
        command_field=0x0001,
        command_data_set_type=cmd.command_data_set_type,
        message_id=11,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid="1.2.826.0.1.3680043.2.1125.1.1",  # odd length: pynetdicom pads with 0x00
        priority=2,
    )
    assert cmd.has_data_set and cmd.command_data_set_type != m.NO_DATA_SET
    assert cmd.name == "C-STORE-RQ" and not cmd.is_response


def test_parse_c_store_rsp_warning() -> None:
    msg = _message(
        "C_STORE_RSP",
        MessageIDBeingRespondedTo=11,
        AffectedSOPClassUID=CT,
        AffectedSOPInstanceUID="1.2.3",
        Status=0xB007,
        ErrorComment="coerced",
    )
    cmd = m.parse_command_set(command_bytes(msg))
    assert (cmd.command_field, cmd.message_id_being_responded_to, cmd.status) == (0x8001, 11, 0xB007)
    assert cmd.is_response and not cmd.has_data_set
    assert cmd.status_category is m.StatusCategory.WARNING
    assert cmd.message_id is None and cmd.move_destination is None


def test_parse_c_move_rq_with_move_destination() -> None:
    cmd = m.parse_command_set(command_bytes(c_move_rq()))
    assert cmd.name == "C-MOVE-RQ"
    assert cmd.move_destination == "WORKSTATION1"
    assert cmd.affected_sop_class_uid == STUDY_ROOT_MOVE
    assert cmd.message_id == 9 and cmd.has_data_set


def test_parse_c_find_rsp_pending_and_c_cancel() -> None:
    rsp = _message(
        "C_FIND_RSP",
        MessageIDBeingRespondedTo=4,
        AffectedSOPClassUID=STUDY_ROOT_FIND,
        Status=0xFF00,
        Identifier=BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "),
    )
    cmd = m.parse_command_set(command_bytes(rsp))
    assert cmd.status_category is m.StatusCategory.PENDING and cmd.has_data_set
    cancel = m.parse_command_set(command_bytes(_message("C_CANCEL_RQ", MessageIDBeingRespondedTo=4)))
    assert (cancel.name, cancel.message_id_being_responded_to, cancel.is_response) == ("C-CANCEL-RQ", 4, False)
    assert cancel.affected_sop_class_uid is None


def test_parse_n_action_rq_skips_elements_it_does_not_know() -> None:
    msg = _message(
        "N_ACTION_RQ",
        MessageID=21,
        RequestedSOPClassUID=STORAGE_COMMITMENT,
        RequestedSOPInstanceUID="1.2.840.10008.1.20.1.1",
        ActionTypeID=1,
        ActionInformation=BytesIO(b"\x08\x00\x95\x11\x04\x00\x00\x001.2 "),
    )
    cmd = m.parse_command_set(command_bytes(msg))
    assert (cmd.name, cmd.message_id, cmd.affected_sop_class_uid) == ("N-ACTION-RQ", 21, None)


def test_c_echo_rq_equals_pynetdicom() -> None:
    for message_id in (1, 7, 0xFFFF):
        msg = _message("C_ECHO_RQ", MessageID=message_id, AffectedSOPClassUID=d.VERIFICATION_SOP_CLASS)
        assert m.encode_c_echo_rq(message_id) == command_bytes(msg)
        # and the one-PDU wrapping equals what pynetdicom puts on the wire
        [body] = pdata_bodies(msg, context_id=1)
        assert m.command_pdata(m.encode_c_echo_rq(message_id), 1) == struct.pack(">BBL", 4, 0, len(body)) + body


def test_c_echo_rsp_equals_pynetdicom_and_parses_back() -> None:
    msg = _message("C_ECHO_RSP", MessageIDBeingRespondedTo=7, AffectedSOPClassUID=d.VERIFICATION_SOP_CLASS, Status=0)
    assert m.encode_c_echo_rsp(7) == command_bytes(msg)
    assert m.parse_c_echo_rsp(m.parse_command_set(command_bytes(msg)), 7) == 0x0000
    failing = _message(
        "C_ECHO_RSP", MessageIDBeingRespondedTo=8, AffectedSOPClassUID=d.VERIFICATION_SOP_CLASS, Status=0x0122
    )
    assert m.parse_c_echo_rsp(m.parse_command_set(command_bytes(failing)), 8) == 0x0122


def test_parse_c_echo_rsp_checks_what_it_answers() -> None:
    rsp = m.parse_command_set(m.encode_c_echo_rsp(7))
    with pytest.raises(DicomProtocolError, match="expected 8"):
        m.parse_c_echo_rsp(rsp, 8)
    with pytest.raises(DicomProtocolError, match="C-ECHO-RSP"):
        m.parse_c_echo_rsp(m.parse_command_set(m.encode_c_echo_rq(7)), 7)
    no_status = m.encode_command_set(
        [(0x0100, struct.pack("<H", 0x8030)), (0x0120, b"\x07\x00"), (0x0800, b"\x01\x01")]
    )
    with pytest.raises(DicomProtocolError, match="Status"):
        m.parse_c_echo_rsp(m.parse_command_set(no_status), 7)


def test_command_pdata_decodes_everywhere() -> None:
    raw = m.command_pdata(m.encode_c_echo_rq(3), 5)
    pdu = d.decode_pdu(raw)
    assert pdu == d.PDataTF((d.Pdv(5, 0x03, m.encode_c_echo_rq(3)),))
    theirs = P_DATA_TF()
    theirs.decode(raw)
    [pdv] = theirs.presentation_data_value_items
    assert (pdv.context_id, pdv.presentation_data_value) == (5, b"\x03" + m.encode_c_echo_rq(3))
    with pytest.raises(ValueError):
        m.command_pdata(b"", 2)


def test_encode_command_set_rejects_odd_values_and_explicit_group_length() -> None:
    with pytest.raises(ValueError):
        m.encode_command_set([(0x0002, b"1.2.3")])
    with pytest.raises(ValueError):
        m.encode_command_set([(0x0000, b"\x00\x00\x00\x00")])


def _element(element: int, value: bytes, group: int = 0) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


_FIELD = _element(0x0100, b"\x30\x00")
_DST = _element(0x0800, b"\x01\x01")


def _with_group_length(rest: bytes) -> bytes:
    return _element(0x0000, struct.pack("<L", len(rest))) + rest


BAD_COMMAND_SETS = {
    "truncated element header": _with_group_length(_FIELD + _DST) + b"\x00\x00",
    "value overruns": _element(0x0000, struct.pack("<L", 14)) + _FIELD + struct.pack("<HHL", 0, 0x0800, 4) + b"\x01",
    "not group 0000": _with_group_length(_FIELD + _DST + _element(0x0010, b"AB", group=0x0008)),
    "descending order": _with_group_length(_DST + _FIELD),
    "repeated element": _with_group_length(_FIELD + _FIELD + _DST),
    "group length too big": _element(0x0000, struct.pack("<L", 99)) + _FIELD + _DST,
    "group length too small": _element(0x0000, struct.pack("<L", 2)) + _FIELD + _DST,
    "group length of 2 bytes": _element(0x0000, b"\x00\x00") + _FIELD + _DST,
    "US of 4 bytes": _with_group_length(_element(0x0100, b"\x30\x00\x00\x00") + _DST),
    "status of 1 byte": _with_group_length(_FIELD + _DST + _element(0x0900, b"\x00")),
    "no command field": _with_group_length(_DST),
    "no data set type": _with_group_length(_FIELD),
    "empty": b"",
    "undefined length": _FIELD + struct.pack("<HHL", 0, 0x0800, 0xFFFFFFFF),
}


@pytest.mark.parametrize("raw", list(BAD_COMMAND_SETS.values()), ids=list(BAD_COMMAND_SETS))
def test_bad_command_sets_raise(raw: bytes) -> None:
    with pytest.raises(DicomProtocolError):
        m.parse_command_set(raw)


def test_group_length_is_optional_but_checked_when_present() -> None:
    assert m.parse_command_set(_FIELD + _DST).command_field == 0x0030
    assert m.parse_command_set(_with_group_length(_FIELD + _DST)).command_field == 0x0030


# --------------------------------------------------------------------------- names and statuses


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (0x0000, m.StatusCategory.SUCCESS),
        (0xFF00, m.StatusCategory.PENDING),
        (0xFF01, m.StatusCategory.PENDING),
        (0xFE00, m.StatusCategory.CANCEL),
        (0x0001, m.StatusCategory.WARNING),
        (0x0107, m.StatusCategory.WARNING),
        (0x0116, m.StatusCategory.WARNING),
        (0xB000, m.StatusCategory.WARNING),
        (0xB006, m.StatusCategory.WARNING),
        (0xB007, m.StatusCategory.WARNING),
        (0xBFFF, m.StatusCategory.WARNING),
        (0xA700, m.StatusCategory.FAILURE),
        (0xA801, m.StatusCategory.FAILURE),
        (0xA900, m.StatusCategory.FAILURE),
        (0xC000, m.StatusCategory.FAILURE),
        (0x0110, m.StatusCategory.FAILURE),
        (0x0122, m.StatusCategory.FAILURE),
        (0x0213, m.StatusCategory.FAILURE),
        (0xFF02, m.StatusCategory.FAILURE),
        (0xAFFF, m.StatusCategory.FAILURE),
        (0xC001, m.StatusCategory.FAILURE),
    ],
)
def test_classify_status(status: int, category: m.StatusCategory) -> None:
    assert m.classify_status(status) is category


def test_command_names_cover_every_pynetdicom_message() -> None:
    names = {m.command_name(f) for f in m.CommandField}
    expected = {k.replace("_", "-") for k in dir(dm) if k[:2] in ("C_", "N_") and k.endswith(("_RQ", "_RSP"))}
    assert names == expected
    assert m.command_name(0x1234) == "UNKNOWN(0x1234)"
    assert m.CommandField.C_CANCEL_RQ == 0x0FFF and m.CommandField.N_DELETE_RSP == 0x8150


# --------------------------------------------------------------------------- observer


def test_observer_c_store_fragmented_over_many_pdus() -> None:
    msg = c_store_rq(size=1000)
    cmd_len = len(command_bytes(msg))
    bodies = pdata_bodies(msg, context_id=3, max_pdu=40)  # 34-byte fragments: the command spans PDUs
    obs = m.DimseObserver()
    seen: list[m.CommandSet] = []
    max_buffered = 0
    for body in bodies:
        got = obs.feed(body)
        max_buffered = max(max_buffered, obs.buffered)
        seen += got
        if seen:
            assert obs.buffered == 0  # data-set fragments are never held
    assert [c.name for c in seen] == ["C-STORE-RQ"]
    assert seen[0].affected_sop_class_uid == CT
    assert 0 < max_buffered < cmd_len
    assert obs.data_set_bytes == 1000
    assert (obs.commands, obs.data_sets) == (1, 1)
    assert not obs.in_message


def test_observer_reports_the_command_when_its_last_fragment_arrives() -> None:
    msg = c_store_rq(size=100)
    bodies = pdata_bodies(msg, max_pdu=40)
    cmd_pdus = [b for b in bodies if b[5] & 0x01]
    obs = m.DimseObserver()
    for body in cmd_pdus[:-1]:
        assert obs.feed(body) == []
        assert obs.in_message
    assert len(obs.feed(cmd_pdus[-1])) == 1
    assert obs.in_message  # the data set is still to come


def test_observer_whole_association_exchange() -> None:
    echo_rq = _message("C_ECHO_RQ", MessageID=1, AffectedSOPClassUID=d.VERIFICATION_SOP_CLASS)
    stores = [c_store_rq(size=n) for n in (2, 10, 5000)]
    move = c_move_rq()
    obs = m.DimseObserver()
    names: list[str] = []
    for msg in (echo_rq, *stores, move):
        for body in pdata_bodies(msg, max_pdu=1024):
            names += [c.name for c in obs.feed(body)]
    assert names == ["C-ECHO-RQ", "C-STORE-RQ", "C-STORE-RQ", "C-STORE-RQ", "C-MOVE-RQ"]
    assert obs.data_set_bytes == 2 + 10 + 5000 + 14  # the C-MOVE identifier is 14 bytes
    assert obs.commands == 5


def test_observer_accepts_command_and_data_set_in_one_pdu() -> None:
    cmd = m.encode_command_set([(0x0100, b"\x01\x00"), (0x0110, b"\x01\x00"), (0x0800, b"\x02\x01")])
    body = d.PDataTF((d.Pdv(1, 0x03, cmd), d.Pdv(1, 0x00, b"ab"), d.Pdv(1, 0x02, b"cd"))).encode_body()
    obs = m.DimseObserver()
    [command] = obs.feed(memoryview(body))
    assert command.name == "C-STORE-RQ" and obs.data_set_bytes == 4 and not obs.in_message


def test_observer_bounds_the_command_buffer() -> None:
    obs = m.DimseObserver(max_command_length=100)
    fragment = d.PDataTF((d.Pdv(1, 0x01, bytes(60)),)).encode_body()
    assert obs.feed(fragment) == []
    with pytest.raises(DicomProtocolError, match="longer than 100"):
        obs.feed(fragment)
    assert obs.buffered == 0
    with pytest.raises(DicomProtocolError):  # failed for good
        obs.feed(m.command_pdata(m.encode_c_echo_rq(1), 1)[6:])


def _body(*pdvs: tuple[int, int, bytes]) -> bytes:
    return d.PDataTF(tuple(d.Pdv(*p) for p in pdvs)).encode_body()


ECHO = m.encode_c_echo_rq(1)
STORE = m.encode_command_set([(0x0100, b"\x01\x00"), (0x0110, b"\x01\x00"), (0x0800, b"\x02\x01")])

BAD_SEQUENCES = {
    "data set without a command": [_body((1, 0x02, b"ab"))],
    "data set after a command without one": [_body((1, 0x03, ECHO)), _body((1, 0x02, b"ab"))],
    "data set inside a command": [_body((1, 0x01, STORE[:10])), _body((1, 0x02, b"ab"))],
    "command inside a data set": [_body((1, 0x03, STORE), (1, 0x00, b"ab")), _body((1, 0x03, ECHO))],
    "context change inside a command": [_body((1, 0x01, STORE[:10])), _body((3, 0x03, STORE[10:]))],
    "context change between command and data set": [_body((1, 0x03, STORE)), _body((3, 0x02, b"ab"))],
    "garbage command": [_body((1, 0x03, b"\xff" * 12))],
    "empty body": [b""],
    "PDV length 1": [b"\x00\x00\x00\x01\x01"],
    "PDV overruns": [b"\x00\x00\x00\x09\x01\x03abc"],
    "PDV header truncated": [b"\x00\x00\x00\x02\x01"],
    "even context": [_body((2, 0x03, ECHO))],
}


@pytest.mark.parametrize("bodies", list(BAD_SEQUENCES.values()), ids=list(BAD_SEQUENCES))
def test_observer_rejects_bad_sequences(bodies: list[bytes]) -> None:
    obs = m.DimseObserver()
    with pytest.raises(DicomProtocolError):
        for body in bodies:
            obs.feed(body)


# --------------------------------------------------------------------------- fuzzing


@given(st.binary(max_size=300))
@FUZZ
@example(_with_group_length(_FIELD + _DST))
def test_fuzz_parse_command_set(data: bytes) -> None:
    try:
        cmd = m.parse_command_set(data)
    except DicomProtocolError:
        return
    assert 0 <= cmd.command_field <= 0xFFFF


@given(st.lists(st.binary(max_size=120), min_size=1, max_size=5))
@FUZZ
def test_fuzz_observer_arbitrary_bodies(bodies: list[bytes]) -> None:
    obs = m.DimseObserver(max_command_length=256)
    try:
        for body in bodies:
            for cmd in obs.feed(body):
                assert isinstance(cmd, m.CommandSet)
            assert obs.buffered <= 256
    except DicomProtocolError:
        pass


_VALID_BODIES = [
    *pdata_bodies(c_store_rq(size=50), max_pdu=40),
    *pdata_bodies(c_move_rq()),
    m.command_pdata(ECHO, 1)[6:],
]


@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=4))
@FUZZ
def test_fuzz_observer_mutated_exchange(mutations: list[tuple[int, int]]) -> None:
    bodies = [bytearray(b) for b in _VALID_BODIES]
    for where, value in mutations:
        body = bodies[where % len(bodies)]
        body[(where // len(bodies)) % len(body)] = value
    obs = m.DimseObserver(max_command_length=512)
    try:
        for body in bodies:
            obs.feed(bytes(body))
            assert obs.buffered <= 512
    except DicomProtocolError:
        return
    assert obs.commands >= 1
