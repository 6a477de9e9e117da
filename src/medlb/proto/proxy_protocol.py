"""Encode and parse HAProxy PROXY protocol headers (versions 1 and 2), sans-IO.

Spec: HAProxy ``doc/proxy-protocol.txt`` ("The PROXY protocol, Versions 1 & 2"),
section 2.1 (v1, text) and section 2.2 (v2, binary, with TLVs in 2.2.1-2.2.8).

Theory of operation
-------------------
A proxy that speaks the PROXY protocol prepends one header to the byte stream of
a connection it opens, telling the receiver who the real client was. This module
builds that header on the send side and decodes it on the accept side. It does no
I/O: bytes in, values (or bytes) out, so it can be tested byte by byte.

Sending (``encode_v1``, ``encode_v2``, ``encode_v2_local``, ``encode``):

* v1 is one ASCII line, at most 107 bytes including CRLF::

      PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\\r\\n
      PROXY UNKNOWN\\r\\n

  ``TCP4``/``TCP6`` follows the address family; when source and destination
  families differ there is no valid ``TCPx`` line, so ``UNKNOWN`` is sent (§2.1:
  "only when it is not possible to correctly fill the PROXY line").
* v2 is a 16-byte fixed part -- the 12-byte signature
  ``0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A``, ``ver_cmd`` (0x21 PROXY, 0x20 LOCAL),
  ``fam`` (0x11 TCP4, 0x21 TCP6, 0x00 UNSPEC) and a big-endian uint16 length of
  what follows -- then the address block (12 bytes for IPv4, 36 for IPv6:
  source address, destination address, source port, destination port), then
  optional TLVs (type: 1 byte, length: 2 bytes big-endian, value). Mixed
  families are sent as PROXY + UNSPEC with no address block, the v2 analogue of
  v1 ``UNKNOWN``. ``encode_v2_local`` is the header for the proxy's own
  connections (health checks): the receiver uses the real endpoints.

Receiving (``parse``): call it with everything received so far. It returns

* ``None`` while the header is incomplete (more bytes are needed), or
* a :class:`ProxyHeader` whose ``length`` is the number of bytes the header
  occupies; every byte after that is payload and must be replayed to the
  application layer, or
* raises :class:`~medlb.errors.ProxyProtocolError` as soon as the bytes seen so
  far cannot start a valid header (§2.1: "abort the connection as soon as
  possible").

The version is chosen by the first byte: ``P`` starts v1, ``\\r`` starts the v2
signature, anything else is rejected at once. Prefixes are checked against the
bytes available, so a wrong signature, version, command or family byte fails
before the header is complete.

Size limits (nothing is ever allocated from an announced length):

* v1: if no LF is found in the first :data:`V1_MAX_LENGTH` (107) bytes, the line
  is invalid (§2.1). Only that window is ever scanned or copied.
* v2: the length field is a uint16, so a header is at most 16 + 65535 bytes.
  ``parse`` waits until that many bytes are present and then slices exactly
  that much; it never pre-allocates a buffer for an announced length.

Strictness, following §2.1/§2.2: a bare CR or LF does not end a v1 line; IPv4
octets and ports must not carry leading zeros; an IPv6 scope (``%eth0``) is not
an address; a v2 family or transport nibble outside the spec is rejected; a v2
length shorter than the family's address block is rejected; TLVs must tile the
remainder exactly. For ``LOCAL`` (v2) and ``UNSPEC``/``UNKNOWN`` the addresses
(and, for v2, TLVs) are ignored as the spec asks, and ``src``/``dst`` are
``None``: the caller uses the real socket endpoints. AF_UNIX blocks (v2 families
0x31/0x32) are accepted and length-checked, but their paths are not decoded
(``src``/``dst`` are ``None``). The CRC32C TLV (type 0x03) is passed through in
``tlvs`` without verification.

This module must not import asyncio, socket or time (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from medlb.errors import ProxyProtocolError

__all__ = [
    "V1_MAX_LENGTH",
    "V2_HEADER_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "ProxyHeader",
    "encode",
    "encode_v1",
    "encode_v2",
    "encode_v2_local",
    "parse",
]

Address = tuple[str, int]
Command = Literal["PROXY", "LOCAL"]

V1_MAX_LENGTH: Final = 107
"""Longest v1 line including CRLF ("PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\\r\\n", §2.1)."""

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH: Final = 16
V2_MAX_LENGTH: Final = V2_HEADER_LENGTH + 0xFFFF
"""The v2 length field is a uint16: no header can be longer than this."""

_V1_PREFIX: Final = b"PROXY "
# What may follow "PROXY ": the protocol token and the byte after it.
_V1_TOKENS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN\r", b"UNKNOWN ")
# Bytes allowed after "PROXY TCPx " in a line still waiting for its CRLF.
_V1_TCP_CHARS: Final = b"0123456789abcdefABCDEF.: \r"

_V2_VER_PROXY: Final = 0x21
_V2_VER_LOCAL: Final = 0x20
_V2_FAM_UNSPEC: Final = 0x00
_V2_FAM_TCP4: Final = 0x11
_V2_FAM_TCP6: Final = 0x21

# fam byte -> (name, address block length, packed address size or 0 if not decoded)
_V2_FAMILIES: Final[dict[int, tuple[str, int, int]]] = {
    0x11: ("TCP4", 12, 4),
    0x12: ("UDP4", 12, 4),
    0x21: ("TCP6", 36, 16),
    0x22: ("UDP6", 36, 16),
    0x31: ("UNIX_STREAM", 216, 0),
    0x32: ("UNIX_DGRAM", 216, 0),
}

_V2_FIXED: Final = struct.Struct("!12sBBH")
_PORTS: Final = struct.Struct("!HH")
_TLV_HEAD: Final = struct.Struct("!BH")


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One decoded PROXY protocol header.

    ``family`` is ``"TCP4"``, ``"TCP6"`` or ``"UNKNOWN"`` for v1; for v2 it is
    one of ``"TCP4"``, ``"UDP4"``, ``"TCP6"``, ``"UDP6"``, ``"UNIX_STREAM"``,
    ``"UNIX_DGRAM"`` or ``"UNSPEC"`` (always ``"UNSPEC"`` for ``LOCAL``).
    ``src``/``dst`` are ``(host, port)`` with the host in canonical text form,
    or ``None`` when the header carries no usable address. ``length`` is the
    number of bytes the header occupies at the start of the parsed buffer.
    """

    version: Literal[1, 2]
    command: Command
    family: str
    src: Address | None
    dst: Address | None
    tlvs: tuple[tuple[int, bytes], ...]
    length: int


