"""Read HL7 v2 (ER7) headers, fields and acknowledgements, and build medlb's own ACKs, sans-IO.

Spec: HL7 v2.5.1 Chapter 2 "Control": §2.5.4-2.5.5 (delimiters, declared by MSH-1 and MSH-2), §2.7
(escape sequences), §2.9 (acknowledgment rules, original and enhanced mode), §2.14.9 (MSH fields),
§2.14.8 (MSA), Table 0008 (acknowledgment codes) and Table 0155 (accept/application acknowledgment
conditions). The reference notes are in ``reference/dicom-hl7.md`` §4.2.

Theory of operation
-------------------
medlb balances messages, it does not interpret them: it needs the header (to route, to deduplicate, to
pick the acknowledgment mode, and to match the server's ACK to the message), one configurable field for
the ordering key (PID-3 by default), and the MSA of an ACK. So this module reads exactly those, straight
from the bytes, without building a parse tree; the payload itself is never decoded, rebuilt or
re-encoded, and it is forwarded as received.

* Delimiters come from the message itself: MSH-1 is the byte after ``MSH`` (the field separator, ``|``
  almost always, but any punctuation is legal) and MSH-2 the next 4 or 5 bytes (component, repetition,
  escape, subcomponent and, from v2.7, truncation: ``^~\\&`` or ``^~\\&#``). They must be ASCII
  punctuation, distinct, and not CR/LF; anything else raises :class:`~medlb.errors.Hl7ProtocolError`.
* Field numbering follows the standard: MSH-1 *is* the field separator, so in the MSH segment split on
  that separator MSH-n is at index n-1, while in every other segment SEG-n is at index n.
* Segments end with CR (§2.5.4). LF and CRLF are tolerated as terminators too, because senders built on
  text files emit them (reference §4.1); a field value can never contain CR or LF, so this is safe.
* Field values are returned as raw bytes (:class:`FieldPath`) or as Latin-1 strings
  (:class:`Hl7Header`, :class:`Ack`). Latin-1 maps each byte to the code point of the same value, so
  comparison with ASCII configuration values is direct and ``value.encode("latin-1")`` gives back the
  exact bytes, whatever MSH-18 says; decode with the MSH-18 character set only to *display* a value.
  Escape sequences (``\\F\\``, ``\\S\\``, ...) are left as sent: keys and routes compare raw values.

Acknowledgments (§2.9): *original mode* applies when MSH-15 and MSH-16 are both empty and the answer
carries AA/AE/AR; otherwise *enhanced mode* applies and the immediate answer is a commit ACK, CA/CE/CR.
The answer's MSA-2 must equal the message's MSH-10. :func:`parse_ack` reads any message with an MSA
segment (an original-mode application response need not be of type ACK, e.g. ORL or RSP), and
:func:`make_ack` builds the ACK/NAK medlb sends itself when no server took a message. The module has no
clock and no random source: the caller passes the MSH-7 timestamp and, if it wants a fresh one, the
MSH-10 of the ACK.

Errors: anything unreadable raises :class:`~medlb.errors.Hl7ProtocolError` (never ``IndexError`` or a
Unicode error). Header errors carry ``ack_code=None``: a message without a readable MSH-10 cannot be
answered in a way the sender could match, so the layer closes the connection (see :mod:`.mllp`).

This module must not import asyncio, socket or time (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Final, Literal, TypeAlias

from medlb.errors import Hl7ProtocolError

__all__ = [
    "ACK_CODES",
    "Ack",
    "AckMode",
    "FieldPath",
    "Hl7Header",
    "ack_mode",
    "dedup_key",
    "escape_text",
    "field",
    "format_timestamp",
    "is_retryable",
    "is_success",
    "make_ack",
    "nak_code",
    "nak_for_error",
    "parse_ack",
    "parse_header",
]

AckMode: TypeAlias = Literal["original", "enhanced"]

ACK_CODES: Final = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
"""HL7 Table 0008: A* are original-mode (application) codes, C* enhanced-mode commit codes."""

_SUCCESS: Final = frozenset({"AA", "CA"})
_REJECT: Final = frozenset({"AR", "CR"})
_ERROR: Final = frozenset({"AE", "CE"})
_TO_ENHANCED: Final = {"AA": "CA", "AE": "CE", "AR": "CR"}
_TO_ORIGINAL: Final = {"CA": "AA", "CE": "AE", "CR": "AR"}

# ASCII punctuation: the only bytes accepted as delimiters. Letters and digits would make segment names
# ambiguous, and control bytes (CR, LF, VT, FS, NUL) have framing meanings of their own.
_PUNCT: Final = frozenset(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_CR: Final = 0x0D
_LF: Final = 0x0A
_SEGMENT_END: Final = re.compile(rb"[\r\n]")
_MSH_2_MAX: Final = 5  # component, repetition, escape, subcomponent, truncation (v2.7)
_MSH_2_MIN: Final = 4
_PATH: Final = re.compile(
    r"([A-Z][A-Z0-9]{2})-([1-9][0-9]*)(?:\[([1-9][0-9]*)\])?(?:\.([1-9][0-9]*)(?:\.([1-9][0-9]*))?)?"
)


# --------------------------------------------------------------------------- delimiters and segments


def _delimiters(payload: bytes) -> tuple[int, bytes]:
    """Return the field separator and the MSH-2 encoding characters, validated."""
    if payload[:3] != b"MSH":
        raise Hl7ProtocolError(f"message does not start with MSH: {payload[:8]!r}")
    if len(payload) < 4:
        raise Hl7ProtocolError("MSH segment has no field separator")
    fs = payload[3]
    if fs not in _PUNCT:
        raise Hl7ProtocolError(f"invalid field separator {bytes((fs,))!r} in MSH-1")
    # MSH-2 ends at the next field separator or segment end; read at most one byte past its longest form.
    end, limit = 4, min(len(payload), 4 + _MSH_2_MAX + 1)
    while end < limit and payload[end] not in (fs, _CR, _LF):
        end += 1
    enc = payload[4:end]
    if not _MSH_2_MIN <= len(enc) <= _MSH_2_MAX or not all(c in _PUNCT for c in enc) or len(set(enc)) != len(enc):
        raise Hl7ProtocolError(f"invalid encoding characters {enc!r} in MSH-2")
    return fs, enc


@lru_cache(maxsize=256)
def _segment_pattern(name: bytes) -> re.Pattern[bytes]:
    # A segment starts after CR or LF; the name must not run on into more letters (``PID`` is not
    # ``PIDX``). Delimiters are punctuation, so "not alphanumeric" means "separator or segment end".
    return re.compile(rb"[\r\n]" + re.escape(name) + rb"(?![A-Za-z0-9])")


def _find_segment(payload: bytes, name: bytes) -> tuple[int, int] | None:
    """``(start, end)`` of the first segment called ``name`` (end excludes the terminator), or None."""
    if name == b"MSH":
        start = 0
    else:
        found = _segment_pattern(name).search(payload)
        if found is None:
            return None
        start = found.start() + 1
    term = _SEGMENT_END.search(payload, start)
    return start, len(payload) if term is None else term.start()


def _segment_fields(payload: bytes, name: bytes, fs: int) -> list[bytes] | None:
    """The first ``name`` segment split on the field separator (index n is SEG-n), or None if absent.

    Only for short segments (MSA, ERR): it copies the whole segment.
    """
    span = _find_segment(payload, name)
    if span is None:
        return None
    return payload[span[0] : span[1]].split(bytes((fs,)))


def _field_span(payload: bytes, start: int, end: int, fs: int, skip: int) -> tuple[int, int] | None:
    """Bounds of the field that follows the ``skip``-th separator after the name at ``start``.

    Walks separators with ``bytes.find`` so that reading OBR-4 of an ORU whose OBX-5 holds megabytes of
    base64 never touches (or copies) the OBX bytes.
    """
    sep = bytes((fs,))
    pos = start + 3  # the first separator, right after the 3-byte segment name
    if pos >= end or payload[pos] != fs:
        return None
    for _ in range(skip - 1):
        pos = payload.find(sep, pos + 1, end)
        if pos < 0:
            return None
    nxt = payload.find(sep, pos + 1, end)
    return pos + 1, end if nxt < 0 else nxt


# --------------------------------------------------------------------------- header


@dataclass(frozen=True, slots=True)
class Hl7Header:
    """The MSH fields medlb uses, as Latin-1 strings (``encode("latin-1")`` gives the exact bytes).

    Each value is the whole field as sent, components and repetitions included (``sending_facility``
    may be ``"LAB^1.2.3^ISO"``); an absent field is ``""``.
    """

    field_separator: str  # MSH-1
    encoding_characters: str  # MSH-2
    sending_application: str  # MSH-3
    sending_facility: str  # MSH-4
    receiving_application: str  # MSH-5
    receiving_facility: str  # MSH-6
    date_time: str  # MSH-7
    message_type: str  # MSH-9, e.g. "ADT^A01^ADT_A01"
    control_id: str  # MSH-10, never empty
    processing_id: str  # MSH-11: P production, T training, D debugging
    version: str  # MSH-12
    accept_ack_type: str  # MSH-15 (Table 0155: AL, NE, ER, SU)
    application_ack_type: str  # MSH-16
    charset: str  # MSH-18, e.g. "UNICODE UTF-8" or "8859/1"; "" means ASCII

    @property
    def component_separator(self) -> str:
        return self.encoding_characters[0]

    @property
    def repetition_separator(self) -> str:
        return self.encoding_characters[1]

    @property
    def escape_character(self) -> str:
        return self.encoding_characters[2]

    @property
    def subcomponent_separator(self) -> str:
        return self.encoding_characters[3]

    def _type_component(self, index: int) -> str:
        first = self.message_type.split(self.repetition_separator, 1)[0]
        parts = first.split(self.component_separator)
        return parts[index] if index < len(parts) else ""

    @property
    def message_code(self) -> str:
        """MSH-9.1, e.g. ``ADT``."""
        return self._type_component(0)

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. ``A01``."""
        return self._type_component(1)

    @property
    def message_structure(self) -> str:
        """MSH-9.3, e.g. ``ADT_A01`` (absent before v2.3.1)."""
        return self._type_component(2)


