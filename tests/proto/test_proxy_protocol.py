"""Tests for medlb.proto.proxy_protocol: exact vectors, incremental parsing, rejection, fuzzing.

Expected bytes are written by hand from HAProxy doc/proxy-protocol.txt, never produced by
``encode``; the v2 TCP4 parse vector is a header captured from a real HAProxy.
"""

from __future__ import annotations

import ast
import inspect
import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from medlb.errors import ProtocolError, ProxyProtocolError
from medlb.proto import proxy_protocol as pp
from medlb.proto.proxy_protocol import ProxyHeader, encode, encode_v1, encode_v2, encode_v2_local, parse

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"

# --- hand-written vectors ----------------------------------------------------------------

V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"  # the example in spec §2.1
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1111 2222\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_LONGEST = (  # §2.1 worst case: exactly 107 bytes including CRLF
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)

V2_TCP4 = (
    SIG
    + b"\x21\x11\x00\x0c"  # PROXY, TCP over IPv4, 12 address bytes follow
    + b"\x01\x02\x03\x04"  # 1.2.3.4
    + b"\x05\x06\x07\x08"  # 5.6.7.8
    + b"\x04\x57\x08\xae"  # ports 1111, 2222
)
V2_TCP6 = (
    SIG
    + b"\x21\x21\x00\x24"  # PROXY, TCP over IPv6, 36 address bytes follow
    + b"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"  # 2001:db8::1
    + b"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02"  # 2001:db8::2
    + b"\x04\x57\x08\xae"  # ports 1111, 2222
)
V2_LOCAL = SIG + b"\x20\x00\x00\x00"
V2_TCP4_TLV = (
    SIG
    + b"\x21\x11\x00\x13"  # 12 address bytes + 7 TLV bytes
    + b"\x01\x02\x03\x04\x05\x06\x07\x08\x04\x57\x08\xae"
    + b"\x02\x00\x04pacs"  # PP2_TYPE_AUTHORITY, length 4, "pacs"
)
V2_UNSPEC = SIG + b"\x21\x00\x00\x00"
# Captured from HAProxy (send-proxy-v2): 172.19.0.1:42578 -> 172.19.0.3:80.
V2_HAPROXY_CAPTURE = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")

A4 = ("1.2.3.4", 1111)
B4 = ("5.6.7.8", 2222)
A6 = ("2001:db8::1", 1111)
B6 = ("2001:db8::2", 2222)

# (wire bytes, expected header) for parse
PARSE_VECTORS: list[tuple[bytes, ProxyHeader]] = [
    (V1_TCP4, ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), (), 47)),
    (V1_TCP6, ProxyHeader(1, "PROXY", "TCP6", A6, B6, (), 46)),
    (V1_UNKNOWN, ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), 15)),
    (V1_LONGEST, ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), 107)),
    (
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        ProxyHeader(1, "PROXY", "TCP4", ("0.0.0.0", 0), ("255.255.255.255", 65535), (), 44),
    ),
    (
        b"PROXY TCP6 ::FFFF:1.2.3.4 2001:DB8:0:0:0:0:0:1 1 2\r\n",  # upper case, long form: canonicalised
        ProxyHeader(1, "PROXY", "TCP6", (str(ipaddress.IPv6Address("::ffff:1.2.3.4")), 1), ("2001:db8::1", 2), (), 52),
    ),
    (V2_TCP4, ProxyHeader(2, "PROXY", "TCP4", A4, B4, (), 28)),
    (V2_TCP6, ProxyHeader(2, "PROXY", "TCP6", A6, B6, (), 52)),
    (V2_LOCAL, ProxyHeader(2, "LOCAL", "UNSPEC", None, None, (), 16)),
    (V2_TCP4_TLV, ProxyHeader(2, "PROXY", "TCP4", A4, B4, ((0x02, b"pacs"),), 35)),
    (V2_UNSPEC, ProxyHeader(2, "PROXY", "UNSPEC", None, None, (), 16)),
    (V2_HAPROXY_CAPTURE, ProxyHeader(2, "PROXY", "TCP4", ("172.19.0.1", 42578), ("172.19.0.3", 80), (), 28)),
    # LOCAL must skip its announced length even when it is not zero (§2.2), and ignore the family.
    (SIG + b"\x20\x11\x00\x0c" + bytes(12), ProxyHeader(2, "LOCAL", "UNSPEC", None, None, (), 28)),
    # UNSPEC: address information (whatever it is) is ignored.
    (SIG + b"\x21\x00\x00\x03abc", ProxyHeader(2, "PROXY", "UNSPEC", None, None, (), 19)),
    # A valid nibble pair the spec does not list (AF_INET + UNSPEC transport) falls back to UNSPEC.
    (SIG + b"\x21\x10\x00\x00", ProxyHeader(2, "PROXY", "UNSPEC", None, None, (), 16)),
    (
        SIG + b"\x21\x12\x00\x0c" + b"\x0a\x00\x00\x01\x0a\x00\x00\x02\x00\x35\x00\x35",
        ProxyHeader(2, "PROXY", "UDP4", ("10.0.0.1", 53), ("10.0.0.2", 53), (), 28),
    ),
    (SIG + b"\x21\x31\x00\xd8" + bytes(216), ProxyHeader(2, "PROXY", "UNIX_STREAM", None, None, (), 232)),
    # Empty TLV value and two TLVs in a row (NOOP padding, then a custom type).
    (
        SIG + b"\x21\x11\x00\x13" + bytes(12) + b"\x04\x00\x00" + b"\xe0\x00\x01\xff",
        ProxyHeader(2, "PROXY", "TCP4", ("0.0.0.0", 0), ("0.0.0.0", 0), ((0x04, b""), (0xE0, b"\xff")), 35),
    ),
]


