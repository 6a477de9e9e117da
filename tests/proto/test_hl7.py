"""Tests for medlb.proto.hl7: header, field and ACK reading checked against python-hl7, ACK building
checked by python-hl7, error cases and fuzzing.

python-hl7 (``hl7`` on PyPI, nobody here wrote it) is the reference: every value medlb reads is
compared with what ``hl7.parse`` gives for the same message, and every ACK medlb builds must parse with
it. The sample messages follow the examples of HL7 v2.5.1 chapters 2, 3, 4 and 7.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import hl7
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medlb.errors import Hl7ProtocolError
from medlb.proto.hl7 import (
    ACK_CODES,
    Ack,
    FieldPath,
    Hl7Header,
    ack_mode,
    dedup_key,
    escape_text,
    field,
    format_timestamp,
    is_retryable,
    is_success,
    make_ack,
    nak_code,
    nak_for_error,
    parse_ack,
    parse_header,
)
from medlb.proto.mllp import MllpFramer

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- sample messages

ADT_A01 = (
    b"MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|GHH LAB, INC.|GOOD HEALTH HOSPITAL|198808181126|SECURITY|"
    b"ADT^A01^ADT_A01|MSG00001|P|2.5.1\r"
    b"EVN|A01|200708181123||\r"
    b"PID|1||PATID1234^5^M11^ADT1^MR^GOOD HEALTH HOSPITAL~123456789^^^USSSA^SS||EVERYMAN^ADAM^A^III||19610615|M||C|"
    b"2222 HOME STREET^^GREENSBORO^NC^27401-1020|GL|(555) 555-2004|(555)555-2004||S||PATID12345001^2^M10^ADT1^AN^A|"
    b"444333333|987654^NC\r"
    b"NK1|1|NUCLEAR^NELDA^W|SPO^SPOUSE||||NK^NEXT OF KIN\r"
    b"PV1|1|I|2000^2012^01||||004777^ATTEND^AARON^A|||SUR||||ADM|A0\r"
)
# An ORU carrying a PDF report in OBX-5 (ED: ^application^pdf^Base64^data).
PDF_B64 = (
    b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFIvRmlsdGVyIC9GbGF0ZURlY29kZT4+CnN0cmVhbQp4nCvkMlAwAEJD" * 40
)
ORU_R01 = (
    b"MSH|^~\\&|GHH LAB|ELAB-3|GHH OE|BLDG4|200202150930||ORU^R01^ORU_R01|CNTRL-3456|P|2.4\r"
    b"PID|||555-44-4444||EVERYWOMAN^EVE^E^^^^L|JONES|19620320|F|||153 FERNWOOD DR.^^STATESVILLE^OH^35292||"
    b"(206)3345232|(206)752-121||||AC555444444||67-A4335^OH^20030520\r"
    b"OBR|1|845439^GHH OE|1045813^GHH LAB|15545^GLUCOSE|||200202150730|||||||||555-55-5555^PRIMARY^PATRICIA P^^^^MD"
    b"^^|||||||||F||||||444-44-4444^HIPPOCRATES^HOWARD H^^^^MD\r"
    b"OBX|1|SN|1554-5^GLUCOSE^POST 12H CFST:MCNC:PT:SER/PLAS:QN||^182|mg/dl|70_105|H|||F\r"
    b"OBX|2|ED|PDF^Report^L||^application^pdf^Base64^" + PDF_B64 + b"||||||F\r"
)
ORM_O01 = (
    b"MSH|^~\\&|CPOE|HOSP|RIS|RAD|20240301101500||ORM^O01^ORM_O01|ORD-778|P|2.3.1\r"
    b"PID|1||MRN778^^^HOSP^MR||DOE^JANE||19800101|F\r"
    b"PV1|1|O|RAD^^^HOSP\r"
    b"ORC|NW|PLC-1|||||^^^20240301110000^^R\r"
    b"OBR|1|PLC-1||71020^CHEST XRAY 2 VIEWS^CPT|||20240301101000\r"
)
# Any punctuation may be a delimiter: field *, component %, repetition $, escape \, subcomponent !.
CUSTOM = (
    b"MSH*%$\\!*LIS*LAB%1.2.3%ISO*HIS*WARD*20240301*SEC*ADT%A08%ADT_A01*CUS-1*T*2.5\r"
    b"PID*1**X1%%%LAB%MR$X2%%%NAT!SUB%SS**ROE%RICHARD\r"
)
# Enhanced mode, v2.7 truncation character, UTF-8 declared in MSH-18.
ENHANCED = (
    "MSH|^~\\&#|PACS|RADIOLOGY|RIS|HOSP|20240301120000+0100||ADT^A08^ADT_A01|ENH-42|P|2.7|||AL|NE||UNICODE UTF-8\r"
    "PID|1||M-42^^^HOSP^MR||MÜLLER^ZOË\r"
).encode()
LATIN1 = ("MSH|^~\\&|LAB|HÔPITAL|HIS|CHU|20240301||ADT^A31|LAT-1|P|2.5||||||8859/1\rPID|1||P1||GARÇON^HÉLÈNE\r").encode(
    "latin-1"
)

SAMPLES: dict[str, tuple[bytes, str]] = {
    "adt_a01": (ADT_A01, "utf-8"),
    "oru_r01_pdf": (ORU_R01, "utf-8"),
    "orm_o01": (ORM_O01, "utf-8"),
    "custom_separators": (CUSTOM, "utf-8"),
    "enhanced_utf8": (ENHANCED, "utf-8"),
    "latin1": (LATIN1, "latin-1"),
    "adt_a01_lf": (ADT_A01.replace(b"\r", b"\n"), "utf-8"),
    "adt_a01_crlf": (ADT_A01.replace(b"\r", b"\r\n"), "utf-8"),
    "no_trailing_cr": (ORM_O01.rstrip(b"\r"), "utf-8"),
}


def reference(payload: bytes, encoding: str) -> hl7.Message:
    """python-hl7's parse of ``payload``; it only knows CR as a segment terminator, so normalise first."""
    return hl7.parse(re.sub(rb"\r\n|\n", b"\r", payload).decode(encoding))


