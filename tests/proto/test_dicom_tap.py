"""Tests for medlb.proto.dicom_tap: the streaming tap on an established association.

The byte streams are produced by pynetdicom (DIMSE messages through ``encode_msg``, PDUs through
``pynetdicom.pdu``), so fragmentation and padding are those of an implementation nobody here wrote.
Expected values (command fields, message IDs, statuses, data-set byte counts, PDU boundaries) are
taken from what was handed to pynetdicom, never from medlb's own parser.
"""

from __future__ import annotations

import random
import struct
import sys
import tracemalloc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import dimse_messages as dm
from pynetdicom import dimse_primitives as dp
from pynetdicom import pdu_primitives as pp
from pynetdicom.dsutils import encode as pn_encode
from pynetdicom.pdu import A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF

from medlb.errors import DicomProtocolError
from medlb.proto import dicom_dimse
from medlb.proto.dicom_tap import ABORT, MAX_COMMAND, RELEASE_RP, RELEASE_RQ, AssociationTap, TapEvents
from tests.proto.test_dicom_pdu import pn_abort, pn_ac, pn_rj, pn_rq

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- building streams


def _message(kind: str, **fields: Any) -> Any:
    """A pynetdicom DIMSE message object, e.g. ``_message("C_STORE_RQ", MessageID=1, ...)``."""
    primitive = getattr(dp, kind.rsplit("_", 1)[0])()
    for name, value in fields.items():
        setattr(primitive, name, value)
    msg = getattr(dm, kind)()
    msg.primitive_to_message(primitive)
    return msg


def _pdata_pdu(pdvs: list[tuple[int, bytes]]) -> bytes:
    """One P-DATA-TF PDU from pynetdicom's ``(context_id, control byte + fragment)`` PDV list."""
    prim = pp.P_DATA()
    prim.presentation_data_value_list = [[context_id, value] for context_id, value in pdvs]
    pdu = P_DATA_TF()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def _identifier(**attrs: str) -> BytesIO:
    ds = Dataset()
    for name, value in attrs.items():
        setattr(ds, name, value)
    return BytesIO(bytes(pn_encode(ds, True, True)))


@dataclass(frozen=True)
class Expected:
    """What the tap must report for one command set (from the values given to pynetdicom)."""

    command_field: int
    message_id: int | None = None
    responded_to: int | None = None
    status: int | None = None


@dataclass
class Stream:
    """One direction of an association and what the tap must see in it."""

    data: bytearray = field(default_factory=bytearray)
    pdu_ends: list[int] = field(default_factory=list)  # offset just after each PDU
    command_ends: dict[int, Expected] = field(default_factory=dict)  # offset just after a command's last byte
    control_ends: dict[int, int] = field(default_factory=dict)  # offset just after a control PDU -> type
    data_bytes: int = 0

    def _pdu(self, raw: bytes) -> None:
        self.data += raw
        self.pdu_ends.append(len(self.data))

    def message(self, msg: Any, expected: Expected, *, context_id: int, max_pdu: int) -> None:
        for prim in msg.encode_msg(context_id, max_pdu):
            pdvs = prim.presentation_data_value_list
            for _, value in pdvs:
                if not value[0] & 0x01:
                    self.data_bytes += len(value) - 1
            self._pdu(_pdata_pdu(pdvs))
            if any(value[0] & 0x03 == 0x03 for _, value in pdvs):
                # pynetdicom puts one PDV per PDU: the command ends where its last PDU ends.
                self.command_ends[len(self.data)] = expected

    def control(self, raw: bytes) -> None:
        self._pdu(raw)
        self.control_ends[len(self.data)] = raw[0]

    @property
    def commands(self) -> list[Expected]:
        return [self.command_ends[k] for k in sorted(self.command_ends)]

    @property
    def controls(self) -> list[int]:
        return [self.control_ends[k] for k in sorted(self.control_ends)]


