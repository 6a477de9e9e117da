"""Observe DIMSE command sets in P-DATA-TF bodies, and encode the C-ECHO a health check needs; sans-IO.

Spec: DICOM PS3.7 §6.3 and §9.3 (command set encoding and fields), Annex C (status classes), Annex E
(the command dictionary); PS3.8 §9.3.5 and Annex E (PDV items and the message control header).

Theory of operation
-------------------
A DIMSE message is a command set, optionally followed by a data set. Both are cut into fragments,
each carried by one PDV item of a P-DATA-TF PDU; the message control header says command (bit 0)
or data set, and last fragment (bit 1). PDV items never straddle PDUs, but one command may span
several PDVs and PDUs, and fragments of different messages are never interleaved (PS3.8 Annex E).

:class:`DimseObserver` watches one direction of an association. It is fed P-DATA-TF bodies and
returns each command set as soon as its last fragment arrives. Command fragments are reassembled
in a buffer bounded by ``max_command_length`` (a command set is a few hundred bytes; 64 KiB is far
beyond any real one); data-set fragments are only counted, never held, so an observer costs the
same for a 1 GB multi-frame C-STORE as for a C-ECHO. It checks the message sequence too: a data set
fragment needs a preceding command that announced a data set, a command may not start while a data
set is unfinished, and all fragments of one message use one presentation context.

Command sets are always Implicit VR Little Endian (PS3.7 §6.3.1), whatever transfer syntax was
negotiated: ``tag group (2) | tag element (2) | length (4) | value``, all little-endian, in group
0000 only, in ascending tag order, starting with Command Group Length (0000,0000) whose value is
the byte count of the elements after it. :func:`parse_command_set` checks that structure, decodes
the fields a proxy routes or reports on, and skips elements it does not know.

This module must not import asyncio, socket or time (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Final

from medlb.errors import DicomProtocolError
from medlb.proto.dicom_pdu import VERIFICATION_SOP_CLASS, AbortReason, PduType

__all__ = [
    "DEFAULT_MAX_COMMAND_LENGTH",
    "NO_DATA_SET",
    "CommandField",
    "CommandSet",
    "DimseObserver",
    "StatusCategory",
    "classify_status",
    "command_name",
    "command_pdata",
    "encode_c_echo_rq",
    "encode_c_echo_rsp",
    "encode_command_set",
    "parse_c_echo_rsp",
    "parse_command_set",
]

DEFAULT_MAX_COMMAND_LENGTH: Final = 65536
NO_DATA_SET: Final = 0x0101
"""Command Data Set Type meaning "no data set follows" (PS3.7 §9.3); any other value means one does."""


class CommandField(IntEnum):
    """Command Field (0000,0100) values (PS3.7 Annex E)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF


def command_name(field: int) -> str:
    """``"C-STORE-RQ"`` for 0x0001, ..., or ``"UNKNOWN(0x1234)"``: the spelling used in logs."""
    try:
        return CommandField(field).name.replace("_", "-")
    except ValueError:
        return f"UNKNOWN(0x{field:04X})"


class StatusCategory(Enum):
    """Status classes of PS3.7 Annex C."""

    SUCCESS = "success"
    PENDING = "pending"
    CANCEL = "cancel"
    WARNING = "warning"
    FAILURE = "failure"


# PS3.7 C.4: 0x0107 "attribute list error" and 0x0116 "attribute value out of range" are warnings.
_WARNINGS: Final = frozenset({0x0001, 0x0107, 0x0116})


def classify_status(status: int) -> StatusCategory:
    """Classify a Status (0000,0900) value.

    Success 0x0000; pending 0xFF00/0xFF01; cancel 0xFE00; warning 0x0001, 0x0107, 0x0116 and
    0xB000-0xBFFF (C-STORE B000/B006/B007: the instance *is* stored; C-MOVE/C-GET B000:
    sub-operations finished with failures); everything else is a failure (A7xx, A9xx, Cxxx, 01xx, 02xx).
    """
    if status == 0x0000:
        return StatusCategory.SUCCESS
    if status in (0xFF00, 0xFF01):
        return StatusCategory.PENDING
    if status == 0xFE00:
        return StatusCategory.CANCEL
    if status in _WARNINGS or 0xB000 <= status <= 0xBFFF:
        return StatusCategory.WARNING
    return StatusCategory.FAILURE