def as_text(value: str, encoding: str) -> str:
    """A Latin-1 header value decoded with the message's real character set."""
    return value.encode("latin-1").decode(encoding)


# --------------------------------------------------------------------------- parse_header vs python-hl7

HEADER_FIELDS = {
    1: "field_separator",
    2: "encoding_characters",
    3: "sending_application",
    4: "sending_facility",
    5: "receiving_application",
    6: "receiving_facility",
    7: "date_time",
    9: "message_type",
    10: "control_id",
    11: "processing_id",
    12: "version",
    15: "accept_ack_type",
    16: "application_ack_type",
    18: "charset",
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_parse_header_matches_python_hl7(name: str) -> None:
    payload, encoding = SAMPLES[name]
    header = parse_header(payload)
    msh = reference(payload, encoding).segment("MSH")
    for n, attr in HEADER_FIELDS.items():
        expected = str(msh(n)) if n < len(msh) else ""
        assert as_text(getattr(header, attr), encoding) == expected, f"MSH-{n}"
    assert header.message_code == str(msh(9)(1)(1))
    assert header.trigger_event == str(msh(9)(1)(2))
    if len(msh(9)(1)) > 2:
        assert header.message_structure == str(msh(9)(1)(3))


def test_parse_header_values() -> None:
    h = parse_header(ADT_A01)
    assert (h.message_code, h.trigger_event, h.message_structure) == ("ADT", "A01", "ADT_A01")
    assert h.control_id == "MSG00001" and h.version == "2.5.1" and h.processing_id == "P"
    assert ack_mode(h) == "original"
    c = parse_header(CUSTOM)
    assert (c.field_separator, c.component_separator, c.repetition_separator) == ("*", "%", "$")
    assert (c.escape_character, c.subcomponent_separator) == ("\\", "!")
    assert c.sending_facility == "LAB%1.2.3%ISO" and c.trigger_event == "A08"
    e = parse_header(ENHANCED)
    assert (e.accept_ack_type, e.application_ack_type, e.charset) == ("AL", "NE", "UNICODE UTF-8")
    assert e.encoding_characters == "^~\\&#"
    assert ack_mode(e) == "enhanced"
    old = parse_header(b"MSH|^~\\&|A|B|C|D|1999||ADT^A01|OLD|P|2.2\r")
    assert old.message_structure == "" and old.charset == ""


def test_parse_header_reads_only_the_msh_segment() -> None:
    # A message whose second segment is garbage still has a readable header.
    h = parse_header(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|ONLY|P|2.5\r\x00\xff garbage \x1a")
    assert h.control_id == "ONLY"
    assert parse_header(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|END").control_id == "END"


def test_non_ascii_header_bytes_survive() -> None:
    h = parse_header(LATIN1)
    assert h.sending_facility.encode("latin-1") == "HÔPITAL".encode("latin-1")
    assert dedup_key(h) == (b"LAB", "HÔPITAL".encode("latin-1"), b"LAT-1")


def test_dedup_key() -> None:
    assert dedup_key(parse_header(ADT_A01)) == (b"ADT1", b"GOOD HEALTH HOSPITAL", b"MSG00001")
    assert dedup_key(parse_header(CUSTOM)) == (b"LIS", b"LAB%1.2.3%ISO", b"CUS-1")


@pytest.mark.parametrize(
    ("msh_15_16", "mode"),
    [("||", "original"), ("|AL|", "enhanced"), ("||NE", "enhanced"), ("|NE|NE", "enhanced")],
)
def test_ack_mode(msh_15_16: str, mode: str) -> None:
    payload = f"MSH|^~\\&|A|B|C|D|2024||ADT^A01|X|P|2.5||{msh_15_16}\r".encode()
    assert ack_mode(parse_header(payload)) == mode


# --------------------------------------------------------------------------- header errors


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "does not start with MSH"),
        (b"MS", "does not start with MSH"),
        (b"PID|1||X\rMSH|^~\\&|A|B|C|D|2024||ADT^A01|X|P|2.5\r", "does not start with MSH"),
        (b" MSH|^~\\&|A|B|C|D|2024||ADT^A01|X|P|2.5\r", "does not start with MSH"),
        (b"BHS|^~\\&|A|B|C|D|2024\r", "does not start with MSH"),
        (b"msh|^~\\&|A|B|C|D|2024||ADT^A01|X|P|2.5\r", "does not start with MSH"),
        (b"MSH", "no field separator"),
        (b"MSHA^~\\&A", "invalid field separator"),
        (b"MSH\r^~\\&", "invalid field separator"),
        (b"MSH ^~\\& A", "invalid field separator"),
        (b"MSH\x00^~\\&\x00", "invalid field separator"),
        (b"MSH\xa6^~\\&\xa6", "invalid field separator"),
        (b"MSH|^~\\|A|B|C|D|2024||ADT^A01|X|P|2.5\r", "encoding characters"),  # 3 characters
        (b"MSH|^~\\&#$|A|B|C|D|2024||ADT^A01|X|P|2.5\r", "encoding characters"),  # 6 characters
        (b"MSH|^^\\&|A|B|C|D|2024||ADT^A01|X|P|2.5\r", "encoding characters"),  # duplicate
        (b"MSH|^~a&|A|B|C|D|2024||ADT^A01|X|P|2.5\r", "encoding characters"),  # a letter
        (b"MSH|^~\\&\r", "MSH-10"),
        (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01\r", "MSH-10"),
        (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\r", "MSH-10"),
        (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01\rPID|1|2|3|4|5|6|7|8|9|10\r", "MSH-10"),  # not from the next segment
    ],
)
def test_parse_header_errors(payload: bytes, match: str) -> None:
    with pytest.raises(Hl7ProtocolError, match=match) as info:
        parse_header(payload)
    assert info.value.ack_code is None  # an unreadable header cannot be answered: close


# --------------------------------------------------------------------------- field paths vs python-hl7


@pytest.mark.parametrize(
    ("name", "path", "accessor"),
    [
        ("adt_a01", "PID-3", None),
        ("adt_a01", "PID-3.1", "PID.F3.R1.C1"),
        ("adt_a01", "PID-3.4", "PID.F3.R1.C4"),
        ("adt_a01", "PID-3[2].1", "PID.F3.R2.C1"),
        ("adt_a01", "PID-3[2].5", "PID.F3.R2.C5"),
        ("adt_a01", "PID-5.2", "PID.F5.R1.C2"),
        ("adt_a01", "PV1-3.2", "PV1.F3.R1.C2"),
        ("adt_a01", "MSH-9.2", "MSH.F9.R1.C2"),
        ("adt_a01", "MSH-4", None),
        ("adt_a01", "MSH-10", None),
        ("adt_a01_lf", "PID-3.1", "PID.F3.R1.C1"),
        ("adt_a01_crlf", "NK1-2.1", "NK1.F2.R1.C1"),
        ("oru_r01_pdf", "OBX-5", None),
        ("oru_r01_pdf", "OBX-5.2", "OBX.F5.R1.C2"),
        ("oru_r01_pdf", "OBR-4.2", "OBR.F4.R1.C2"),
        ("oru_r01_pdf", "PID-3", None),
        ("orm_o01", "ORC-1", None),
        ("orm_o01", "PID-3.1", "PID.F3.R1.C1"),
        ("custom_separators", "PID-3", None),
        ("custom_separators", "PID-3.1", "PID.F3.R1.C1"),
        ("custom_separators", "PID-3[2].4.1", "PID.F3.R2.C4.S1"),
        ("custom_separators", "PID-3[2].4.2", "PID.F3.R2.C4.S2"),
        ("custom_separators", "MSH-4.2", "MSH.F4.R1.C2"),
        ("enhanced_utf8", "PID-5.1", "PID.F5.R1.C1"),
        ("latin1", "PID-5.2", "PID.F5.R1.C2"),
    ],
)
def test_field_paths_match_python_hl7(name: str, path: str, accessor: str | None) -> None:
    payload, encoding = SAMPLES[name]
    msg = reference(payload, encoding)
    got = field(payload, path)
    assert got is not None
    fp = FieldPath(path)
    if accessor is None:
        seg = msg.segment(fp.segment)
        assert got.decode(encoding) == str(seg(fp.field))
    else:
        assert got.decode(encoding) == msg[accessor]
    assert FieldPath(path).get(payload) == got


def test_field_path_values() -> None:
    assert field(ADT_A01, "PID-3") == b"PATID1234^5^M11^ADT1^MR^GOOD HEALTH HOSPITAL~123456789^^^USSSA^SS"
    assert field(ADT_A01, "PID-3[1]") == b"PATID1234^5^M11^ADT1^MR^GOOD HEALTH HOSPITAL"
    assert field(ADT_A01, "PID-3[2]") == b"123456789^^^USSSA^SS"
    assert field(ADT_A01, "PID-3.1") == b"PATID1234"
    assert field(ADT_A01, "PID-2") == b""  # present but empty
    assert field(ADT_A01, "MSH-1") == b"|"
    assert field(ADT_A01, "MSH-2") == b"^~\\&"
    assert field(ADT_A01, "MSH-2.3") == b"^~\\&"  # the delimiters are never split
    assert field(ADT_A01, "MSH-3") == b"ADT1"
    assert field(ADT_A01, "MSH-12") == b"2.5.1"
    assert field(ORU_R01, "OBX-1") == b"1"  # the first OBX
    assert field(ORU_R01, "OBX-5.5") is None  # the first OBX is the glucose value, not the PDF
    only_pdf = ORU_R01.replace(b"OBX|1|SN|", b"NTE|1|SN|")
    assert field(only_pdf, "OBX-5.5") == PDF_B64
    assert field(CUSTOM, "MSH-1") == b"*"
    assert field(LATIN1, "PID-5.2") == "HÉLÈNE".encode("latin-1")
    assert field(ENHANCED, "PID-5.1") == "MÜLLER".encode()


@pytest.mark.parametrize(
    "path",
    ["ZZZ-1", "PID-40", "PID-3[3]", "PID-3[3].1", "PID-3.7", "PID-3[2].2.2", "MSH-30", "PV2-1", "NK1-2.4"],
)
def test_absent_values_are_none(path: str) -> None:
    assert field(ADT_A01, path) is None


def test_segment_names_match_exactly() -> None:
    payload = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|X|P|2.5\rPIDX|wrong\rZPI|wrong\rPID|right\r"
    assert field(payload, "PID-1") == b"right"
    # The first occurrence wins, even when it has no fields.
    assert field(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|X|P|2.5\rPID\rPID|later\r", "PID-1") is None
    assert field(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|X|P|2.5\rPID|last", "PID-1") == b"last"


def test_field_path_spec() -> None:
    fp = FieldPath("PID-3[2].4.1")
    assert (fp.segment, fp.field, fp.repetition, fp.component, fp.subcomponent) == ("PID", 3, 2, 4, 1)
    assert str(fp) == "PID-3[2].4.1"
    assert FieldPath("pid-3.1") == FieldPath("PID-3.1")
    assert hash(FieldPath("PID-3")) == hash(FieldPath("PID-3"))
    assert FieldPath(" OBX-5 ").field == 5
    assert str(FieldPath("ZP1-12")) == "ZP1-12"
    with pytest.raises(AttributeError):
        fp.field = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "spec", ["", "PID", "PID-0", "PID-3.0", "PID-3[0]", "PI-3", "PIDX-3", "PID.3", "1ID-3", "PID-3.1.1.1", "PID-x"]
)
def test_invalid_field_path_is_a_value_error(spec: str) -> None:
    with pytest.raises(ValueError):
        FieldPath(spec)


def test_field_on_a_non_hl7_payload_raises_protocol_error() -> None:
    with pytest.raises(Hl7ProtocolError):
        field(b"GET / HTTP/1.1\r\n", "PID-3")


# --------------------------------------------------------------------------- make_ack, checked by python-hl7


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_make_ack_parses_with_python_hl7(name: str, code: str) -> None:
    payload, encoding = SAMPLES[name]
    header = parse_header(payload)
    original = reference(payload, encoding).segment("MSH")
    ack_bytes = make_ack(header, code, timestamp="20240301120000", control_id="MEDLB-1")
    ack = hl7.parse(ack_bytes.decode(encoding))
    msh, msa = ack.segment("MSH"), ack.segment("MSA")
    assert str(msa(1)) == code
    assert str(msa(2)) == str(original(10))  # MSA-2 echoes the original MSH-10
    assert [str(msh(n)) for n in (3, 4, 5, 6)] == [str(original(n)) for n in (5, 6, 3, 4)]
    assert str(msh(1)) == str(original(1)) and str(msh(2)) == str(original(2))
    assert str(msh(7)) == "20240301120000"
    assert str(msh(9)) == f"ACK{header.component_separator}{header.trigger_event}{header.component_separator}ACK"
    assert str(msh(10)) == "MEDLB-1"
    assert str(msh(11)) == str(original(11)) and str(msh(12)) == str(original(12))
    assert str(msh(18) if len(msh) > 18 else "") == (str(original(18)) if len(original) > 18 else "")
    # medlb reads its own ACK back too.
    assert parse_ack(ack_bytes) == Ack(code, header.control_id)
    assert parse_ack(ack_bytes).acknowledges(header)
    assert ack_bytes.endswith(b"\r") and b"\n" not in ack_bytes


@pytest.mark.parametrize("name", ["adt_a01", "orm_o01", "custom_separators"])
def test_make_ack_equals_python_hl7_create_ack(name: str) -> None:
    payload, encoding = SAMPLES[name]
    theirs = reference(payload, encoding).create_ack("AR", message_id="ACK-9")
    ts = str(theirs.segment("MSH")(7))
    ours = make_ack(parse_header(payload), "AR", timestamp=ts, control_id="ACK-9")
    assert ours == str(theirs).encode(encoding)


def test_make_ack_copies_header_bytes_exactly() -> None:
    header = parse_header(LATIN1)
    ack = make_ack(header, "AE", timestamp="20240301")
    assert ack.startswith("MSH|^~\\&|HIS|CHU|LAB|HÔPITAL|20240301||ACK^A31^ACK|LAT-1|P|2.5".encode("latin-1"))
    assert b"||||||8859/1\rMSA|AE|LAT-1\r" in ack
    utf = make_ack(parse_header(ENHANCED), "CA", timestamp="20240301")
    assert str(hl7.parse(utf.decode()).segment("MSH")(18)) == "UNICODE UTF-8"


def test_make_ack_escapes_text() -> None:
    header = parse_header(ADT_A01)
    text = "bad | field ^ with ~ and & and \\ and\r\nnewlines, and ü"
    ack = make_ack(header, "AE", text, timestamp="20240301", control_id="X")
    msa = hl7.parse(ack.decode("ascii")).segment("MSA")
    assert len(msa) == 4  # the text did not split MSA
    assert hl7.parse(ack.decode()).unescape(str(msa(3))) == "bad | field ^ with ~ and & and \\ and  newlines, and ?"
    assert parse_ack(ack).text == str(msa(3))
    custom = parse_header(CUSTOM)
    assert escape_text("a*b%c$d!e\\f|g", custom) == "a\\F\\b\\S\\c\\R\\d\\T\\e\\E\\f|g"
    assert escape_text("cut#here", parse_header(ENHANCED)) == "cut\\P\\here"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"code": "OK", "timestamp": "2024"},
        {"code": "aa", "timestamp": "2024"},
        {"code": "AA", "timestamp": "2024|x"},
        {"code": "AA", "timestamp": "2024\r"},
        {"code": "AA", "timestamp": "2024", "control_id": "a^b"},
        {"code": "AA", "timestamp": "2024", "control_id": "ü"},
    ],
)
def test_make_ack_refuses_bad_arguments(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        make_ack(parse_header(ADT_A01), **kwargs)


def test_format_timestamp() -> None:
    assert format_timestamp(datetime(2024, 3, 1, 12, 5, 9)) == "20240301120509"
    assert format_timestamp(datetime(2024, 3, 1, 12, 5, 9, tzinfo=UTC)) == "20240301120509+0000"
    cet = timezone(timedelta(hours=1))
    assert format_timestamp(datetime(2024, 3, 1, 12, 5, 9, tzinfo=cet)) == "20240301120509+0100"


# --------------------------------------------------------------------------- parse_ack


@pytest.mark.parametrize("name", ["adt_a01", "oru_r01_pdf", "custom_separators", "enhanced_utf8", "latin1"])
@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_parse_ack_of_python_hl7_create_ack(name: str, code: str) -> None:
    payload, encoding = SAMPLES[name]
    theirs = reference(payload, encoding).create_ack(code)
    ack = parse_ack(str(theirs).encode(encoding))
    assert ack == Ack(code, parse_header(payload).control_id, None)
    assert ack.acknowledges(parse_header(payload))
    assert ack.success == (code in ("AA", "CA"))


def test_parse_ack_text_and_err() -> None:
    base = b"MSH|^~\\&|B|B|A|A|2024||ACK^A01^ACK|K1|P|2.5\r"
    assert parse_ack(base + b"MSA|AE|MSG1|Unknown patient\r") == Ack("AE", "MSG1", "Unknown patient")
    err = b"ERR||PID^1^3|204^Unknown key identifier^HL70357|E||||Patient not found\r"
    assert parse_ack(base + b"MSA|AE|MSG1\r" + err).text == "Patient not found"
    assert parse_ack(base + b"MSA|AR|MSG1||\r").text is None
    assert parse_ack(base + b"MSA|AA\r") == Ack("AA", "", None)
    # An original-mode application response need not be an ACK.
    rsp = b"MSH|^~\\&|B|B|A|A|2024||ORL^O22^ORL_O22|K2|P|2.5\rMSA|AA|ORD-778\rPID|1\r"
    assert parse_ack(rsp) == Ack("AA", "ORD-778")
    assert not parse_ack(rsp).acknowledges(parse_header(ADT_A01))
    # LF-terminated answers, as some servers send them.
    assert parse_ack(base.replace(b"\r", b"\n") + b"MSA|CA|MSG1\n").code == "CA"


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"MSH|^~\\&|B|B|A|A|2024||ACK^A01^ACK|K1|P|2.5\r", "no MSA"),
        (b"MSH|^~\\&|B|B|A|A|2024||ACK^A01^ACK|K1|P|2.5\rMSAX|AA|X\r", "no MSA"),
        (b"MSH|^~\\&|B|B|A|A|2024||ACK^A01^ACK|K1|P|2.5\rMSA||MSG1\r", "MSA-1"),
        (b"MSH|^~\\&|B|B|A|A|2024||ACK^A01^ACK|K1|P|2.5\rMSA\r", "MSA-1"),
        (b"MSA|AA|MSG1\r", "does not start with MSH"),
        (b"", "does not start with MSH"),
    ],
)
def test_parse_ack_errors(payload: bytes, match: str) -> None:
    with pytest.raises(Hl7ProtocolError, match=match):
        parse_ack(payload)