# --- encoding: exact bytes ---------------------------------------------------------------


def test_encode_v1_tcp4() -> None:
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == V1_TCP4


def test_encode_v1_tcp6() -> None:
    assert encode_v1(A6, B6) == V1_TCP6


@pytest.mark.parametrize(("src", "dst"), [(A4, B6), (A6, B4)])
def test_encode_v1_mixed_families_is_unknown(src: tuple[str, int], dst: tuple[str, int]) -> None:
    assert encode_v1(src, dst) == V1_UNKNOWN


def test_encode_v1_canonicalises_and_drops_ipv6_scope() -> None:
    assert encode_v1(("2001:DB8:0::1%eth0", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"


def test_encode_v2_tcp4() -> None:
    assert encode_v2(A4, B4) == V2_TCP4


def test_encode_v2_tcp6() -> None:
    assert encode_v2(A6, B6) == V2_TCP6


def test_encode_v2_local() -> None:
    assert encode_v2_local() == V2_LOCAL


def test_encode_v2_with_tlv() -> None:
    assert encode_v2(A4, B4, [(0x02, b"pacs")]) == V2_TCP4_TLV


def test_encode_v2_mixed_families_is_unspec() -> None:
    assert encode_v2(A4, B6) == V2_UNSPEC


def test_encode_dispatches_on_version() -> None:
    assert encode("v1", ("192.168.0.1", 56324), ("192.168.0.11", 443)) == V1_TCP4
    assert encode("v2", A4, B4) == V2_TCP4


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode("v3", A4, B4),
        lambda: encode_v1(("1.2.3.4", 65536), B4),
        lambda: encode_v1(("1.2.3.4", -1), B4),
        lambda: encode_v2(A4, ("5.6.7.8", 70000)),
        lambda: encode_v1(("not-an-ip", 1), B4),
        lambda: encode_v2(A4, B4, [(256, b"")]),
        lambda: encode_v2(A4, B4, [(-1, b"")]),
        lambda: encode_v2(A4, B4, [(0xE0, bytes(0x10000))]),
        lambda: encode_v2(A4, B4, [(0xE0, bytes(0xFFFF))]),  # fits a TLV, not the uint16 header length
    ],
)
def test_encode_rejects_bad_arguments(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), PARSE_VECTORS)
def test_parse_whole(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected
    assert expected.length == len(data)


@pytest.mark.parametrize(("data", "expected"), PARSE_VECTORS)
def test_parse_byte_by_byte(data: bytes, expected: ProxyHeader) -> None:
    buf = bytearray()
    for i, byte in enumerate(data):
        assert parse(buf) is None, f"complete after {i} of {len(data)} bytes"
        buf.append(byte)
    assert parse(buf) == expected


@pytest.mark.parametrize(("data", "expected"), PARSE_VECTORS)
@pytest.mark.parametrize("trailing", [b"G", b"GET / HTTP/1.1\r\n\r\n", b"\r\n" * 100, SIG, b"PROXY TCP4 "])
def test_parse_with_trailing_data(data: bytes, expected: ProxyHeader, trailing: bytes) -> None:
    buf = data + trailing
    for view in (buf, bytearray(buf), memoryview(buf)):
        header = parse(view)
        assert header == expected
        assert buf[header.length :] == trailing


def test_parse_empty_needs_more() -> None:
    assert parse(b"") is None


def test_bytearray_can_be_resized_after_parse() -> None:
    buf = bytearray(V2_TCP4 + b"payload")
    header = parse(buf)
    assert header is not None
    del buf[: header.length]  # would raise BufferError if parse had kept a view
    assert buf == b"payload"

    bad = bytearray(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n")
    try:
        parse(bad)
    except ProxyProtocolError:
        bad.clear()  # the exception's traceback must not pin the buffer either
    assert bad == b""


def test_error_is_a_protocol_error() -> None:
    assert issubclass(ProxyProtocolError, ProtocolError)


@pytest.mark.parametrize(
    "data",
    [
        # neither v1 nor v2
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01",  # a TLS ClientHello
        b"\x00",
        b"p",  # lower case
        # bad v1 signature / protocol
        b"PROXY\r\n",
        b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4\r\n",
        # bad v1 line ending / shape
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY UNKNOWN\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
        # bad v1 addresses
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero (octal confusion, §2.1)
        b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 2001:db8::2 1 2\r\n",
        b"PROXY TCP6 2001:db8::1::2 2001:db8::2 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",
        b"PROXY TCP6 2001:db8:: 1:2:3:4:5:6:7:8:9 1 2\r\n",
        # bad v1 ports
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
        # bad v2 signature / version / command / family
        b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c",
        b"\r\n\r\n\x01",
        SIG + b"\x11\x11\x00\x0c",  # version 1 in the binary form
        SIG + b"\x31\x11\x00\x0c",  # version 3
        SIG + b"\x22\x11\x00\x0c",  # command 2
        SIG + b"\x2f\x11\x00\x0c",
        SIG + b"\x21\x41\x00\x0c",  # family 4
        SIG + b"\x21\x13\x00\x0c",  # transport 3
        SIG + b"\x20\xff\x00\x00",  # LOCAL does not make an invalid family byte valid
        # v2 length too short for the family
        SIG + b"\x21\x11\x00\x0b" + bytes(11),
        SIG + b"\x21\x11\x00\x00",
        SIG + b"\x21\x21\x00\x0c" + bytes(12),
        SIG + b"\x21\x22\x00\x23" + bytes(35),
        SIG + b"\x21\x31\x00\x0c" + bytes(12),
        # v2 TLVs that do not tile the remainder
        SIG + b"\x21\x11\x00\x0e" + bytes(12) + b"\x02\x00",
        SIG + b"\x21\x11\x00\x10" + bytes(12) + b"\x02\x00\x04pa",
        SIG + b"\x21\x11\x00\x14" + bytes(12) + b"\x02\x00\x04pacs" + b"\x01",
    ],
)
def test_parse_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data)


@pytest.mark.parametrize(
    "prefix",
    [
        b"G",  # first byte decides: not P, not CR
        b"PROXZ",
        b"PROXY X",
        b"PROXY TCP4X",
        b"PROXY UNKNOWNX",
        b"PROXY TCP4 1.2.3.4 x",  # a byte no address or port can contain, CRLF not seen yet
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"\r\n\r\n\x00\r\nQ\x00",
        SIG + b"\x11",  # bad version, before the family and length arrive
        SIG + b"\x23",  # bad command
        SIG + b"\x21\x51",  # bad family, before the length arrives
    ],
)
def test_parse_rejects_as_soon_as_possible(prefix: bytes) -> None:
    for i in range(1, len(prefix)):
        assert parse(prefix[:i]) is None, prefix[:i]
    with pytest.raises(ProxyProtocolError):
        parse(prefix)


def test_v1_without_crlf_in_107_bytes_is_rejected() -> None:
    line = b"PROXY UNKNOWN " + b"a" * (pp.V1_MAX_LENGTH - 14)
    assert len(line) == pp.V1_MAX_LENGTH
    assert parse(line[:-1]) is None  # 106 bytes: a CRLF may still come
    with pytest.raises(ProxyProtocolError):
        parse(line)
    with pytest.raises(ProxyProtocolError):
        parse(line + b"\r\n")  # CRLF at bytes 108-109 is too late
    with pytest.raises(ProxyProtocolError):
        parse(V1_LONGEST[:-2] + b" \r\n")  # 108 bytes


def test_v1_unknown_ignores_rest_of_line() -> None:
    header = parse(b"PROXY UNKNOWN \xff\x00anything at all\r\nDATA")
    assert header == ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), 33)