def parse_header(payload: bytes) -> Hl7Header:
    """Read the MSH segment of a message (an MLLP payload) without parsing the rest.

    Raises :class:`~medlb.errors.Hl7ProtocolError` if the payload does not start with ``MSH``, if MSH-1
    or MSH-2 are not valid delimiters, or if MSH-10 (the control ID every ACK must echo) is missing or
    empty. Batch (BHS) and file (FHS) envelopes are not messages and are refused the same way.
    """
    fs, _ = _delimiters(payload)
    term = _SEGMENT_END.search(payload, 4)
    msh = payload if term is None else payload[: term.start()]
    fields = msh.split(bytes((fs,)))  # fields[n - 1] is MSH-n for n >= 2

    def get(n: int) -> str:
        return fields[n - 1].decode("latin-1") if n - 1 < len(fields) else ""

    control_id = get(10)
    if not control_id:
        raise Hl7ProtocolError("MSH-10 (message control ID) is missing or empty")
    return Hl7Header(
        field_separator=chr(fs),
        encoding_characters=get(2),
        sending_application=get(3),
        sending_facility=get(4),
        receiving_application=get(5),
        receiving_facility=get(6),
        date_time=get(7),
        message_type=get(9),
        control_id=control_id,
        processing_id=get(11),
        version=get(12),
        accept_ack_type=get(15),
        application_ack_type=get(16),
        charset=get(18),
    )