# --------------------------------------------------------------------------- command sets

_ELEMENT: Final = struct.Struct("<HHL")
_US: Final = struct.Struct("<H")
_UL: Final = struct.Struct("<L")

_GROUP_LENGTH: Final = 0x0000
_AFFECTED_SOP_CLASS: Final = 0x0002
_COMMAND_FIELD: Final = 0x0100
_MESSAGE_ID: Final = 0x0110
_RESPONDED_TO: Final = 0x0120
_MOVE_DESTINATION: Final = 0x0600
_PRIORITY: Final = 0x0700
_DATA_SET_TYPE: Final = 0x0800
_STATUS: Final = 0x0900
_AFFECTED_SOP_INSTANCE: Final = 0x1000

# Elements decoded as US; every one must be exactly 2 bytes long.
_US_ELEMENTS: Final = frozenset({_COMMAND_FIELD, _MESSAGE_ID, _RESPONDED_TO, _PRIORITY, _DATA_SET_TYPE, _STATUS})


@dataclass(frozen=True, slots=True)
class CommandSet:
    """The fields of a command set that a proxy routes, counts or logs on.

    UIDs are returned without their 0x00 padding, the Move Destination AE title without spaces.
    """

    command_field: int
    command_data_set_type: int
    message_id: int | None = None
    message_id_being_responded_to: int | None = None
    status: int | None = None
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    move_destination: str | None = None
    priority: int | None = None

    @property
    def name(self) -> str:
        return command_name(self.command_field)

    @property
    def is_response(self) -> bool:
        # Bit 15 marks every response; C-CANCEL-RQ (0x0FFF) is a request.
        return bool(self.command_field & 0x8000)

    @property
    def has_data_set(self) -> bool:
        return self.command_data_set_type != NO_DATA_SET

    @property
    def status_category(self) -> StatusCategory | None:
        return None if self.status is None else classify_status(self.status)


def _dimse_error(message: str) -> DicomProtocolError:
    # PS3.7 §8.1 leaves an undecodable message to the service provider: abort the association.
    return DicomProtocolError(message, abort_source=2, abort_reason=AbortReason.NOT_SPECIFIED)


def _string(value: bytes, pad: bytes) -> str:
    return value.rstrip(pad).decode("latin-1")  # latin-1: never a decode error, any byte kept


def parse_command_set(data: bytes | bytearray | memoryview) -> CommandSet:
    """Parse a complete Implicit VR Little Endian command set, or raise :class:`DicomProtocolError`."""
    values: dict[int, bytes] = {}
    with memoryview(data) as mv:
        pos, end = 0, len(mv)
        last = -1
        while pos < end:
            if end - pos < _ELEMENT.size:
                raise _dimse_error(f"command set: truncated element header at offset {pos}")
            group, element, length = _ELEMENT.unpack_from(mv, pos)
            if group != 0x0000:
                raise _dimse_error(f"command set: element ({group:04X},{element:04X}) is not in group 0000")
            if element <= last:
                raise _dimse_error(f"command set: element (0000,{element:04X}) out of ascending order")
            last = element
            pos += _ELEMENT.size
            if length > end - pos:
                raise _dimse_error(f"command set: (0000,{element:04X}) announces {length} bytes, {end - pos} left")
            if element == _GROUP_LENGTH:
                if length != 4 or pos != _ELEMENT.size:
                    raise _dimse_error("command set: Command Group Length must be the first element, 4 bytes long")
                (group_length,) = _UL.unpack_from(mv, pos)
                if group_length != end - pos - 4:
                    raise _dimse_error(
                        f"command set: Command Group Length says {group_length}, {end - pos - 4} bytes follow"
                    )
            elif element in _US_ELEMENTS:
                if length != 2:
                    raise _dimse_error(f"command set: (0000,{element:04X}) is US but {length} bytes long")
                values[element] = bytes(mv[pos : pos + 2])
            elif element in (_AFFECTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE, _MOVE_DESTINATION):
                values[element] = bytes(mv[pos : pos + length])
            pos += length

    def us(element: int) -> int | None:
        raw = values.get(element)
        return None if raw is None else int(_US.unpack(raw)[0])

    def text(element: int, pad: bytes) -> str | None:
        raw = values.get(element)
        return None if raw is None else _string(raw, pad)

    field = us(_COMMAND_FIELD)
    if field is None:
        raise _dimse_error("command set has no Command Field (0000,0100)")
    data_set_type = us(_DATA_SET_TYPE)
    if data_set_type is None:
        raise _dimse_error("command set has no Command Data Set Type (0000,0800)")
    destination = values.get(_MOVE_DESTINATION)
    return CommandSet(
        command_field=field,
        command_data_set_type=data_set_type,
        message_id=us(_MESSAGE_ID),
        message_id_being_responded_to=us(_RESPONDED_TO),
        status=us(_STATUS),
        affected_sop_class_uid=text(_AFFECTED_SOP_CLASS, b"\x00 "),
        affected_sop_instance_uid=text(_AFFECTED_SOP_INSTANCE, b"\x00 "),
        move_destination=None if destination is None else _string(destination, b" ").lstrip(" "),
        priority=us(_PRIORITY),
    )


