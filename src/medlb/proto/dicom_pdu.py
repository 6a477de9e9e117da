"""Encode and decode DICOM Upper Layer PDUs (PS3.8), sans-IO, plus the raw-bytes helpers a proxy needs.

Spec: DICOM PS3.8 §9.3 (PDU structure and encoding), Annex D (user information sub-items, with the
SCP/SCU role selection, extended negotiation and user identity sub-items defined in PS3.7 Annex D.3.3),
§9.3.4 (A-ASSOCIATE-RJ values) and §9.3.8 (A-ABORT values). All integers are big-endian.

Theory of operation
-------------------
Every PDU is a 6-byte header -- ``type (1) | reserved (1) | length (4)`` -- and ``length`` body bytes.
Three tools work on that, from cheapest to richest:

* :class:`PduScanner` walks PDU boundaries in a byte stream without keeping any body byte. After the
  association is established medlb relays at TCP speed and only needs to know where PDUs start (to
  count P-DATA bytes, and to inject an A-ABORT only between two PDUs on a graceful stop).
* :class:`PduReader` frames a stream into :class:`RawPdu` values (type + body bytes). The layer uses
  it during association negotiation and release, and forwards ``RawPdu.encode()`` untouched when it
  changes nothing.
* :func:`decode_pdu` / :meth:`RawPdu.decode` turn a PDU into a frozen dataclass; every dataclass has
  ``encode()``.

Both stream tools check a header before they accept a single body byte (the same rule as h2's
``FrameBuffer``): the type must be 0x01-0x07, the length at most the configured bound, 4 for the
fixed-size PDUs (RJ, RELEASE-RQ/RP, ABORT), at least 68 for A-ASSOCIATE-RQ/AC (the fixed fields) and
at least 6 for P-DATA-TF (one PDV item). Nothing is ever allocated from an announced length: a body is
accumulated as it arrives (a ``bytearray`` grown by appends, amortised linear, never re-sliced), or
sliced in one piece from the fed chunk when the whole body is already there.

Decoding is strict about structure and lenient about values, as PS3.8 §9.3.1 asks of a receiver:

* structure: item lengths must tile their parent exactly; mandatory items must be present (one
  application context 0x10, one or more presentation contexts, one user information item 0x50 holding
  a maximum length 0x51 and an implementation class UID 0x52); presentation context IDs must be odd and
  unique; PDV items need a length of at least 2 and an odd context ID. Any violation raises
  :class:`~medlb.errors.DicomProtocolError` (never ``IndexError``, ``struct.error`` or a Unicode error),
  carrying the A-ABORT reason PS3.8 names for it.
* values: reserved fields are not tested (§9.3.1); unknown items and user information sub-items are
  kept as :class:`UnknownItem` in their position and re-encoded unchanged (PS3.8 Annex D: "ignored",
  not rejected); text fields are decoded as Latin-1 so that any byte survives a round trip; result,
  reason, role and identity-type values are kept as numbers, whatever they are.

Round trip: ``decode_pdu(x).encode() == x`` for every PDU that follows the sending rules of PS3.8
(reserved fields zero). Re-encoding writes reserved fields as zero (§9.3.1 "shall be sent with a
value 00H"), except the three fixed fields at PDU offsets 10-73 of an A-ASSOCIATE-RQ/AC, which are
kept byte for byte: in the AC they are the echo of the RQ (Table 9-17). UIDs are stored as sent,
including a trailing NUL some old stacks append (PS3.8 Annex F says not to), so compare with
``uid.rstrip("\\x00")`` when matching.

Presentation context items are the one place unknown sub-items are rejected rather than kept: their
content is fully specified (one 0x30 abstract syntax, one or more 0x40 transfer syntaxes; zero or one
0x40 in the AC), and a proxy cannot forward an offer it cannot read.

This module must not import asyncio, socket or time (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import ClassVar, Final, TypeAlias, TypeVar

from medlb import __version__
from medlb.errors import DicomProtocolError

__all__ = [
    "APPLICATION_CONTEXT_NAME",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "MEDLB_IMPLEMENTATION_CLASS_UID",
    "MEDLB_IMPLEMENTATION_VERSION_NAME",
    "PDU_HEADER_LENGTH",
    "VERIFICATION_SOP_CLASS",
    "Abort",
    "AbortReason",
    "AbortSource",
    "AcseRejectReason",
    "ApplicationContext",
    "AssociateAC",
    "AssociateItem",
    "AssociateRJ",
    "AssociateRQ",
    "AsyncOpsWindow",
    "ContextResult",
    "ImplementationClassUID",
    "ImplementationVersionName",
    "MaximumLength",
    "PDataTF",
    "Pdu",
    "PduHeader",
    "PduReader",
    "PduScanner",
    "PduType",
    "Pdv",
    "PresentationContextAC",
    "PresentationContextRQ",
    "PresentationRejectReason",
    "RawPdu",
    "RejectResult",
    "RejectSource",
    "ReleaseRP",
    "ReleaseRQ",
    "RoleSelection",
    "SopClassCommonExtendedNegotiation",
    "SopClassExtendedNegotiation",
    "SubItem",
    "UnknownItem",
    "UserIdentityAC",
    "UserIdentityRQ",
    "UserInformation",
    "UserRejectReason",
    "abort",
    "associate_rj",
    "associate_rq",
    "check_header",
    "decode_body",
    "decode_pdu",
    "error_reply",
    "read_ae_titles",
    "replace_ae_titles",
    "restore_ae_titles",
    "validate_ae_title",
    "with_async_ops_window",
]

# --------------------------------------------------------------------------- constants

PDU_HEADER_LENGTH: Final = 6
APPLICATION_CONTEXT_NAME: Final = "1.2.840.10008.3.1.1.1"
"""The DICOM application context name (PS3.7 Annex A.2.1), the only one in use."""
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"

MEDLB_IMPLEMENTATION_CLASS_UID: Final = "2.25.85764297149486668789304283335888058153"
"""medlb's Implementation Class UID: a UUID-derived UID (PS3.5 §B.2), so no organisation root is needed."""
MEDLB_IMPLEMENTATION_VERSION_NAME: Final = f"MEDLB_{__version__}"[:16]


class PduType(IntEnum):
    """PDU types (PS3.8 §9.3.1 Table 9-1)."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result (PS3.8 Table 9-21)."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ source (PS3.8 Table 9-21)."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class UserRejectReason(IntEnum):
    """A-ASSOCIATE-RJ reasons for source 1, the UL service-user."""

    NO_REASON = 1
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7


class AcseRejectReason(IntEnum):
    """A-ASSOCIATE-RJ reasons for source 2, the service provider's ACSE function."""

    NO_REASON = 1
    PROTOCOL_VERSION_NOT_SUPPORTED = 2