# --------------------------------------------------------------------------- encoding


def _ip(addr: Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host, port = addr
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        ip = ipaddress.IPv6Address(ip.packed)  # a scope is local to this host; it is not on the wire
    return ip


def encode_v1(src: Address, dst: Address) -> bytes:
    """Build a v1 text line; ``UNKNOWN`` if source and destination families differ."""
    s, d = _ip(src), _ip(dst)
    if s.version != d.version:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(src: Address, dst: Address, tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """Build a v2 PROXY header (TCP4/TCP6, or UNSPEC for mixed families) with optional TLVs."""
    s, d = _ip(src), _ip(dst)
    if s.version != d.version:
        fam, body = _V2_FAM_UNSPEC, b""
    else:
        fam = _V2_FAM_TCP4 if s.version == 4 else _V2_FAM_TCP6
        body = s.packed + d.packed + _PORTS.pack(src[1], dst[1])
    parts = [body]
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type out of range: {kind}")
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV value too long: {len(value)} bytes")
        parts.append(_TLV_HEAD.pack(kind, len(value)))
        parts.append(bytes(value))
    payload = b"".join(parts)
    if len(payload) > 0xFFFF:
        raise ValueError(f"v2 header too long: {len(payload)} bytes after the fixed part")
    return _V2_FIXED.pack(V2_SIGNATURE, _V2_VER_PROXY, fam, len(payload)) + payload


def encode_v2_local() -> bytes:
    """Build the 16-byte v2 LOCAL header (the proxy's own connection, e.g. a health check)."""
    return _V2_FIXED.pack(V2_SIGNATURE, _V2_VER_LOCAL, _V2_FAM_UNSPEC, 0)


def encode(version: str, src: Address, dst: Address) -> bytes:
    """Build a header for ``version`` ``"v1"`` or ``"v2"`` (the config's spelling)."""
    if version == "v1":
        return encode_v1(src, dst)
    if version == "v2":
        return encode_v2(src, dst)
    raise ValueError(f"unknown PROXY protocol version: {version!r}")


# --------------------------------------------------------------------------- parsing


def parse(buf: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """Decode the header at the start of ``buf``.

    Returns ``None`` if more bytes are needed, a :class:`ProxyHeader` once the
    header is complete (``length`` bytes of ``buf`` belong to it), or raises
    :class:`ProxyProtocolError` as soon as ``buf`` cannot start a valid header.
    """
    # The view is released on the way out, even when raising, and no slice of it outlives
    # the call (bounded copies are taken instead): a caller may then resize its bytearray
    # without a BufferError, also from inside an ``except ProxyProtocolError`` block.
    with memoryview(buf) as mv:
        if not mv:
            return None
        first = mv[0]
        if first == 0x0D:
            return _parse_v2(mv)
        if first == 0x50:  # "P"
            return _parse_v1(mv)
        raise ProxyProtocolError(f"not a PROXY protocol header (first byte 0x{first:02x})")


def _parse_v1(mv: memoryview) -> ProxyHeader | None:
    # Only the first V1_MAX_LENGTH bytes can hold the line: never copy or scan more.
    window = bytes(mv[:V1_MAX_LENGTH])
    n = len(window)
    if window[: len(_V1_PREFIX)] != _V1_PREFIX[:n]:
        raise ProxyProtocolError("bad v1 signature (expected 'PROXY ')")
    token = window[len(_V1_PREFIX) : len(_V1_PREFIX) + 8]
    if not any(t.startswith(token) or token.startswith(t) for t in _V1_TOKENS):
        raise ProxyProtocolError(f"bad v1 protocol {token!r} (expected TCP4, TCP6 or UNKNOWN)")

    lf = window.find(b"\n")
    if lf < 0:
        if n >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 line has no CRLF in its first {V1_MAX_LENGTH} bytes")
        # Fail early on a TCPx line carrying bytes no address or port can contain.
        if token[:3] == b"TCP" and window[11:].translate(None, _V1_TCP_CHARS):
            raise ProxyProtocolError("v1 line contains a byte not allowed in an address or port")
        return None
    if window[lf - 1] != 0x0D:
        raise ProxyProtocolError("v1 line ends with a bare LF (CRLF required)")
    line = window[: lf - 1]
    length = lf + 1

    if line.startswith(b"PROXY UNKNOWN"):
        rest = line[len(b"PROXY UNKNOWN") :]
        if rest and rest[:1] != b" ":
            raise ProxyProtocolError(f"bad v1 protocol {line[6:]!r}")
        # §2.1: for UNKNOWN the receiver must ignore anything before the CRLF.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), length)

    fields = line.split(b" ")
    if len(fields) != 6:
        raise ProxyProtocolError(f"v1 line needs 6 space-separated fields, got {len(fields)}")
    _, proto, src_host, dst_host, src_port, dst_port = fields
    family = proto.decode("ascii", "replace")
    if family not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"bad v1 protocol {proto!r}")
    version = 4 if family == "TCP4" else 6
    src = (_v1_host(src_host, version), _v1_port(src_port))
    dst = (_v1_host(dst_host, version), _v1_port(dst_port))
    return ProxyHeader(1, "PROXY", family, src, dst, (), length)


def _v1_host(raw: bytes, version: int) -> str:
    try:
        text = raw.decode("ascii")
        if "%" in text:
            raise ValueError("scoped address")
        # ipaddress rejects IPv4 octets with leading zeros (§2.1: "heading zeroes are not permitted").
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
        )
    except ValueError:
        raise ProxyProtocolError(f"bad v1 IPv{version} address {raw!r}") from None
    return str(ip)


def _v1_port(raw: bytes) -> int:
    # bytes.isdigit() is ASCII-only, unlike str.isdigit(); the length check bounds int().
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[0] == 0x30):
        raise ProxyProtocolError(f"bad v1 port {raw!r}")
    port = int(raw)
    if port > 0xFFFF:
        raise ProxyProtocolError(f"v1 port out of range: {port}")
    return port