STORE_SIZES = (100_000, 100_001, 65_536)  # odd size too: the tap must not assume even fragments
STORE_STATUSES = (0x0000, 0xB000, 0xA700)  # success, warning (coercion), failure (out of resources)
MAX_PDU = 16384


def client_stream() -> Stream:
    """Client -> server: C-ECHO-RQ, three C-STOREs with ~100 KB data sets, a C-FIND-RQ, A-RELEASE-RQ."""
    s = Stream()
    s.message(
        _message("C_ECHO_RQ", MessageID=1, AffectedSOPClassUID=VERIFICATION),
        Expected(C_ECHO_RQ, message_id=1),
        context_id=1,
        max_pdu=MAX_PDU,
    )
    for i, size in enumerate(STORE_SIZES):
        msg = _message(
            "C_STORE_RQ",
            MessageID=2 + i,
            AffectedSOPClassUID=CT if i % 2 == 0 else MR,
            AffectedSOPInstanceUID=f"1.2.826.0.1.3680043.2.1125.1.{i}",
            Priority=2,
            DataSet=BytesIO(bytes((j * 7 + i) % 256 for j in range(size))),
        )
        s.message(msg, Expected(C_STORE_RQ, message_id=2 + i), context_id=3 if i % 2 == 0 else 5, max_pdu=MAX_PDU)
    find = _message(
        "C_FIND_RQ",
        MessageID=9,
        AffectedSOPClassUID=STUDY_ROOT_FIND,
        Priority=0,
        Identifier=_identifier(QueryRetrieveLevel="STUDY", PatientID="P*", StudyInstanceUID=""),
    )
    s.message(find, Expected(C_FIND_RQ, message_id=9), context_id=7, max_pdu=MAX_PDU)
    s.control(bytes(A_RELEASE_RQ().encode()))
    return s


def server_stream() -> Stream:
    """Server -> client: C-ECHO-RSP, C-STORE-RSPs (success, warning, failure), C-FIND pending x2 + final, RP."""
    s = Stream()
    s.message(
        _message("C_ECHO_RSP", MessageIDBeingRespondedTo=1, AffectedSOPClassUID=VERIFICATION, Status=0x0000),
        Expected(C_ECHO_RSP, responded_to=1, status=0x0000),
        context_id=1,
        max_pdu=MAX_PDU,
    )
    for i, status in enumerate(STORE_STATUSES):
        msg = _message(
            "C_STORE_RSP",
            MessageIDBeingRespondedTo=2 + i,
            AffectedSOPClassUID=CT if i % 2 == 0 else MR,
            AffectedSOPInstanceUID=f"1.2.826.0.1.3680043.2.1125.1.{i}",
            Status=status,
        )
        s.message(msg, Expected(C_STORE_RSP, responded_to=2 + i, status=status), context_id=3 if i % 2 == 0 else 5,
                  max_pdu=MAX_PDU)  # fmt: skip
    for patient in ("P1", "P2"):
        msg = _message(
            "C_FIND_RSP",
            MessageIDBeingRespondedTo=9,
            AffectedSOPClassUID=STUDY_ROOT_FIND,
            Status=0xFF00,
            Identifier=_identifier(
                QueryRetrieveLevel="STUDY", PatientID=patient, StudyInstanceUID="1.2.3." + patient[1]
            ),
        )
        s.message(msg, Expected(C_FIND_RSP, responded_to=9, status=0xFF00), context_id=7, max_pdu=MAX_PDU)
    s.message(
        _message("C_FIND_RSP", MessageIDBeingRespondedTo=9, AffectedSOPClassUID=STUDY_ROOT_FIND, Status=0x0000),
        Expected(C_FIND_RSP, responded_to=9, status=0x0000),
        context_id=7,
        max_pdu=MAX_PDU,
    )
    s.control(bytes(A_RELEASE_RP().encode()))
    return s