def ack_mode(header: Hl7Header) -> AckMode:
    """``"enhanced"`` when MSH-15 or MSH-16 is present (§2.9.2), else ``"original"``."""
    return "enhanced" if header.accept_ack_type or header.application_ack_type else "original"


def dedup_key(header: Hl7Header) -> tuple[bytes, bytes, bytes]:
    """(MSH-3, MSH-4, MSH-10) as sent: a resent message repeats all three (reference §4.2)."""
    return (
        header.sending_application.encode("latin-1"),
        header.sending_facility.encode("latin-1"),
        header.control_id.encode("latin-1"),
    )


# --------------------------------------------------------------------------- field paths


@dataclass(frozen=True, slots=True, init=False)
class FieldPath:
    """A compiled field address, for ordering keys and routing rules: ``SEG-F[R].C.S``.

    ``PID-3`` is the whole field, every repetition included; ``PID-3[2]`` its second repetition;
    ``PID-3.1`` component 1 of the first repetition; ``PID-3[2].4.1`` subcomponent 1 of component 4 of
    the second repetition. All indexes are 1-based, as in the standard. The segment is the first one
    with that name. MSH-1 and MSH-2 are returned whole: they hold the delimiters themselves.

    :meth:`get` returns the raw bytes (escape sequences included), ``b""`` for a present but empty
    value, and ``None`` when the segment, field, repetition or component is absent.
    An invalid spec raises ``ValueError`` (a configuration mistake, not a protocol error).
    """

    segment: str
    field: int
    repetition: int | None
    component: int | None
    subcomponent: int | None

    def __init__(self, spec: str) -> None:
        m = _PATH.fullmatch(spec.strip().upper())
        if m is None:
            raise ValueError(f"invalid HL7 field path {spec!r}: expected e.g. PID-3, PID-3.1 or PID-3[2].4.1")
        seg, fld, rep, comp, sub = m.groups()
        object.__setattr__(self, "segment", seg)
        object.__setattr__(self, "field", int(fld))
        object.__setattr__(self, "repetition", int(rep) if rep else None)
        object.__setattr__(self, "component", int(comp) if comp else None)
        object.__setattr__(self, "subcomponent", int(sub) if sub else None)

    def __str__(self) -> str:
        out = f"{self.segment}-{self.field}"
        if self.repetition is not None:
            out += f"[{self.repetition}]"
        if self.component is not None:
            out += f".{self.component}"
        if self.subcomponent is not None:
            out += f".{self.subcomponent}"
        return out

    def get(self, payload: bytes) -> bytes | None:
        """The addressed value in ``payload``; raises Hl7ProtocolError if the MSH delimiters are invalid."""
        fs, enc = _delimiters(payload)
        is_msh = self.segment == "MSH"
        if is_msh and self.field == 1:
            return bytes((fs,))
        if is_msh and self.field == 2:
            return enc
        name = self.segment.encode("ascii")
        span = _find_segment(payload, name)
        if span is None:
            return None
        # MSH-1 is the separator after "MSH", so MSH-n follows the (n-1)-th separator.
        bounds = _field_span(payload, span[0], span[1], fs, self.field - 1 if is_msh else self.field)
        if bounds is None:
            return None
        value = payload[bounds[0] : bounds[1]]
        if self.repetition is None and self.component is None:
            return value
        reps = value.split(enc[1:2])
        if (self.repetition or 1) > len(reps):
            return None
        value = reps[(self.repetition or 1) - 1]
        if self.component is None:
            return value
        comps = value.split(enc[0:1])
        if self.component > len(comps):
            return None
        value = comps[self.component - 1]
        if self.subcomponent is None:
            return value
        subs = value.split(enc[3:4])
        return subs[self.subcomponent - 1] if self.subcomponent <= len(subs) else None