class PresentationRejectReason(IntEnum):
    """A-ASSOCIATE-RJ reasons for source 3, the service provider's presentation function."""

    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


_REJECT_REASONS: Final[dict[int, frozenset[int]]] = {
    RejectSource.SERVICE_USER: frozenset(UserRejectReason),
    RejectSource.SERVICE_PROVIDER_ACSE: frozenset(AcseRejectReason),
    RejectSource.SERVICE_PROVIDER_PRESENTATION: frozenset(PresentationRejectReason),
}


class AbortSource(IntEnum):
    """A-ABORT source (PS3.8 Table 9-26); 1 is reserved."""

    SERVICE_USER = 0
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """A-ABORT reason/diagnostic, significant only when the source is the service provider."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class ContextResult(IntEnum):
    """Presentation context result/reason in an A-ASSOCIATE-AC (PS3.8 Table 9-18)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


_HEADER: Final = struct.Struct(">BBL")
_ITEM_HEADER: Final = struct.Struct(">BBH")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">L")
_FIXED_LENGTH_TYPES: Final = frozenset({0x03, 0x05, 0x06, 0x07})
_ASSOCIATE_FIXED: Final = 68  # protocol version, reserved, two AE titles, 32 reserved bytes
_AE_FIELDS: Final = slice(4, 68)  # body offsets of the called/calling AE and reserved fields (PDU 10-73)
_ZERO32: Final = bytes(32)

_INVALID: Final = AbortReason.INVALID_PDU_PARAMETER_VALUE
_UNEXPECTED_PARAM: Final = AbortReason.UNEXPECTED_PDU_PARAMETER
_UNRECOGNIZED_PARAM: Final = AbortReason.UNRECOGNIZED_PDU_PARAMETER


def _error(message: str, reason: int = _INVALID) -> DicomProtocolError:
    return DicomProtocolError(message, abort_source=AbortSource.SERVICE_PROVIDER, abort_reason=reason)


def _text(raw: bytes | memoryview) -> str:
    # Latin-1 maps every byte to one code point: decoding never fails and re-encoding is exact.
    return bytes(raw).decode("latin-1")


def _item(item_type: int, payload: bytes, first: int = 0) -> bytes:
    if len(payload) > 0xFFFF:
        raise ValueError(f"item 0x{item_type:02x} too long: {len(payload)} bytes (max 65535)")
    return _ITEM_HEADER.pack(item_type, first, len(payload)) + payload


def _items(data: memoryview, where: str) -> Iterator[tuple[int, int, memoryview]]:
    """Yield ``(type, byte 1, payload)`` of the items that must tile ``data`` exactly."""
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < _ITEM_HEADER.size:
            raise _error(f"{where}: truncated item header at offset {pos} ({end - pos} bytes left)")
        item_type, first, length = _ITEM_HEADER.unpack_from(data, pos)
        pos += _ITEM_HEADER.size
        if length > end - pos:
            raise _error(f"{where}: item 0x{item_type:02x} announces {length} bytes, {end - pos} left")
        yield item_type, first, data[pos : pos + length]
        pos += length


def _u16_field(data: memoryview, pos: int, where: str) -> tuple[memoryview, int]:
    """Read a ``uint16 length | value`` field at ``pos``; return the value and the next offset."""
    if len(data) - pos < 2:
        raise _error(f"{where}: truncated length field")
    (length,) = _U16.unpack_from(data, pos)
    pos += 2
    if length > len(data) - pos:
        raise _error(f"{where}: field announces {length} bytes, {len(data) - pos} left")
    return data[pos : pos + length], pos + length


def _lv(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"field too long: {len(value)} bytes (max 65535)")
    return _U16.pack(len(value)) + value


def _latin1(value: str) -> bytes:
    return value.encode("latin-1")


# --------------------------------------------------------------------------- items


@dataclass(frozen=True, slots=True)
class UnknownItem:
    """An item or user information sub-item of a type this codec does not know, kept as received.

    ``reserved`` is byte 1 of its header: its meaning is unknown, so it is kept too.
    """

    item_type: int
    data: bytes
    reserved: int = 0

    def encode(self) -> bytes:
        return _item(self.item_type, self.data, self.reserved)


@dataclass(frozen=True, slots=True)
class ApplicationContext:
    """Item 0x10: the application context name (always ``1.2.840.10008.3.1.1.1`` in practice)."""

    item_type: ClassVar[int] = 0x10
    name: str

    def encode(self) -> bytes:
        return _item(0x10, _latin1(self.name))


@dataclass(frozen=True, slots=True)
class PresentationContextRQ:
    """Item 0x20: one proposed presentation context (sub-items 0x30 and 0x40)."""

    item_type: ClassVar[int] = 0x20
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]

    def encode(self) -> bytes:
        body = bytes((self.context_id, 0, 0, 0)) + _item(0x30, _latin1(self.abstract_syntax))
        body += b"".join(_item(0x40, _latin1(ts)) for ts in self.transfer_syntaxes)
        return _item(0x20, body)


@dataclass(frozen=True, slots=True)
class PresentationContextAC:
    """Item 0x21: the answer to one proposed context.

    ``transfer_syntax`` is ``None`` when the acceptor sent no 0x40 sub-item (allowed when rejected:
    "not significant" per Table 9-18), ``""`` when it sent an empty one.
    """

    item_type: ClassVar[int] = 0x21
    context_id: int
    result: int
    transfer_syntax: str | None

    @property
    def accepted(self) -> bool:
        return self.result == ContextResult.ACCEPTANCE

    def encode(self) -> bytes:
        body = bytes((self.context_id, 0, self.result, 0))
        if self.transfer_syntax is not None:
            body += _item(0x40, _latin1(self.transfer_syntax))
        return _item(0x21, body)


@dataclass(frozen=True, slots=True)
class MaximumLength:
    """Sub-item 0x51: the largest P-DATA-TF PDU length the sender accepts; 0 means no limit."""

    item_type: ClassVar[int] = 0x51
    value: int

    def encode(self) -> bytes:
        return _item(0x51, _U32.pack(self.value))


@dataclass(frozen=True, slots=True)
class ImplementationClassUID:
    """Sub-item 0x52."""

    item_type: ClassVar[int] = 0x52
    uid: str

    def encode(self) -> bytes:
        return _item(0x52, _latin1(self.uid))