CLIENT = client_stream()
SERVER = server_stream()
STREAMS = pytest.mark.parametrize("stream", [CLIENT, SERVER], ids=["client", "server"])


def _summary(command: dicom_dimse.CommandSet) -> Expected:
    return Expected(command.command_field, command.message_id, command.message_id_being_responded_to, command.status)


@dataclass
class Seen:
    commands: list[Expected] = field(default_factory=list)
    controls: list[int] = field(default_factory=list)

    def add(self, events: TapEvents | None) -> None:
        if events is not None:
            assert events.commands or events.control, "an empty TapEvents must be None"
            self.commands += [_summary(c) for c in events.commands]
            self.controls += events.control


def feed_all(tap: AssociationTap, chunks: Iterable[bytes | bytearray | memoryview]) -> Seen:
    seen = Seen()
    for chunk in chunks:
        seen.add(tap.feed(chunk))
    return seen


def split_at(data: bytes | bytearray, cuts: Iterable[int]) -> Iterator[memoryview]:
    mv = memoryview(data)
    prev = 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}):
        yield mv[prev:cut]
        prev = cut
    yield mv[prev:]


def check_totals(tap: AssociationTap, seen: Seen, stream: Stream) -> None:
    assert seen.commands == stream.commands
    assert seen.controls == stream.controls
    assert tap.data_bytes == stream.data_bytes
    assert tap.pdus == len(stream.pdu_ends)
    assert tap.at_boundary


# --------------------------------------------------------------------------- the realistic streams