@lru_cache(maxsize=64)
def _compiled(spec: str) -> FieldPath:
    return FieldPath(spec)


def field(payload: bytes, path: str | FieldPath) -> bytes | None:
    """``FieldPath(path).get(payload)``, with the compiled path cached for string specs."""
    return (_compiled(path) if isinstance(path, str) else path).get(payload)


# --------------------------------------------------------------------------- acknowledgments


@dataclass(frozen=True, slots=True)
class Ack:
    """What an acknowledgment says: MSA-1, MSA-2 and a human-readable reason, as Latin-1 strings.

    ``text`` is MSA-3 or, when that is empty (it is deprecated from v2.5 on), ERR-8 "user message";
    None when neither is present.
    """

    code: str
    control_id: str
    text: str | None = None

    def acknowledges(self, header: Hl7Header) -> bool:
        """True when this answers the message with ``header``: MSA-2 equals its MSH-10 (§2.9)."""
        return self.control_id == header.control_id

    @property
    def success(self) -> bool:
        return is_success(self.code)


def parse_ack(payload: bytes) -> Ack:
    """Read MSA (and ERR) of a response. Raises Hl7ProtocolError if there is no MSA or MSA-1 is empty.

    The message type is not checked: an original-mode application response may be any type with an MSA.
    An unknown MSA-1 is returned as is; :func:`is_success` and :func:`is_retryable` are both false for it.
    """
    fs, _ = _delimiters(payload)
    msa = _segment_fields(payload, b"MSA", fs)
    if msa is None:
        raise Hl7ProtocolError("response has no MSA segment")
    code = msa[1].decode("latin-1") if len(msa) > 1 else ""
    if not code:
        raise Hl7ProtocolError("MSA-1 (acknowledgment code) is empty")
    control_id = msa[2].decode("latin-1") if len(msa) > 2 else ""
    text = msa[3] if len(msa) > 3 else b""
    if not text:
        err = _segment_fields(payload, b"ERR", fs)
        text = err[8] if err is not None and len(err) > 8 else b""
    return Ack(code, control_id, text.decode("latin-1") or None)


def is_success(code: str) -> bool:
    """AA or CA: the server took the message; only now may the sender hear a success."""
    return code in _SUCCESS


def is_retryable(code: str, *, retry_on_ae: bool = False) -> bool:
    """AR/CR (rejected, e.g. the system is unavailable), plus AE/CE when configured as retryable.

    AE means an error in the message content, which another server would usually repeat, so it is not
    retried unless the operator says the servers differ (reference §4.2).
    """
    return code in _REJECT or (retry_on_ae and code in _ERROR)