@dataclass(frozen=True, slots=True)
class AsyncOpsWindow:
    """Sub-item 0x53; absent means 1/1, i.e. synchronous (PS3.7 D.3.3.3). 0 means unlimited."""

    item_type: ClassVar[int] = 0x53
    max_invoked: int
    max_performed: int

    def encode(self) -> bytes:
        return _item(0x53, struct.pack(">HH", self.max_invoked, self.max_performed))


@dataclass(frozen=True, slots=True)
class RoleSelection:
    """Sub-item 0x54: SCU/SCP role proposal or answer for one SOP class (PS3.7 D.3.3.4)."""

    item_type: ClassVar[int] = 0x54
    sop_class_uid: str
    scu_role: int
    scp_role: int

    def encode(self) -> bytes:
        return _item(0x54, _lv(_latin1(self.sop_class_uid)) + bytes((self.scu_role, self.scp_role)))


@dataclass(frozen=True, slots=True)
class ImplementationVersionName:
    """Sub-item 0x55 (1-16 characters by PS3.7 D.3.3.2.3; the length is not enforced on receipt)."""

    item_type: ClassVar[int] = 0x55
    name: str

    def encode(self) -> bytes:
        return _item(0x55, _latin1(self.name))


@dataclass(frozen=True, slots=True)
class SopClassExtendedNegotiation:
    """Sub-item 0x56: service-class-specific application information for one SOP class."""

    item_type: ClassVar[int] = 0x56
    sop_class_uid: str
    info: bytes

    def encode(self) -> bytes:
        return _item(0x56, _lv(_latin1(self.sop_class_uid)) + self.info)


@dataclass(frozen=True, slots=True)
class SopClassCommonExtendedNegotiation:
    """Sub-item 0x57 (RQ only); byte 1 of its header is a sub-item version, not reserved."""

    item_type: ClassVar[int] = 0x57
    sop_class_uid: str
    service_class_uid: str
    related_general_sop_classes: tuple[str, ...] = ()
    version: int = 0

    def encode(self) -> bytes:
        related = b"".join(_lv(_latin1(uid)) for uid in self.related_general_sop_classes)
        body = _lv(_latin1(self.sop_class_uid)) + _lv(_latin1(self.service_class_uid)) + _lv(related)
        return _item(0x57, body, self.version)


@dataclass(frozen=True, slots=True)
class UserIdentityRQ:
    """Sub-item 0x58: credentials (type 1 username, 2 +passcode, 3 Kerberos, 4 SAML, 5 JWT).

    Kept as bytes: Kerberos tickets and SAML assertions are not text, and a proxy forwards them.
    """

    item_type: ClassVar[int] = 0x58
    identity_type: int
    positive_response_requested: int
    primary: bytes
    secondary: bytes = b""

    def encode(self) -> bytes:
        head = bytes((self.identity_type, self.positive_response_requested))
        return _item(0x58, head + _lv(self.primary) + _lv(self.secondary))


@dataclass(frozen=True, slots=True)
class UserIdentityAC:
    """Sub-item 0x59: the server response to a user identity that asked for one."""

    item_type: ClassVar[int] = 0x59
    server_response: bytes

    def encode(self) -> bytes:
        return _item(0x59, _lv(self.server_response))


SubItem: TypeAlias = (
    MaximumLength
    | ImplementationClassUID
    | AsyncOpsWindow
    | RoleSelection
    | ImplementationVersionName
    | SopClassExtendedNegotiation
    | SopClassCommonExtendedNegotiation
    | UserIdentityRQ
    | UserIdentityAC
    | UnknownItem
)

_S = TypeVar("_S", bound=SubItem)


@dataclass(frozen=True, slots=True)
class UserInformation:
    """Item 0x50: the user information sub-items, in the order received."""

    item_type: ClassVar[int] = 0x50
    sub_items: tuple[SubItem, ...]

    def _first(self, kind: type[_S]) -> _S | None:
        for sub in self.sub_items:
            if isinstance(sub, kind):
                return sub
        return None

    @property
    def max_length(self) -> int | None:
        item = self._first(MaximumLength)
        return None if item is None else item.value

    @property
    def implementation_class_uid(self) -> str | None:
        item = self._first(ImplementationClassUID)
        return None if item is None else item.uid

    @property
    def implementation_version_name(self) -> str | None:
        item = self._first(ImplementationVersionName)
        return None if item is None else item.name

    @property
    def async_ops_window(self) -> AsyncOpsWindow | None:
        return self._first(AsyncOpsWindow)

    @property
    def role_selections(self) -> tuple[RoleSelection, ...]:
        return tuple(s for s in self.sub_items if isinstance(s, RoleSelection))

    @property
    def extended_negotiations(self) -> tuple[SopClassExtendedNegotiation, ...]:
        return tuple(s for s in self.sub_items if isinstance(s, SopClassExtendedNegotiation))

    @property
    def common_extended_negotiations(self) -> tuple[SopClassCommonExtendedNegotiation, ...]:
        return tuple(s for s in self.sub_items if isinstance(s, SopClassCommonExtendedNegotiation))

    @property
    def user_identity(self) -> UserIdentityRQ | None:
        return self._first(UserIdentityRQ)

    @property
    def user_identity_response(self) -> UserIdentityAC | None:
        return self._first(UserIdentityAC)

    def encode(self) -> bytes:
        return _item(0x50, b"".join(sub.encode() for sub in self.sub_items))


AssociateItem: TypeAlias = (
    ApplicationContext | PresentationContextRQ | PresentationContextAC | UserInformation | UnknownItem
)


# --------------------------------------------------------------------------- PDUs