def test_the_streams_are_what_they_claim() -> None:
    # Guard the fixtures themselves: multi-PDU data sets, every status class, both control PDUs.
    assert CLIENT.data_bytes > sum(STORE_SIZES)  # the stores plus the C-FIND identifier
    assert len(CLIENT.pdu_ends) > 3 * (100_000 // MAX_PDU)
    assert [e.command_field for e in CLIENT.commands] == [C_ECHO_RQ, C_STORE_RQ, C_STORE_RQ, C_STORE_RQ, C_FIND_RQ]
    assert [e.status for e in SERVER.commands] == [0x0000, *STORE_STATUSES, 0xFF00, 0xFF00, 0x0000]
    assert CLIENT.controls == [RELEASE_RQ] and SERVER.controls == [RELEASE_RP]


@STREAMS
def test_whole_stream_in_one_chunk(stream: Stream) -> None:
    tap = AssociationTap()
    seen = feed_all(tap, [bytes(stream.data)])
    check_totals(tap, seen, stream)


@STREAMS
def test_each_pdu_in_its_own_chunk(stream: Stream) -> None:
    tap = AssociationTap()
    seen = feed_all(tap, split_at(stream.data, stream.pdu_ends))
    check_totals(tap, seen, stream)


@STREAMS
def test_byte_by_byte_events_and_boundaries_at_the_exact_byte(stream: Stream) -> None:
    """Fed one byte at a time: each event comes with the byte that completes it, and at_boundary
    is True exactly after the last byte of a PDU and False everywhere inside one."""
    tap = AssociationTap()
    assert tap.at_boundary
    data = bytes(stream.data)
    pdu_ends = set(stream.pdu_ends)
    seen = Seen()
    for i in range(len(data)):
        events = tap.feed(data[i : i + 1])
        offset = i + 1
        if offset in stream.command_ends:
            assert events is not None and [_summary(c) for c in events.commands] == [stream.command_ends[offset]]
        if offset in stream.control_ends:
            assert events is not None and events.control == [stream.control_ends[offset]]
        if offset not in stream.command_ends and offset not in stream.control_ends:
            assert events is None, offset
        assert tap.at_boundary == (offset in pdu_ends), offset
        seen.add(events)
    check_totals(tap, seen, stream)


@STREAMS
@pytest.mark.parametrize("seed", range(6))
def test_random_split_points(stream: Stream, seed: int) -> None:
    rng = random.Random(seed)
    n = len(stream.data)
    # Few large chunks for some seeds, many tiny ones (header-straddling) for others.
    count = [3, 20, 200, 2000, 10, 500][seed]
    cuts = rng.sample(range(1, n), min(count, n // 2))
    tap = AssociationTap()
    seen = feed_all(tap, split_at(stream.data, cuts))
    check_totals(tap, seen, stream)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_any_split_of_the_server_stream(data: st.DataObject) -> None:
    n = len(SERVER.data)
    cuts = data.draw(st.lists(st.integers(1, n - 1), max_size=40))
    tap = AssociationTap()
    seen = feed_all(tap, split_at(SERVER.data, cuts))
    check_totals(tap, seen, SERVER)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_bytearray_and_memoryview(kind: type) -> None:
    tap = AssociationTap()
    seen = feed_all(tap, (kind(bytes(c)) for c in split_at(CLIENT.data, range(7, len(CLIENT.data), 4099))))
    check_totals(tap, seen, CLIENT)


def test_at_boundary_is_false_inside_a_pdu_header() -> None:
    release = bytes(A_RELEASE_RQ().encode())
    tap = AssociationTap()
    for i in range(len(release) - 1):
        assert tap.feed(release[i : i + 1]) is None
        assert not tap.at_boundary
    events = tap.feed(release[-1:])
    assert events is not None and events.control == [RELEASE_RQ] and tap.at_boundary
    assert tap.pdus == 1


def test_abort_is_reported_as_control() -> None:
    raw = pn_abort(provider_reason=6)
    tap = AssociationTap()
    head = bytes(CLIENT.data[: CLIENT.pdu_ends[3]])
    events = tap.feed(head + raw)
    assert events is not None and events.control == [ABORT]
    assert [_summary(c) for c in events.commands] == CLIENT.commands[:2]
    assert tap.pdus == 5 and tap.at_boundary


def test_nothing_complete_returns_none() -> None:
    tap = AssociationTap()
    # Up to the end of the first C-STORE-RQ command, two commands complete; the 50 KB of its data
    # set that follow complete nothing.
    first_store_end = sorted(CLIENT.command_ends)[1]
    assert tap.feed(bytes(CLIENT.data[:first_store_end])) is not None
    assert tap.feed(bytes(CLIENT.data[first_store_end : first_store_end + 50_000])) is None


# --------------------------------------------------------------------------- command reassembly


def _store_rq(message_id: int = 77) -> Any:
    return _message(
        "C_STORE_RQ",
        MessageID=message_id,
        AffectedSOPClassUID=CT,
        AffectedSOPInstanceUID="1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567",
        Priority=1,
        MoveOriginatorApplicationEntityTitle="MODALITY_WITH_A",
        MoveOriginatorMessageID=5,
        DataSet=BytesIO(b"\x08\x00\x16\x00\x1a\x00\x00\x00" + CT.encode() + b"\x00" * 2),
    )


def _pdvs(msg: Any, context_id: int, max_pdu: int) -> list[tuple[int, bytes]]:
    return [pdv for prim in msg.encode_msg(context_id, max_pdu) for pdv in prim.presentation_data_value_list]


@pytest.mark.parametrize("max_pdu", [8, 10, 20, 64])
def test_command_split_over_many_pdus_reassembles(max_pdu: int) -> None:
    pdvs = _pdvs(_store_rq(), 3, max_pdu)
    command_pdvs = [p for p in pdvs if p[1][0] & 0x01]
    assert len(command_pdvs) > 2
    raw = b"".join(_pdata_pdu([p]) for p in pdvs)
    for cut in (len(raw), 1, 5):  # whole, byte by byte, 5 by 5
        tap = AssociationTap()
        seen = feed_all(tap, split_at(raw, range(cut, len(raw), cut)))
        assert seen.commands == [Expected(C_STORE_RQ, message_id=77)]
        assert tap.pdus == len(pdvs)
        assert tap.data_bytes == sum(len(v) - 1 for _, v in pdvs if not v[0] & 0x01)


def test_command_fragments_as_several_pdvs_of_one_pdu_then_across_pdus() -> None:
    pdvs = _pdvs(_store_rq(), 5, 30)
    command_pdvs = [p for p in pdvs if p[1][0] & 0x01]
    data_pdvs = [p for p in pdvs if not p[1][0] & 0x01]
    # PDU 1: the first three command PDVs; PDU 2: the rest of the command plus the whole data set
    # (as DCMTK packs a small message); then a C-ECHO-RQ in one PDU.
    raw = _pdata_pdu(command_pdvs[:3]) + _pdata_pdu(command_pdvs[3:] + data_pdvs)
    raw += _pdata_pdu(_pdvs(_message("C_ECHO_RQ", MessageID=78, AffectedSOPClassUID=VERIFICATION), 1, 0))
    for cuts in ([], range(1, len(raw)), [3, 17, 200, 201]):
        tap = AssociationTap()
        seen = feed_all(tap, split_at(raw, cuts))
        assert seen.commands == [Expected(C_STORE_RQ, message_id=77), Expected(C_ECHO_RQ, message_id=78)]
        assert tap.pdus == 3 and tap.at_boundary


def _pdv(control: int, fragment: bytes, context_id: int = 1) -> bytes:
    return struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment


def _pdata(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def test_empty_fragments_are_allowed_and_an_empty_last_command_fragment_completes_the_command() -> None:
    """A PDV item of length 2 carries an empty fragment (PS3.8 only asks for the two header bytes).

    An empty *last* command fragment ends the command set like any last fragment: the command must
    be reported, and must not be glued to the next command's bytes."""
    echo7, echo8 = dicom_dimse.encode_c_echo_rq(7), dicom_dimse.encode_c_echo_rq(8)
    store = bytes(pn_encode(_store_rq(9).command_set, True, True))
    raw = (
        _pdata(_pdv(0x01, echo7), _pdv(0x03, b""))  # empty last command fragment in the same PDU
        + _pdata(_pdv(0x01, echo8[:10]), _pdv(0x01, b""), _pdv(0x01, echo8[10:]))  # empty middle fragment
        + _pdata(_pdv(0x03, b""))  # ... and the empty last fragment in a PDU of its own
        + _pdata(_pdv(0x03, store), _pdv(0x00, b"", 1), _pdv(0x00, b"abcd"), _pdv(0x02, b""))  # empty data too
    )
    for cuts in ([], range(1, len(raw))):
        tap = AssociationTap()
        seen = feed_all(tap, split_at(raw, cuts))
        assert seen.commands == [
            Expected(C_ECHO_RQ, message_id=7),
            Expected(C_ECHO_RQ, message_id=8),
            Expected(C_STORE_RQ, message_id=9),
        ]
        assert tap.data_bytes == 4 and tap.pdus == 4 and tap.at_boundary


def test_command_of_exactly_max_command_bytes_is_accepted() -> None:
    cs = dicom_dimse.encode_c_echo_rq(3)
    tap = AssociationTap(max_command=len(cs))
    events = tap.feed(_pdata(_pdv(0x01, cs[:20])) + _pdata(_pdv(0x03, cs[20:])))
    assert events is not None and [_summary(c) for c in events.commands] == [Expected(C_ECHO_RQ, message_id=3)]
    assert MAX_COMMAND >= 64 * 1024 and AssociationTap().max_command == MAX_COMMAND


# --------------------------------------------------------------------------- memory


def _big_store(size: int, max_pdu: int) -> tuple[bytes, int]:
    """A C-STORE-RQ whose data set of ``size`` bytes is cut into PDUs of ``max_pdu``: (stream, PDU count)."""
    store = _message(
        "C_STORE_RQ", MessageID=1, AffectedSOPClassUID=CT, AffectedSOPInstanceUID="1.2.3", Priority=0,
        DataSet=BytesIO(b"\0\0"),
    )  # fmt: skip
    command = _pdata_pdu(_pdvs(store, 1, 0)[:1])  # its command PDV only: the data set is written below
    fragment = max_pdu - 6
    out = bytearray(command)
    pdus = 1
    payload = bytes(range(256)) * (fragment // 256 + 1)
    sent = 0
    while sent < size:
        n = min(fragment, size - sent)
        control = 0x02 if sent + n == size else 0x00
        out += struct.pack(">BBLLBB", 0x04, 0, n + 6, n + 2, 1, control) + payload[:n]
        sent += n
        pdus += 1
    return bytes(out), pdus


def test_a_20_mb_data_set_is_counted_not_kept() -> None:
    size = 20 * 1024 * 1024
    raw, pdus = _big_store(size, 256 * 1024)
    mv = memoryview(raw)
    tap = AssociationTap()
    seen = Seen()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for start in range(0, len(raw), 65536):
            seen.add(tap.feed(mv[start : start + 65536]))
        seen.add(tap.feed(raw[:0]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen.commands == [Expected(C_STORE_RQ, message_id=1)]
    assert tap.data_bytes == size and tap.pdus == pdus and tap.at_boundary
    # A few small objects per chunk (slices, events), nothing in proportion to the data.
    assert peak - base < 32 * 1024, peak - base
    # And nothing the tap holds is bigger than a header or a command set.
    for name in AssociationTap.__slots__:
        value = getattr(tap, name)
        assert isinstance(value, int | bytearray), (name, type(value))
        assert sys.getsizeof(value) < 1024, name


def test_a_data_set_in_one_huge_chunk_is_not_copied() -> None:
    raw, pdus = _big_store(20 * 1024 * 1024, 16 * 1024 * 1024)
    tap = AssociationTap()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        events = tap.feed(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert events is not None and len(events.commands) == 1 and tap.pdus == pdus
    assert peak - base < 32 * 1024, peak - base


# --------------------------------------------------------------------------- violations

_ECHO = dicom_dimse.encode_c_echo_rq(1)


ASSOCIATE = {"rq": pn_rq(), "ac": pn_ac(), "rj": pn_rj()}
GOOD = bytes(CLIENT.data[: CLIENT.pdu_ends[0]])  # a C-ECHO-RQ: violations also come after valid PDUs

VIOLATIONS: dict[str, tuple[bytes, str]] = {
    "associate-rq": (ASSOCIATE["rq"], "type 0x01"),
    "associate-ac": (ASSOCIATE["ac"], "type 0x02"),
    "associate-rj": (ASSOCIATE["rj"], "type 0x03"),
    "type-0x00": (bytes.fromhex("00 00 00000004 00000000"), "type 0x00"),
    "type-0x09": (bytes.fromhex("09 00 00000004 00000000"), "type 0x09"),
    "type-0xff": (bytes.fromhex("ff 00 00000004 00000000"), "type 0xff"),
    "http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "type 0x47"),
    "release-rq-len-0": (bytes.fromhex("05 00 00000000"), "length 0"),
    "release-rq-len-3": (bytes.fromhex("05 00 00000003 000000"), "length 3"),
    "release-rq-len-5": (bytes.fromhex("05 00 00000005 0000000000"), "length 5"),
    "release-rp-len-6": (bytes.fromhex("06 00 00000006 000000000000"), "length 6"),
    "abort-len-huge": (bytes.fromhex("07 00 ffffffff"), "length 4294967295"),
    **{f"pdata-len-{n}": (struct.pack(">BBL", 4, 0, n) + b"\0" * n, f"P-DATA-TF of {n} bytes") for n in range(6)},
    "pdv-longer-than-pdu": (struct.pack(">BBLLBB", 4, 0, 10, 10, 1, 3) + b"\0" * 8, "does not fit"),
    "pdv-longer-than-pdu-by-1": (
        _pdata(_pdv(0x03, _ECHO))[:2] + struct.pack(">L", len(_ECHO) + 5) + _pdata(_pdv(0x03, _ECHO))[6:] + b"\0",
        "does not fit",
    ),
    "pdv-length-0": (struct.pack(">BBLLBB", 4, 0, 6, 0, 1, 3), "does not fit"),
    "pdv-length-1": (struct.pack(">BBLLBB", 4, 0, 6, 1, 1, 3), "does not fit"),
    **{
        f"pdv-leaves-{k}": (
            struct.pack(">BBL", 4, 0, len(_ECHO) + 6 + k) + _pdv(0x03, _ECHO)[0:] + b"\0" * k,
            f"{k} bytes left",
        )
        for k in range(1, 6)
    },
    "pdv-leaves-3-after-data": (
        _pdata(_pdv(0x03, bytes(pn_encode(_store_rq().command_set, True, True))))
        + struct.pack(">BBL", 4, 0, 8 + 3)
        + _pdv(0x02, b"ab")
        + b"\0\0\0",
        "3 bytes left",
    ),
    **{f"context-id-{c}": (_pdata(_pdv(0x03, _ECHO, context_id=c)), "not odd") for c in (0, 2, 128, 254)},
    "context-id-even-in-second-pdv": (_pdata(_pdv(0x01, _ECHO[:8]), _pdv(0x03, _ECHO[8:], 4)), "not odd"),
    "garbage-command-zeros": (_pdata(_pdv(0x03, b"\0" * 12)), "command set"),
    "garbage-command-short": (_pdata(_pdv(0x03, b"\x00\x00")), "truncated"),
    "garbage-command-group": (_pdata(_pdv(0x03, b"\x08\x00\x00\x00\x04\x00\x00\x00abcd")), "group 0000"),
    "garbage-command-group-length": (_pdata(_pdv(0x03, _ECHO[:8] + b"\x99" + _ECHO[9:])), "Group Length"),
    "garbage-command-no-field": (
        _pdata(_pdv(0x03, dicom_dimse.encode_command_set([(0x0800, b"\x01\x01")]))),
        "no Command Field",
    ),
    "garbage-command-text": (_pdata(_pdv(0x03, b"HELLO WORLD!")), "command set"),
}


@pytest.mark.parametrize("chunking", ["whole", "bytes"])
@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_violation_raises(name: str, chunking: str) -> None:
    bad, message = VIOLATIONS[name]
    raw = GOOD + bad
    tap = AssociationTap()
    with pytest.raises(DicomProtocolError) as info:
        if chunking == "whole":
            tap.feed(raw)
        else:
            for i in range(len(raw)):
                tap.feed(raw[i : i + 1])
    assert message in str(info.value)
    # The error carries the A-ABORT the relay sends: from the service provider (PS3.8 Table 9-26).
    assert info.value.abort_source == 2
    assert info.value.abort_reason in (0, 6)  # not specified (DIMSE), invalid PDU parameter (framing)


def test_violation_is_raised_from_the_header_before_the_body() -> None:
    # A PDU type 0x01 with a 4 GB length: the tap must not wait for (or buffer) the body.
    tap = AssociationTap()
    with pytest.raises(DicomProtocolError):
        tap.feed(bytes.fromhex("01 00 ffffffff"))
    # A PDV announcing more than its PDU: raised at the PDV header, not after reading it.
    tap = AssociationTap()
    with pytest.raises(DicomProtocolError):
        tap.feed(struct.pack(">BBLLBB", 4, 0, 100_000, 100_000, 1, 0))


@pytest.mark.parametrize("pieces", [1, 3, 40])
def test_command_set_over_max_command_raises(pieces: int) -> None:
    store = bytes(pn_encode(_store_rq().command_set, True, True))
    limit = len(store) - 1
    step = -(-len(store) // pieces)
    fragments = [store[i : i + step] for i in range(0, len(store), step)]
    if pieces > 1:  # the bound is on the reassembled set, not on one fragment
        assert all(len(f) <= limit for f in fragments)
    pdvs = [_pdv(0x01, f) for f in fragments[:-1]] + [_pdv(0x03, fragments[-1])]
    raw = b"".join(_pdata(p) for p in pdvs)
    AssociationTap(max_command=len(store)).feed(raw)  # one byte more is fine
    with pytest.raises(DicomProtocolError, match="longer than"):
        AssociationTap(max_command=limit).feed(raw)
    tap = AssociationTap(max_command=limit)
    with pytest.raises(DicomProtocolError, match="longer than"):
        for i in range(len(raw)):
            tap.feed(raw[i : i + 1])


def test_default_max_command_bounds_an_endless_command() -> None:
    # Non-last command fragments forever: the buffer must stop at MAX_COMMAND, not grow with the stream.
    chunk = _pdata(_pdv(0x01, b"\0" * 16000))
    tap = AssociationTap()
    with pytest.raises(DicomProtocolError, match="longer than"):
        for _ in range(MAX_COMMAND // 16000 + 2):
            tap.feed(chunk)
    assert len(tap._cmd) <= MAX_COMMAND


# --------------------------------------------------------------------------- fuzzing


def _feed_in_pieces(raw: bytes, cuts: list[int]) -> tuple[Seen, int, int, bool]:
    """Feed ``raw`` cut at ``cuts``: (events, data bytes, PDUs, raised). Only DicomProtocolError may escape."""
    tap = AssociationTap(max_command=4096)
    seen = Seen()
    try:
        for chunk in split_at(raw, cuts):
            seen.add(tap.feed(chunk))
    except DicomProtocolError:
        return seen, tap.data_bytes, tap.pdus, True
    assert 0 <= tap.data_bytes <= len(raw) and 0 <= tap.pdus <= len(raw) // 6
    return seen, tap.data_bytes, tap.pdus, False


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=20))
@example(bytes.fromhex("04 00 00000006 00000002 01 03"), [])
@example(bytes.fromhex("04 00 00000008 00000004 01 03 0000"), [7])
@example(bytes.fromhex("05 00 00000004 00000000 04 00 00000006"), [1, 2, 3])
def test_fuzz_arbitrary_bytes(raw: bytes, cuts: list[int]) -> None:
    _feed_in_pieces(raw, cuts)


_SEEDS = [
    b"".join(_pdata_pdu([p]) for p in _pdvs(_store_rq(), 3, 40)),
    bytes(SERVER.data[: SERVER.pdu_ends[4]]),
    bytes(_pdata(_pdv(0x01, _ECHO[:8]), _pdv(0x03, _ECHO[8:])) + bytes(A_RELEASE_RQ().encode())),
]


@FUZZ
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    st.integers(0, 10**6),
    st.lists(st.integers(0, 10**6), max_size=20),
)
def test_fuzz_mutated_valid_streams(seed: bytes, flips: list[tuple[int, int]], cut_end: int, cuts: list[int]) -> None:
    """Valid streams with a few bytes changed and a truncated end reach the deep states of the tap.
    Whatever the split, the stream is rejected or not, and a clean run reports the same events and
    counters."""
    raw = bytearray(seed)
    for pos, value in flips:
        raw[pos % len(raw)] = value
    raw = raw[: max(1, len(raw) - cut_end % 64)]
    one = _feed_in_pieces(bytes(raw), [])
    many = _feed_in_pieces(bytes(raw), [c % len(raw) for c in cuts])
    assert one[3] == many[3]  # a violation is one whatever the chunking
    if not one[3]:
        # Events completed before an error are lost with the raising call: compare clean runs only.
        assert one == many