def test_v2_large_announced_length_waits_without_allocating() -> None:
    head = SIG + b"\x21\x11\xff\xff"
    assert parse(head) is None
    assert parse(head + bytes(1000)) is None
    tlv_len = 0xFFFF - 12 - 3
    full = head + bytes(12) + b"\xe0" + tlv_len.to_bytes(2, "big") + bytes(tlv_len)
    assert len(full) == pp.V2_MAX_LENGTH
    assert parse(full[:-1]) is None
    header = parse(full + b"next")
    assert header is not None
    assert header.length == pp.V2_MAX_LENGTH
    assert header.tlvs == ((0xE0, bytes(tlv_len)),)


# --- round trips and fuzzing -------------------------------------------------------------

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=5)


@given(
    ip=st.sampled_from([ipv4, ipv6]).flatmap(lambda s: st.tuples(s, s)),
    sp=ports,
    dp=ports,
    tlvs=tlv_lists,
    version=st.sampled_from(["v1", "v2"]),
    trailing=st.binary(max_size=50),
)
def test_round_trip(
    ip: tuple[str, str], sp: int, dp: int, tlvs: list[tuple[int, bytes]], version: str, trailing: bytes
) -> None:
    src, dst = (ip[0], sp), (ip[1], dp)
    wire = encode_v2(src, dst, tlvs) if version == "v2" else encode(version, src, dst)
    header = parse(wire + trailing)
    assert header is not None
    assert header.length == len(wire)
    assert header.version == (2 if version == "v2" else 1)
    assert header.command == "PROXY"
    assert header.family == ("TCP4" if ":" not in ip[0] else "TCP6")
    assert (header.src, header.dst) == (src, dst)
    assert header.tlvs == (tuple(tlvs) if version == "v2" else ())
    if version == "v1":
        assert len(wire) <= pp.V1_MAX_LENGTH