@dataclass(frozen=True, slots=True)
class _Associate:
    """Shared fields of A-ASSOCIATE-RQ and -AC (PS3.8 Tables 9-11 and 9-17).

    ``called_ae_title`` and ``calling_ae_title`` are the raw 16-byte fields and ``reserved`` the
    32 bytes after them: kept verbatim, since the AC must echo what the RQ carried. ``items`` are
    the variable items in the order received.
    """

    called_ae_title: bytes
    calling_ae_title: bytes
    items: tuple[AssociateItem, ...]
    protocol_version: int = 1
    reserved: bytes = _ZERO32

    def __post_init__(self) -> None:
        if len(self.called_ae_title) != 16 or len(self.calling_ae_title) != 16 or len(self.reserved) != 32:
            raise ValueError("AE title fields must be 16 bytes and the reserved field 32 bytes")

    @property
    def called_ae(self) -> str:
        """The Called AE title without its non-significant spaces."""
        return _text(self.called_ae_title).strip(" ")

    @property
    def calling_ae(self) -> str:
        """The Calling AE title without its non-significant spaces."""
        return _text(self.calling_ae_title).strip(" ")

    @property
    def application_context(self) -> str:
        for item in self.items:
            if isinstance(item, ApplicationContext):
                return item.name
        raise ValueError("no application context item")  # decode guarantees one

    @property
    def user_information(self) -> UserInformation:
        for item in self.items:
            if isinstance(item, UserInformation):
                return item
        raise ValueError("no user information item")  # decode guarantees one

    @property
    def max_length(self) -> int:
        """Maximum Length Received (0x51): the largest P-DATA-TF the sender accepts; 0 = unlimited."""
        value = self.user_information.max_length
        return 0 if value is None else value

    def encode_body(self) -> bytes:
        fixed = struct.pack(">HH", self.protocol_version, 0)
        fixed += self.called_ae_title + self.calling_ae_title + self.reserved
        return fixed + b"".join(item.encode() for item in self.items)

    def encode(self) -> bytes:
        body = self.encode_body()
        return _HEADER.pack(self.pdu_type, 0, len(body)) + body

    pdu_type: ClassVar[int] = 0


@dataclass(frozen=True, slots=True)
class AssociateRQ(_Associate):
    """A-ASSOCIATE-RQ (0x01)."""

    pdu_type: ClassVar[int] = PduType.ASSOCIATE_RQ

    @property
    def presentation_contexts(self) -> tuple[PresentationContextRQ, ...]:
        return tuple(i for i in self.items if isinstance(i, PresentationContextRQ))


@dataclass(frozen=True, slots=True)
class AssociateAC(_Associate):
    """A-ASSOCIATE-AC (0x02); the AE title fields echo the RQ's (Table 9-17)."""

    pdu_type: ClassVar[int] = PduType.ASSOCIATE_AC

    @property
    def presentation_contexts(self) -> tuple[PresentationContextAC, ...]:
        return tuple(i for i in self.items if isinstance(i, PresentationContextAC))


@dataclass(frozen=True, slots=True)
class AssociateRJ:
    """A-ASSOCIATE-RJ (0x03); see :class:`RejectResult`, :class:`RejectSource` and the reason enums."""

    pdu_type: ClassVar[int] = PduType.ASSOCIATE_RJ
    result: int
    source: int
    reason: int

    def encode_body(self) -> bytes:
        return bytes((0, self.result, self.source, self.reason))

    def encode(self) -> bytes:
        return _HEADER.pack(self.pdu_type, 0, 4) + self.encode_body()


@dataclass(frozen=True, slots=True)
class Pdv:
    """One presentation data value item: a command or data set fragment.

    ``control`` is the message control header: bit 0 set = command, bit 1 set = last fragment
    (PS3.8 Annex E.2); bits 2-7 are kept but not interpreted.
    """

    context_id: int
    control: int
    fragment: bytes

    @property
    def is_command(self) -> bool:
        return bool(self.control & 0x01)

    @property
    def is_last(self) -> bool:
        return bool(self.control & 0x02)

    def encode(self) -> bytes:
        return _U32.pack(len(self.fragment) + 2) + bytes((self.context_id, self.control)) + self.fragment


@dataclass(frozen=True, slots=True)
class PDataTF:
    """P-DATA-TF (0x04): one or more PDV items."""

    pdu_type: ClassVar[int] = PduType.P_DATA_TF
    pdvs: tuple[Pdv, ...]

    def encode_body(self) -> bytes:
        return b"".join(pdv.encode() for pdv in self.pdvs)

    def encode(self) -> bytes:
        body = self.encode_body()
        return _HEADER.pack(self.pdu_type, 0, len(body)) + body


@dataclass(frozen=True, slots=True)
class ReleaseRQ:
    """A-RELEASE-RQ (0x05)."""

    pdu_type: ClassVar[int] = PduType.RELEASE_RQ

    def encode_body(self) -> bytes:
        return bytes(4)

    def encode(self) -> bytes:
        return _HEADER.pack(self.pdu_type, 0, 4) + bytes(4)


@dataclass(frozen=True, slots=True)
class ReleaseRP:
    """A-RELEASE-RP (0x06)."""

    pdu_type: ClassVar[int] = PduType.RELEASE_RP

    def encode_body(self) -> bytes:
        return bytes(4)

    def encode(self) -> bytes:
        return _HEADER.pack(self.pdu_type, 0, 4) + bytes(4)


@dataclass(frozen=True, slots=True)
class Abort:
    """A-ABORT (0x07); see :class:`AbortSource` and :class:`AbortReason`."""

    pdu_type: ClassVar[int] = PduType.ABORT
    source: int
    reason: int

    def encode_body(self) -> bytes:
        return bytes((0, 0, self.source, self.reason))

    def encode(self) -> bytes:
        return _HEADER.pack(self.pdu_type, 0, 4) + self.encode_body()


Pdu: TypeAlias = AssociateRQ | AssociateAC | AssociateRJ | PDataTF | ReleaseRQ | ReleaseRP | Abort


# --------------------------------------------------------------------------- decoding


def _uid_item(payload: memoryview, item_type: int, where: str) -> str:
    if not payload:
        raise _error(f"{where}: empty sub-item 0x{item_type:02x}")
    return _text(payload)


def _decode_pc_rq(payload: memoryview) -> PresentationContextRQ:
    if len(payload) < 4:
        raise _error(f"presentation context item too short ({len(payload)} bytes)")
    context_id = payload[0]
    where = f"presentation context {context_id}"
    abstract: str | None = None
    transfer: list[str] = []
    for sub_type, _, sub in _items(payload[4:], where):
        if sub_type == 0x30:
            if abstract is not None:
                raise _error(f"{where}: more than one abstract syntax sub-item", _UNEXPECTED_PARAM)
            abstract = _uid_item(sub, 0x30, where)
        elif sub_type == 0x40:
            transfer.append(_uid_item(sub, 0x40, where))
        else:
            raise _error(f"{where}: unknown sub-item 0x{sub_type:02x}", _UNRECOGNIZED_PARAM)
    if abstract is None:
        raise _error(f"{where}: no abstract syntax sub-item (0x30)")
    if not transfer:
        raise _error(f"{where}: no transfer syntax sub-item (0x40)")
    return PresentationContextRQ(context_id, abstract, tuple(transfer))