# --------------------------------------------------------------------------- classification


def test_classification() -> None:
    assert sorted(ACK_CODES) == ["AA", "AE", "AR", "CA", "CE", "CR"]
    assert [c for c in sorted(ACK_CODES) if is_success(c)] == ["AA", "CA"]
    assert [c for c in sorted(ACK_CODES) if is_retryable(c)] == ["AR", "CR"]
    assert [c for c in sorted(ACK_CODES) if is_retryable(c, retry_on_ae=True)] == ["AE", "AR", "CE", "CR"]
    assert not is_success("XX") and not is_retryable("XX", retry_on_ae=True)
    original, enhanced = parse_header(ADT_A01), parse_header(ENHANCED)
    assert [nak_code(original, c) for c in ("AE", "AR", "CE", "CR", "AA")] == ["AE", "AR", "AE", "AR", "AA"]
    assert [nak_code(enhanced, c) for c in ("AE", "AR", "CE", "CR", "AA")] == ["CE", "CR", "CE", "CR", "CA"]


# --------------------------------------------------------------------------- framing errors -> NAK


def test_nak_for_truncated_message() -> None:
    f = MllpFramer()
    f.feed(b"\x0b" + ADT_A01[:200])
    with pytest.raises(Hl7ProtocolError) as info:
        f.feed(b"\x0b" + ORM_O01 + b"\x1c\r")
    nak = nak_for_error(info.value, timestamp="20240301", control_id="NAK-1")
    assert nak is not None
    msg = hl7.parse(nak.decode())
    assert str(msg.segment("MSA")(1)) == "AR" and str(msg.segment("MSA")(2)) == "MSG00001"
    assert str(msg.segment("MSH")(10)) == "NAK-1"
    assert "end block is missing" in str(msg.segment("MSA")(3))