@given(src=st.one_of(ipv4, ipv6), dst=st.one_of(ipv4, ipv6), sp=ports, dp=ports)
def test_round_trip_any_family_pair(src: str, dst: str, sp: int, dp: int) -> None:
    for version in ("v1", "v2"):
        header = parse(encode(version, (src, sp), (dst, dp)))
        assert header is not None
        if (":" in src) != (":" in dst):
            assert header.family in ("UNKNOWN", "UNSPEC")
            assert header.src is None
            assert header.dst is None
        else:
            assert (header.src, header.dst) == ((src, sp), (dst, dp))


def _check_parse_contract(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    if header is None:
        return
    assert isinstance(header, ProxyHeader)
    assert 0 < header.length <= len(data)
    assert header.length <= (pp.V1_MAX_LENGTH if header.version == 1 else pp.V2_MAX_LENGTH)
    # Parsing exactly the header gives the same answer; every strict prefix needs more bytes
    # or is already rejected.
    assert parse(data[: header.length]) == header


@given(st.binary(max_size=400))
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
@example(SIG + b"\x21\x11\x00\x0c" + bytes(12))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_parse_contract(data)


@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG, SIG + b"\x21", SIG + b"\x20"]),
    st.binary(max_size=300),
)
def test_fuzz_after_valid_prefix(prefix: bytes, rest: bytes) -> None:
    _check_parse_contract(prefix + rest)


@given(
    st.sampled_from([b"PROXY TCP4 ", b"PROXY TCP6 "]),
    st.lists(st.sampled_from([*"0123456789abcdefABCDEF.: ", "\r\n", "\r", "%", "::", "255", "65535"]), max_size=60),
)
def test_fuzz_v1_address_alphabet(prefix: bytes, parts: list[str]) -> None:
    _check_parse_contract(prefix + "".join(parts).encode())


@given(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x10, 0x01]), st.binary(max_size=260))
def test_fuzz_v2_body(fam: int, body: bytes) -> None:
    _check_parse_contract(SIG + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body)


def test_module_is_sans_io() -> None:
    tree = ast.parse(inspect.getsource(pp))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "time", "uvloop", "selectors", "ssl"}