def encode_command_set(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """Encode group-0000 ``(element, value)`` pairs as a command set, adding Command Group Length.

    Elements are sorted; values are used as given, so they must already have even length (UIDs
    padded with 0x00, text with a space: PS3.5 §6.2).
    """
    body = bytearray()
    for element, value in sorted(elements):
        if element == _GROUP_LENGTH:
            raise ValueError("Command Group Length is computed, do not pass it")
        if len(value) % 2:
            raise ValueError(f"(0000,{element:04X}) value has odd length {len(value)}")
        body += _ELEMENT.pack(0x0000, element, len(value)) + value
    return _ELEMENT.pack(0x0000, _GROUP_LENGTH, 4) + _UL.pack(len(body)) + body


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_c_echo_rq(message_id: int) -> bytes:
    """The C-ECHO-RQ command set (PS3.7 §9.3.5.1) for ``message_id``."""
    return encode_command_set(
        [
            (_AFFECTED_SOP_CLASS, _uid_value(VERIFICATION_SOP_CLASS)),
            (_COMMAND_FIELD, _US.pack(CommandField.C_ECHO_RQ)),
            (_MESSAGE_ID, _US.pack(message_id)),
            (_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        ]
    )


def encode_c_echo_rsp(message_id_being_responded_to: int, status: int = 0x0000) -> bytes:
    """The C-ECHO-RSP command set (PS3.7 §9.3.5.2): what a verification SCP answers."""
    return encode_command_set(
        [
            (_AFFECTED_SOP_CLASS, _uid_value(VERIFICATION_SOP_CLASS)),
            (_COMMAND_FIELD, _US.pack(CommandField.C_ECHO_RSP)),
            (_RESPONDED_TO, _US.pack(message_id_being_responded_to)),
            (_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
            (_STATUS, _US.pack(status)),
        ]
    )


def command_pdata(command_set: bytes, context_id: int) -> bytes:
    """Wrap a whole command set in one P-DATA-TF PDU: one PDV, header 0x03 (command, last).

    The caller makes sure it fits the peer's Maximum Length (a C-ECHO is about 80 bytes).
    """
    if not 1 <= context_id <= 255 or context_id % 2 == 0:
        raise ValueError(f"presentation context ID {context_id} must be odd and 1-255")
    pdv = struct.pack(">LBB", len(command_set) + 2, context_id, 0x03) + command_set
    return struct.pack(">BBL", PduType.P_DATA_TF, 0, len(pdv)) + pdv


def parse_c_echo_rsp(command: CommandSet, message_id: int) -> int:
    """Return the status of a C-ECHO-RSP answering ``message_id``; raise if it is anything else."""
    if command.command_field != CommandField.C_ECHO_RSP:
        raise _dimse_error(f"expected a C-ECHO-RSP, got {command.name}")
    if command.message_id_being_responded_to != message_id:
        raise _dimse_error(f"C-ECHO-RSP answers message {command.message_id_being_responded_to}, expected {message_id}")
    if command.status is None:
        raise _dimse_error("C-ECHO-RSP has no Status (0000,0900)")
    return command.status


# --------------------------------------------------------------------------- observer

_PDV_HEAD: Final = struct.Struct(">LBB")


class DimseObserver:
    """Follow the DIMSE messages of one direction of an association, from P-DATA-TF bodies.

    ``feed`` returns the command sets completed by one PDU body. Counters: ``commands`` (command
    sets parsed), ``data_sets`` (data sets completed), ``data_set_bytes`` (data-set fragment bytes
    seen). After an error the observer is failed and every later ``feed`` raises the same error.
    """

    __slots__ = (
        "_command",
        "_context_id",
        "_error",
        "_in_data_set",
        "commands",
        "data_set_bytes",
        "data_sets",
        "max_command_length",
    )

    def __init__(self, *, max_command_length: int = DEFAULT_MAX_COMMAND_LENGTH) -> None:
        if max_command_length < 1:
            raise ValueError(f"max_command_length must be positive, got {max_command_length}")
        self.max_command_length = max_command_length
        self._command = bytearray()
        self._context_id: int | None = None  # context of the message in progress, if any
        self._in_data_set = False
        self._error: DicomProtocolError | None = None
        self.commands = 0
        self.data_sets = 0
        self.data_set_bytes = 0

    @property
    def in_message(self) -> bool:
        """True while a command or its data set is incomplete (the association is busy)."""
        return self._context_id is not None

    @property
    def buffered(self) -> int:
        """Command bytes held while waiting for the last command fragment."""
        return len(self._command)

    def feed(self, body: bytes | bytearray | memoryview) -> list[CommandSet]:
        """Take one P-DATA-TF body (the bytes after the 6-byte PDU header)."""
        if self._error is not None:
            raise self._error
        try:
            with memoryview(body) as m, m.cast("B") as mv:
                return self._feed(mv)
        except DicomProtocolError as exc:
            self._error = exc
            self._command = bytearray()
            raise

    def _feed(self, mv: memoryview) -> list[CommandSet]:
        out: list[CommandSet] = []
        pos, end = 0, len(mv)
        if not end:
            raise _dimse_error("P-DATA-TF without PDV items")
        while pos < end:
            if end - pos < _PDV_HEAD.size:
                raise _dimse_error(f"P-DATA-TF: truncated PDV item at offset {pos}")
            length, context_id, control = _PDV_HEAD.unpack_from(mv, pos)
            if length < 2:
                raise _dimse_error(f"P-DATA-TF: PDV item length {length} < 2")
            if length > end - pos - 4:
                raise _dimse_error(f"P-DATA-TF: PDV item announces {length} bytes, {end - pos - 4} left")
            if context_id % 2 == 0:
                raise _dimse_error(f"P-DATA-TF: presentation context ID {context_id} is not odd")
            start, pos = pos + _PDV_HEAD.size, pos + 4 + length
            if self._context_id is not None and context_id != self._context_id:
                raise _dimse_error(
                    f"PDV on presentation context {context_id} inside a message on context {self._context_id}"
                )
            last = bool(control & 0x02)
            if control & 0x01:
                if self._in_data_set:
                    raise _dimse_error("command fragment before the previous data set ended")
                if len(self._command) + pos - start > self.max_command_length:
                    raise _dimse_error(f"command set longer than {self.max_command_length} bytes")
                self._command += mv[start:pos]
                self._context_id = context_id
                if last:
                    command = parse_command_set(self._command)
                    self._command = bytearray()
                    self.commands += 1
                    out.append(command)
                    self._in_data_set = command.has_data_set
                    if not self._in_data_set:
                        self._context_id = None
            else:
                if not self._in_data_set:
                    if self._command:
                        raise _dimse_error("data set fragment before the command set ended")
                    raise _dimse_error("data set fragment without a command announcing a data set")
                self.data_set_bytes += pos - start
                if last:
                    self.data_sets += 1
                    self._in_data_set = False
                    self._context_id = None
        return out