def _decode_pc_ac(payload: memoryview) -> PresentationContextAC:
    if len(payload) < 4:
        raise _error(f"presentation context item too short ({len(payload)} bytes)")
    context_id, result = payload[0], payload[2]
    where = f"presentation context {context_id}"
    transfer: str | None = None
    for sub_type, _, sub in _items(payload[4:], where):
        if sub_type != 0x40:
            raise _error(f"{where}: unexpected sub-item 0x{sub_type:02x} in an AC", _UNRECOGNIZED_PARAM)
        if transfer is not None:
            raise _error(f"{where}: more than one transfer syntax in an AC", _UNEXPECTED_PARAM)
        transfer = _text(sub)  # may be empty when rejected: "not significant"
    if result == ContextResult.ACCEPTANCE and not transfer:
        raise _error(f"{where}: accepted without a transfer syntax")
    return PresentationContextAC(context_id, result, transfer)


def _decode_sub_item(sub_type: int, first: int, data: memoryview) -> SubItem:
    where = f"user information sub-item 0x{sub_type:02x}"
    n = len(data)
    if sub_type == 0x51:
        if n != 4:
            raise _error(f"{where}: length {n}, expected 4")
        return MaximumLength(_U32.unpack_from(data)[0])
    if sub_type == 0x52:
        return ImplementationClassUID(_uid_item(data, sub_type, "user information"))
    if sub_type == 0x53:
        if n != 4:
            raise _error(f"{where}: length {n}, expected 4")
        invoked, performed = struct.unpack_from(">HH", data)
        return AsyncOpsWindow(invoked, performed)
    if sub_type == 0x54:
        uid, pos = _u16_field(data, 0, where)
        if n - pos != 2:
            raise _error(f"{where}: {n - pos} bytes after the SOP class UID, expected 2")
        return RoleSelection(_text(uid), data[pos], data[pos + 1])
    if sub_type == 0x55:
        return ImplementationVersionName(_text(data))
    if sub_type == 0x56:
        uid, pos = _u16_field(data, 0, where)
        return SopClassExtendedNegotiation(_text(uid), bytes(data[pos:]))
    if sub_type == 0x57:
        sop, pos = _u16_field(data, 0, where)
        service, pos = _u16_field(data, pos, where)
        related, pos = _u16_field(data, pos, where)
        if pos != n:
            raise _error(f"{where}: {n - pos} bytes after the related SOP class list")
        uids: list[str] = []
        rpos = 0
        while rpos < len(related):
            uid, rpos = _u16_field(related, rpos, where)
            uids.append(_text(uid))
        return SopClassCommonExtendedNegotiation(_text(sop), _text(service), tuple(uids), first)
    if sub_type == 0x58:
        if n < 2:
            raise _error(f"{where}: length {n}, too short")
        primary, pos = _u16_field(data, 2, where)
        secondary, pos = _u16_field(data, pos, where)
        if pos != n:
            raise _error(f"{where}: {n - pos} bytes after the secondary field")
        return UserIdentityRQ(data[0], data[1], bytes(primary), bytes(secondary))
    if sub_type == 0x59:
        response, pos = _u16_field(data, 0, where)
        if pos != n:
            raise _error(f"{where}: {n - pos} bytes after the server response")
        return UserIdentityAC(bytes(response))
    return UnknownItem(sub_type, bytes(data), first)  # PS3.8 Annex D: ignore, do not reject


# Sub-items PS3.7 Annex D allows once, and the PDU each belongs to (None: both).
_SINGLE_SUB_ITEMS: Final[dict[int, int | None]] = {
    0x51: None,
    0x52: None,
    0x53: None,
    0x55: None,
    0x57: PduType.ASSOCIATE_RQ,
    0x58: PduType.ASSOCIATE_RQ,
    0x59: PduType.ASSOCIATE_AC,
}


def _decode_user_information(payload: memoryview, pdu_type: int) -> UserInformation:
    subs: list[SubItem] = []
    seen: set[int] = set()
    for sub_type, first, data in _items(payload, "user information"):
        if sub_type in _SINGLE_SUB_ITEMS:
            owner = _SINGLE_SUB_ITEMS[sub_type]
            if owner is not None and owner != pdu_type:
                raise _error(f"user information sub-item 0x{sub_type:02x} not allowed here", _UNEXPECTED_PARAM)
            if sub_type != 0x57 and sub_type in seen:
                raise _error(f"user information sub-item 0x{sub_type:02x} repeated", _UNEXPECTED_PARAM)
            seen.add(sub_type)
        subs.append(_decode_sub_item(sub_type, first, data))
    if 0x51 not in seen:
        raise _error("user information has no maximum length sub-item (0x51)")
    if 0x52 not in seen:
        raise _error("user information has no implementation class UID sub-item (0x52)")
    return UserInformation(tuple(subs))


def _decode_associate(pdu_type: int, body: memoryview) -> AssociateRQ | AssociateAC:
    name = "A-ASSOCIATE-RQ" if pdu_type == PduType.ASSOCIATE_RQ else "A-ASSOCIATE-AC"
    if len(body) < _ASSOCIATE_FIXED:
        raise _error(f"{name} body is {len(body)} bytes, shorter than its {_ASSOCIATE_FIXED}-byte fixed part")
    (version,) = _U16.unpack_from(body, 0)
    pc_type = 0x20 if pdu_type == PduType.ASSOCIATE_RQ else 0x21
    items: list[AssociateItem] = []
    counts = {0x10: 0, 0x20: 0, 0x21: 0, 0x50: 0}
    context_ids: set[int] = set()
    for item_type, first, payload in _items(body[_ASSOCIATE_FIXED:], name):
        item: AssociateItem
        if item_type == 0x10:
            if not payload:
                raise _error(f"{name}: empty application context name")
            item = ApplicationContext(_text(payload))
        elif item_type == pc_type:
            item = _decode_pc_rq(payload) if pc_type == 0x20 else _decode_pc_ac(payload)
            if item.context_id % 2 == 0:
                raise _error(f"{name}: presentation context ID {item.context_id} is not odd")
            if item.context_id in context_ids:
                raise _error(f"{name}: presentation context ID {item.context_id} repeated")
            context_ids.add(item.context_id)
        elif item_type == 0x50:
            item = _decode_user_information(payload, pdu_type)
        elif item_type in counts:
            raise _error(f"{name}: unexpected item 0x{item_type:02x}", _UNEXPECTED_PARAM)
        else:
            item = UnknownItem(item_type, bytes(payload), first)
        if item_type in counts:
            counts[item_type] += 1
        items.append(item)
    if counts[0x10] != 1:
        raise _error(f"{name}: {counts[0x10]} application context items, expected 1")
    if counts[pc_type] == 0:
        raise _error(f"{name}: no presentation context item (0x{pc_type:02x})")
    if counts[0x50] != 1:
        raise _error(f"{name}: {counts[0x50]} user information items, expected 1")
    fields = (bytes(body[4:20]), bytes(body[20:36]), tuple(items), version, bytes(body[36:68]))
    if pdu_type == PduType.ASSOCIATE_RQ:
        return AssociateRQ(*fields)
    return AssociateAC(*fields)