def nak_code(header: Hl7Header, code: str) -> str:
    """``code`` spelt for the message's acknowledgment mode: AE -> CE, AR -> CR in enhanced mode, and back."""
    table = _TO_ENHANCED if ack_mode(header) == "enhanced" else _TO_ORIGINAL
    return table.get(code, code)


def escape_text(text: str, header: Hl7Header) -> str:
    """Escape free text for a field of a message using ``header``'s delimiters (§2.7).

    Delimiters become ``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\`` (and ``\\P\\`` for the v2.7 truncation
    character); CR and LF, which would end the segment, become spaces; characters outside ASCII become
    ``?`` so the text is valid whatever MSH-18 declares.
    """
    enc = header.encoding_characters
    names = dict(zip(header.field_separator + enc, "FSRETP", strict=False))
    esc = header.escape_character
    out: list[str] = []
    for ch in text:
        if ch in names:
            out.append(f"{esc}{names[ch]}{esc}")
        elif ch in "\r\n":
            out.append(" ")
        elif not " " <= ch <= "~":
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def format_timestamp(moment: datetime) -> str:
    """An HL7 DTM for MSH-7: ``YYYYMMDDHHMMSS`` plus ``+/-ZZZZ`` when ``moment`` is timezone-aware."""
    return moment.strftime("%Y%m%d%H%M%S") + (moment.strftime("%z")[:5] if moment.tzinfo else "")


def make_ack(
    header: Hl7Header,
    code: str,
    text: str | None = None,
    *,
    timestamp: str,
    control_id: str | None = None,
) -> bytes:
    """Build the ACK payload (unframed) that answers the message with ``header``.

    As python-hl7's ``create_ack`` and HAPI's ``generateACK`` do: MSH-3/4 and MSH-5/6 swapped, MSH-7
    ``timestamp`` (see :func:`format_timestamp`), MSH-9 ``ACK^<trigger>^ACK``, MSH-10 ``control_id``
    (default: the message's own MSH-10, which keeps this function pure; the sender matches on MSA-2
    anyway), MSH-11/12 copied, MSH-18 copied when set so the swapped names keep their character set;
    then ``MSA|code|<MSH-10>|text`` with ``text`` escaped. The message's own delimiters are used and every
    segment ends with CR (§2.5.4). Every byte copied from the header is the byte that was received.

    ``code`` must be one of :data:`ACK_CODES`; ``timestamp`` and ``control_id`` must not contain a
    delimiter or a line break. Both are caller mistakes and raise ``ValueError``.
    """
    if code not in ACK_CODES:
        raise ValueError(f"ACK code must be one of {sorted(ACK_CODES)}, not {code!r}")
    forbidden = set(header.field_separator + header.encoding_characters + "\r\n\x0b\x1c")
    for name, value in (("timestamp", timestamp), ("control_id", control_id or "")):
        if forbidden.intersection(value) or not value.isascii():
            raise ValueError(f"{name} {value!r} contains a delimiter or a non-ASCII character")
    cs = header.component_separator
    msh = [
        "MSH",
        header.encoding_characters,
        header.receiving_application,
        header.receiving_facility,
        header.sending_application,
        header.sending_facility,
        timestamp,
        "",
        f"ACK{cs}{header.trigger_event}{cs}ACK",
        control_id or header.control_id,
        header.processing_id,
        header.version,
    ]
    if header.charset:
        msh += ["", "", "", "", "", header.charset]  # MSH-13..17 empty, MSH-18
    msa = ["MSA", code, header.control_id]
    if text:
        msa.append(escape_text(text, header))
    fs = header.field_separator
    return f"{fs.join(msh)}\r{fs.join(msa)}\r".encode("latin-1")


def nak_for_error(error: Hl7ProtocolError, *, timestamp: str, control_id: str | None = None) -> bytes | None:
    """The NAK payload to answer a framing error with, or None when the connection should just close.

    This is the policy of :mod:`.mllp` in one place: a NAK is possible when the error names an
    ``ack_code`` and its ``head`` holds a readable MSH with a control ID; the code is spelt for the
    message's acknowledgment mode and the error message becomes MSA-3. Either way the caller then closes.
    """
    if error.ack_code is None:
        return None
    try:
        header = parse_header(error.head)
    except Hl7ProtocolError:
        return None
    return make_ack(header, nak_code(header, error.ack_code), str(error), timestamp=timestamp, control_id=control_id)