def _parse_v2(mv: memoryview) -> ProxyHeader | None:
    n = len(mv)
    sig_len = len(V2_SIGNATURE)
    if bytes(mv[:sig_len]) != V2_SIGNATURE[: min(n, sig_len)]:
        raise ProxyProtocolError("bad v2 signature")
    if n > sig_len:
        ver_cmd = mv[sig_len]
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError(f"bad v2 version {ver_cmd >> 4}")
        if ver_cmd & 0x0F > 1:
            raise ProxyProtocolError(f"bad v2 command {ver_cmd & 0x0F}")
    if n > sig_len + 1:
        fam = mv[sig_len + 1]
        if fam >> 4 > 3:
            raise ProxyProtocolError(f"bad v2 address family {fam >> 4}")
        if fam & 0x0F > 2:
            raise ProxyProtocolError(f"bad v2 transport protocol {fam & 0x0F}")
    if n < V2_HEADER_LENGTH:
        return None

    _, ver_cmd, fam, body_len = _V2_FIXED.unpack(bytes(mv[:V2_HEADER_LENGTH]))
    length = V2_HEADER_LENGTH + body_len  # at most V2_MAX_LENGTH: body_len is a uint16
    if n < length:
        return None

    if ver_cmd == _V2_VER_LOCAL:
        # §2.2: LOCAL -- use the real endpoints, discard the block including the family.
        return ProxyHeader(2, "LOCAL", "UNSPEC", None, None, (), length)

    known = _V2_FAMILIES.get(fam)
    if known is None:
        # UNSPEC, or a valid nibble pair the spec does not list: fall back to UNSPEC and
        # ignore the address information (§2.2, "falls back to the UNSPEC mode").
        return ProxyHeader(2, "PROXY", "UNSPEC", None, None, (), length)
    family, addr_len, ip_size = known
    if body_len < addr_len:
        raise ProxyProtocolError(f"v2 length {body_len} too short for {family} (needs {addr_len})")

    body = bytes(mv[V2_HEADER_LENGTH:length])  # at most 65535 bytes, and all of them are present
    src: Address | None = None
    dst: Address | None = None
    if ip_size:
        ip_type = ipaddress.IPv4Address if ip_size == 4 else ipaddress.IPv6Address
        src_port, dst_port = _PORTS.unpack(body[2 * ip_size : 2 * ip_size + 4])
        src = (str(ip_type(body[:ip_size])), src_port)
        dst = (str(ip_type(body[ip_size : 2 * ip_size])), dst_port)
    return ProxyHeader(2, "PROXY", family, src, dst, _parse_tlvs(body[addr_len:]), length)


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < _TLV_HEAD.size:
            raise ProxyProtocolError(f"v2 TLV header truncated at offset {pos}")
        kind, size = _TLV_HEAD.unpack_from(data, pos)
        pos += _TLV_HEAD.size
        if end - pos < size:
            raise ProxyProtocolError(f"v2 TLV 0x{kind:02x} announces {size} bytes, {end - pos} left")
        tlvs.append((kind, data[pos : pos + size]))
        pos += size
    return tuple(tlvs)