def _decode_p_data(body: memoryview) -> PDataTF:
    pdvs: list[Pdv] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 4:
            raise _error(f"P-DATA-TF: truncated PDV length at offset {pos}")
        (length,) = _U32.unpack_from(body, pos)
        pos += 4
        if length < 2:
            raise _error(f"P-DATA-TF: PDV item length {length} < 2")
        if length > end - pos:
            raise _error(f"P-DATA-TF: PDV item announces {length} bytes, {end - pos} left")
        context_id = body[pos]
        if context_id % 2 == 0:
            raise _error(f"P-DATA-TF: presentation context ID {context_id} is not odd")
        pdvs.append(Pdv(context_id, body[pos + 1], bytes(body[pos + 2 : pos + length])))
        pos += length
    if not pdvs:
        raise _error("P-DATA-TF without PDV items")
    return PDataTF(tuple(pdvs))


def decode_body(pdu_type: int, body: bytes | bytearray | memoryview) -> Pdu:
    """Decode a PDU body (the bytes after the 6-byte header) of type ``pdu_type``."""
    with memoryview(body) as mv:
        if pdu_type in (PduType.ASSOCIATE_RQ, PduType.ASSOCIATE_AC):
            return _decode_associate(pdu_type, mv)
        if pdu_type == PduType.P_DATA_TF:
            return _decode_p_data(mv)
        if pdu_type not in _FIXED_LENGTH_TYPES:
            raise DicomProtocolError(f"unknown PDU type 0x{pdu_type:02x}", abort_reason=AbortReason.UNRECOGNIZED_PDU)
        if len(mv) != 4:
            raise _error(f"PDU type 0x{pdu_type:02x} has length {len(mv)}, expected 4")
        if pdu_type == PduType.ASSOCIATE_RJ:
            return AssociateRJ(mv[1], mv[2], mv[3])
        if pdu_type == PduType.ABORT:
            return Abort(mv[2], mv[3])
        return ReleaseRQ() if pdu_type == PduType.RELEASE_RQ else ReleaseRP()


def decode_pdu(data: bytes | bytearray | memoryview) -> Pdu:
    """Decode one complete PDU (header included); its length field must match ``len(data)``."""
    with memoryview(data) as mv:
        if len(mv) < PDU_HEADER_LENGTH:
            raise _error(f"PDU of {len(mv)} bytes is shorter than its 6-byte header")
        pdu_type, _, length = _HEADER.unpack_from(mv)
        if length != len(mv) - PDU_HEADER_LENGTH:
            raise _error(f"PDU length field says {length}, {len(mv) - PDU_HEADER_LENGTH} body bytes given")
        return decode_body(pdu_type, mv[PDU_HEADER_LENGTH:])


# --------------------------------------------------------------------------- stream framing


def check_header(pdu_type: int, length: int, max_pdu_length: int) -> None:
    """Raise :class:`DicomProtocolError` if a PDU header cannot start a PDU this side accepts.

    ``max_pdu_length`` bounds the PDU-length field (the body), like Maximum Length Received.
    """
    if not PduType.ASSOCIATE_RQ <= pdu_type <= PduType.ABORT:
        raise DicomProtocolError(f"unknown PDU type 0x{pdu_type:02x}", abort_reason=AbortReason.UNRECOGNIZED_PDU)
    if pdu_type in _FIXED_LENGTH_TYPES:
        if length != 4:
            raise _error(f"PDU type 0x{pdu_type:02x} announces length {length}, must be 4")
        return
    if length > max_pdu_length:
        raise _error(f"PDU type 0x{pdu_type:02x} announces {length} bytes, over the limit of {max_pdu_length}")
    minimum = 6 if pdu_type == PduType.P_DATA_TF else _ASSOCIATE_FIXED
    if length < minimum:
        raise _error(f"PDU type 0x{pdu_type:02x} announces {length} bytes, under its minimum of {minimum}")


def _check_limit(max_pdu_length: int) -> None:
    if max_pdu_length < _ASSOCIATE_FIXED:
        # 0 ("no limit" in the 0x51 sub-item) is refused on purpose: memory needs a bound.
        raise ValueError(f"max_pdu_length must be at least {_ASSOCIATE_FIXED}, got {max_pdu_length}")


@dataclass(frozen=True, slots=True)
class RawPdu:
    """One framed PDU: its type and body, undecoded. ``encode()`` gives back the exact bytes."""

    pdu_type: int
    body: bytes
    reserved: int = 0

    def decode(self) -> Pdu:
        return decode_body(self.pdu_type, self.body)

    def encode(self) -> bytes:
        return _HEADER.pack(self.pdu_type, self.reserved, len(self.body)) + self.body