def test_nak_for_oversize_enhanced_message_is_ce() -> None:
    f = MllpFramer(max_message=1000)
    with pytest.raises(Hl7ProtocolError) as info:
        f.feed(b"\x0b" + ENHANCED + b"x" * 2000)
    nak = nak_for_error(info.value, timestamp="20240301")
    assert nak is not None
    assert parse_ack(nak) == Ack("CE", "ENH-42", "message larger than max_message (1000 bytes)")


def test_no_nak_for_junk_or_unreadable_head() -> None:
    with pytest.raises(Hl7ProtocolError) as junk:
        MllpFramer().feed(b"hello")
    assert nak_for_error(junk.value, timestamp="2024") is None
    # A truncated message whose MSH-10 never arrived cannot be answered either.
    f = MllpFramer()
    f.feed(b"\x0bMSH|^~\\&|A|B|C")
    with pytest.raises(Hl7ProtocolError) as cut:
        f.feed(b"\x0b")
    assert cut.value.ack_code == "AR"
    assert nak_for_error(cut.value, timestamp="2024") is None


# --------------------------------------------------------------------------- properties and fuzzing

TEXT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .-_/:()+", max_size=12)
COMPONENT = st.lists(TEXT, min_size=1, max_size=4).map("^".join)
FIELD = st.lists(COMPONENT, min_size=1, max_size=3).map("~".join)