class PduReader:
    """Frame a byte stream into :class:`RawPdu` values, checking each header before its body.

    ``max_pdu_length`` bounds every PDU body (and so the memory held); it may be changed between
    calls, e.g. to the negotiated Maximum Length once the association is up. With
    ``expect_associate_rq`` the first PDU must be an A-ASSOCIATE-RQ (the acceptor in Sta2).

    At most one partial PDU is held: the header bytes (up to 6) and the body bytes received so far.
    After an error the reader is failed and every later :meth:`feed` raises the same error.
    """

    __slots__ = ("_body", "_error", "_expect_rq", "_head", "_need", "_reserved", "_type", "max_pdu_length")

    def __init__(self, max_pdu_length: int, *, expect_associate_rq: bool) -> None:
        _check_limit(max_pdu_length)
        self.max_pdu_length = max_pdu_length
        self._expect_rq = expect_associate_rq
        self._head = bytearray()
        self._body = bytearray()
        self._need = -1  # body bytes still missing; -1 while reading a header
        self._type = 0
        self._reserved = 0
        self._error: DicomProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for the PDU in progress (header and body)."""
        return len(self._head) + len(self._body)

    @property
    def at_boundary(self) -> bool:
        """True when no partial PDU is held: the stream may end or be cut here."""
        return not self._head and self._need < 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[RawPdu]:
        """Take the next bytes of the stream; return the PDUs they complete, in order."""
        if self._error is not None:
            raise self._error
        try:
            with memoryview(data) as m, m.cast("B") as mv:
                return self._feed(mv)
        except DicomProtocolError as exc:
            self._error = exc
            self._head.clear()
            self._body = bytearray()
            raise

    def _feed(self, mv: memoryview) -> list[RawPdu]:
        out: list[RawPdu] = []
        pos, end = 0, len(mv)
        while pos < end:
            if self._need < 0:
                take = min(PDU_HEADER_LENGTH - len(self._head), end - pos)
                self._head += mv[pos : pos + take]
                pos += take
                if len(self._head) < PDU_HEADER_LENGTH:
                    break
                pdu_type, reserved, length = _HEADER.unpack(self._head)
                self._head.clear()
                check_header(pdu_type, length, self.max_pdu_length)
                if self._expect_rq:
                    if pdu_type != PduType.ASSOCIATE_RQ:
                        raise DicomProtocolError(
                            f"first PDU is type 0x{pdu_type:02x}, expected an A-ASSOCIATE-RQ",
                            abort_reason=AbortReason.UNEXPECTED_PDU,
                        )
                    self._expect_rq = False
                self._type, self._reserved, self._need = pdu_type, reserved, length
                if not self._body and end - pos >= length:
                    # Fast path: the whole body is in this chunk; one copy, no buffering.
                    out.append(RawPdu(pdu_type, bytes(mv[pos : pos + length]), reserved))
                    pos += length
                    self._need = -1
                continue
            take = min(self._need, end - pos)
            self._body += mv[pos : pos + take]
            pos += take
            self._need -= take
            if self._need == 0:
                out.append(RawPdu(self._type, bytes(self._body), self._reserved))
                self._body = bytearray()  # a fresh buffer: the old one may have grown large
                self._need = -1
        return out


@dataclass(frozen=True, slots=True)
class PduHeader:
    """A PDU header seen by :class:`PduScanner`.

    ``offset`` is the index, in the chunk passed to the ``feed`` call that completed the header,
    of the first body byte (it may equal the chunk length: the body starts in the next chunk).
    """

    pdu_type: int
    length: int
    offset: int


class PduScanner:
    """Walk PDU boundaries in a byte stream, checking headers and keeping no body byte.

    For a relay that copies bytes as they come: ``feed`` returns the headers completed by a chunk,
    and the counters tell what went by. Cost is a few operations per PDU, not per byte.
    """

    __slots__ = (
        "_error",
        "_expect_rq",
        "_head",
        "bytes_scanned",
        "current_type",
        "max_pdu_length",
        "p_data_bytes",
        "pdu_count",
        "remaining",
    )

    def __init__(self, max_pdu_length: int, *, expect_associate_rq: bool = False) -> None:
        _check_limit(max_pdu_length)
        self.max_pdu_length = max_pdu_length
        self._expect_rq = expect_associate_rq
        self._head = bytearray()
        self._error: DicomProtocolError | None = None
        self.remaining = 0
        """Body bytes of the current PDU not yet seen."""
        self.current_type: int | None = None
        """Type of the PDU whose body is in flight, or None between PDUs."""
        self.pdu_count = 0
        """Headers seen so far."""
        self.p_data_bytes = 0
        """P-DATA-TF body bytes seen so far (partial bodies count as they pass)."""
        self.bytes_scanned = 0

    @property
    def at_boundary(self) -> bool:
        """True between two PDUs: a PDU of our own (an A-ABORT) may be inserted here."""
        return not self._head and self.remaining == 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[PduHeader]:
        if self._error is not None:
            raise self._error
        try:
            with memoryview(data) as m, m.cast("B") as mv:
                return self._feed(mv)
        except DicomProtocolError as exc:
            self._error = exc
            raise

    def _feed(self, mv: memoryview) -> list[PduHeader]:
        out: list[PduHeader] = []
        pos, end = 0, len(mv)
        self.bytes_scanned += end
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                self.remaining -= take
                if self.current_type == PduType.P_DATA_TF:
                    self.p_data_bytes += take
                pos += take
                if not self.remaining:
                    self.current_type = None
                continue
            if not self._head and end - pos >= PDU_HEADER_LENGTH:
                pdu_type, _, length = _HEADER.unpack_from(mv, pos)  # whole header in this chunk
            else:
                take = min(PDU_HEADER_LENGTH - len(self._head), end - pos)
                self._head += mv[pos : pos + take]
                if len(self._head) < PDU_HEADER_LENGTH:
                    break
                pdu_type, _, length = _HEADER.unpack(self._head)
                self._head.clear()
                pos -= PDU_HEADER_LENGTH - take  # so that the common "pos += header" below is right
            check_header(pdu_type, length, self.max_pdu_length)
            if self._expect_rq:
                if pdu_type != PduType.ASSOCIATE_RQ:
                    raise DicomProtocolError(
                        f"first PDU is type 0x{pdu_type:02x}, expected an A-ASSOCIATE-RQ",
                        abort_reason=AbortReason.UNEXPECTED_PDU,
                    )
                self._expect_rq = False
            pos += PDU_HEADER_LENGTH
            self.pdu_count += 1
            self.remaining = length
            self.current_type = pdu_type if length else None
            out.append(PduHeader(pdu_type, length, pos))
        return out


# --------------------------------------------------------------------------- raw helpers


def validate_ae_title(title: str) -> str:
    """Check an AE title (PS3.5 §6.2, AE) and return it without its non-significant spaces.

    1-16 characters of the default character repertoire (0x20-0x7E), no backslash, not all
    spaces. Raises ``ValueError`` with the reason, so it suits config validation too.
    """
    if len(title) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    for ch in title:
        if not " " <= ch <= "~" or ch == "\\":
            raise ValueError(f"AE title {title!r} contains {ch!r} (control, backslash or non-ASCII)")
    stripped = title.strip(" ")
    if not stripped:
        raise ValueError("AE title is empty or all spaces")
    return stripped


def _associate_body(body: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(body)
    if len(mv) < _ASSOCIATE_FIXED:
        mv.release()
        raise _error(f"A-ASSOCIATE body is {len(body)} bytes, shorter than its {_ASSOCIATE_FIXED}-byte fixed part")
    return mv


def read_ae_titles(body: bytes | bytearray | memoryview) -> tuple[str, str]:
    """Return ``(called, calling)`` from an A-ASSOCIATE-RQ/AC body, without padding spaces.

    Body offsets 4-19 and 20-35 (PDU offsets 10-25 and 26-41). Not validated: pass them to
    :func:`validate_ae_title` to decide an A-ASSOCIATE-RJ.
    """
    with _associate_body(body) as mv:
        return _text(mv[4:20]).strip(" "), _text(mv[20:36]).strip(" ")


def replace_ae_titles(
    body: bytes | bytearray | memoryview, *, called: str | None = None, calling: str | None = None
) -> bytes:
    """Return an A-ASSOCIATE-RQ/AC body with the called and/or calling AE title replaced.

    The fields are fixed-width, so no length changes (PS3.8 Table 9-11): the PDU header can be
    reused as is. Titles are validated and space-padded to 16 bytes.
    """
    with _associate_body(body) as mv:
        out = bytearray(mv)
    if called is not None:
        out[4:20] = validate_ae_title(called).ljust(16).encode("ascii")
    if calling is not None:
        out[20:36] = validate_ae_title(calling).ljust(16).encode("ascii")
    return bytes(out)


def restore_ae_titles(ac_body: bytes | bytearray | memoryview, rq_body: bytes | bytearray | memoryview) -> bytes:
    """Return ``ac_body`` with PDU offsets 10-73 copied from the client's original RQ.

    Table 9-17: the AC's AE title and reserved fields echo the RQ. When the proxy rewrote the
    titles toward the server, the server echoes the rewritten ones; the client must get its own.
    """
    with _associate_body(rq_body) as rq, _associate_body(ac_body) as ac:
        out = bytearray(ac)
        out[_AE_FIELDS] = rq[_AE_FIELDS]
    return bytes(out)


_A = TypeVar("_A", AssociateRQ, AssociateAC)


def with_async_ops_window(pdu: _A, window: AsyncOpsWindow | None) -> _A:
    """Return ``pdu`` with its 0x53 sub-item removed (``window=None``) or set to ``window``.

    The proxy must not offer asynchronous operations upstream unless configured to (and some
    peers drop the connection on any 0x53 item, see dcm4che#1120). A new item goes after the
    sub-items of lower type, keeping the ascending order peers expect. Lengths are recomputed
    by ``encode()``.
    """
    subs: list[SubItem] = [s for s in pdu.user_information.sub_items if not isinstance(s, AsyncOpsWindow)]
    if window is not None:
        at = next((i for i, s in enumerate(subs) if s.item_type > AsyncOpsWindow.item_type), len(subs))
        subs.insert(at, window)
    info = UserInformation(tuple(subs))
    items = tuple(info if isinstance(i, UserInformation) else i for i in pdu.items)
    return replace(pdu, items=items)


def associate_rj(result: int, source: int, reason: int) -> AssociateRJ:
    """Build an A-ASSOCIATE-RJ, checking that ``reason`` belongs to ``source`` (PS3.8 Table 9-21)."""
    if result not in tuple(RejectResult):
        raise ValueError(f"invalid A-ASSOCIATE-RJ result {result}")
    reasons = _REJECT_REASONS.get(source)
    if reasons is None:
        raise ValueError(f"invalid A-ASSOCIATE-RJ source {source}")
    if reason not in reasons:
        raise ValueError(f"invalid A-ASSOCIATE-RJ reason {reason} for source {source}")
    return AssociateRJ(int(result), int(source), int(reason))


def abort(source: int = AbortSource.SERVICE_PROVIDER, reason: int = AbortReason.NOT_SPECIFIED) -> Abort:
    """Build an A-ABORT; a service-user abort carries reason 0 (PS3.8 §9.3.8: "not significant")."""
    if source not in tuple(AbortSource):
        raise ValueError(f"invalid A-ABORT source {source}")
    if reason not in tuple(AbortReason):
        raise ValueError(f"invalid A-ABORT reason {reason}")
    if source == AbortSource.SERVICE_USER and reason != AbortReason.NOT_SPECIFIED:
        raise ValueError("a service-user A-ABORT carries reason 0")
    return Abort(int(source), int(reason))


def error_reply(error: DicomProtocolError, *, can_reject: bool) -> bytes:
    """The PDU to send the peer for ``error``: its A-ASSOCIATE-RJ hint when ``can_reject`` (the
    peer still waits for the answer to its A-ASSOCIATE-RQ), else its A-ABORT."""
    if can_reject and error.reject is not None:
        return AssociateRJ(*error.reject).encode()
    return Abort(error.abort_source, error.abort_reason).encode()


def _uid(value: str, what: str) -> str:
    if not value or len(value) > 64 or not value.isascii():
        raise ValueError(f"invalid {what} UID {value!r}")
    return value


def associate_rq(
    called: str,
    calling: str,
    contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, VERIFICATION_SOP_CLASS, (IMPLICIT_VR_LITTLE_ENDIAN,)),),
    *,
    max_pdu: int = 16384,
    implementation_class_uid: str = MEDLB_IMPLEMENTATION_CLASS_UID,
    implementation_version: str = MEDLB_IMPLEMENTATION_VERSION_NAME,
) -> AssociateRQ:
    """Build an A-ASSOCIATE-RQ; by default the Verification (C-ECHO) request of a health check.

    ``contexts`` are ``(context_id, abstract_syntax, transfer_syntaxes)``. No async ops window
    is offered (the association is synchronous) and no role selection.
    """
    pcs: list[AssociateItem] = []
    seen: set[int] = set()
    for context_id, abstract, transfers in contexts:
        if not 1 <= context_id <= 255 or context_id % 2 == 0 or context_id in seen:
            raise ValueError(f"presentation context ID {context_id} must be odd, 1-255 and unique")
        if not transfers:
            raise ValueError(f"presentation context {context_id} needs a transfer syntax")
        seen.add(context_id)
        syntaxes = tuple(_uid(ts, "transfer syntax") for ts in transfers)
        pcs.append(PresentationContextRQ(context_id, _uid(abstract, "abstract syntax"), syntaxes))
    if not pcs:
        raise ValueError("an A-ASSOCIATE-RQ needs at least one presentation context")
    if not 0 <= max_pdu <= 0xFFFFFFFF:
        raise ValueError(f"max_pdu out of range: {max_pdu}")
    if not 1 <= len(implementation_version) <= 16 or not implementation_version.isascii():
        raise ValueError(f"implementation version name must be 1-16 ASCII characters: {implementation_version!r}")
    info = UserInformation(
        (
            MaximumLength(max_pdu),
            ImplementationClassUID(_uid(implementation_class_uid, "implementation class")),
            ImplementationVersionName(implementation_version),
        )
    )
    return AssociateRQ(
        called_ae_title=validate_ae_title(called).ljust(16).encode("ascii"),
        calling_ae_title=validate_ae_title(calling).ljust(16).encode("ascii"),
        items=(ApplicationContext(APPLICATION_CONTEXT_NAME), *pcs, info),
    )