@settings(FUZZ, max_examples=80)  # python-hl7 parsing is the slow part
@given(
    msh=st.lists(FIELD, min_size=16, max_size=16),
    control_id=TEXT.filter(bool),
    pid=st.lists(FIELD, min_size=1, max_size=6),
    terminator=st.sampled_from(["\r", "\n", "\r\n"]),
)
def test_generated_messages_match_python_hl7(msh: list[str], control_id: str, pid: list[str], terminator: str) -> None:
    msh[7] = control_id  # index 7 is MSH-10
    # The ZZZ segment keeps python-hl7 from stripping trailing spaces off the last PID field.
    text = terminator.join(["MSH|^~\\&|" + "|".join(msh), "PID|" + "|".join(pid), "ZZZ|end", ""])
    payload = text.encode()
    header = parse_header(payload)
    ref = reference(payload, "ascii")
    ref_msh = ref.segment("MSH")
    for n, attr in HEADER_FIELDS.items():
        assert getattr(header, attr) == (str(ref_msh(n)) if n < len(ref_msh) else ""), f"MSH-{n}"
    ref_pid = ref.segment("PID")
    for n in range(1, len(pid) + 1):
        assert field(payload, f"PID-{n}") == str(ref_pid(n)).encode()
        assert field(payload, f"PID-{n}.1") == ref[f"PID.F{n}.R1.C1"].encode()
    assert field(payload, f"PID-{len(pid) + 1}") is None
    assert parse_ack(make_ack(header, "AA", timestamp="2024")).acknowledges(header)


@FUZZ
@given(data=st.binary(max_size=200) | st.binary(max_size=120).map(lambda b: b"MSH|^~\\&|" + b))
@example(data=b"MSH|^~\\&|||||||||")
@example(data=b"MSH|^~\\&|A|B|C|D|E|F|G^H|X|\rMSA|")
def test_fuzz_parsers_raise_only_protocol_errors(data: bytes) -> None:
    try:
        header = parse_header(data)
    except Hl7ProtocolError:
        pass
    else:
        assert isinstance(header, Hl7Header) and header.control_id
        ack = make_ack(header, "AR", "fuzz", timestamp="2024")
        assert parse_ack(ack).control_id == header.control_id
    for path in ("PID-3", "PID-3[2].1.1", "MSH-9.2", "MSH-2", "OBX-5.5"):
        try:
            value = field(data, path)
        except Hl7ProtocolError:
            pass
        else:
            assert value is None or isinstance(value, bytes)
    try:
        assert isinstance(parse_ack(data), Ack)
    except Hl7ProtocolError:
        pass
