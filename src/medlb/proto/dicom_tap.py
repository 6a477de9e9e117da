"""A streaming tap on one direction of an established DICOM association, sans-IO.

After the A-ASSOCIATE-AC, medlb relays bytes as they come (no re-framing, no copy per PDU) and
only *looks* at them on the way: the tap is fed every chunk the relay forwards and tells the
relay what passed, so the access log, the metrics and the dashboard can count DIMSE operations.

What it keeps is bounded whatever the peers send:

- the 6-byte PDU header and the 6-byte PDV item header being read (they may straddle chunks);
- the fragments of the current DIMSE *command* set (small, at most ``max_command`` bytes);
- never a byte of a data set: a C-STORE of 2 GB costs a few integer updates per chunk.

It checks the framing it walks (PDU types after association, the P-DATA-TF / PDV lengths, PDV
items tiling their PDU) and raises :class:`~medlb.errors.DicomProtocolError` on a violation, so
the relay can abort both sides instead of passing garbage to an archive. Lengths of data PDUs are
not limited here: the peers negotiated them, and nothing is buffered from them.

Why not :class:`~medlb.proto.dicom_pdu.PduReader` plus :class:`~medlb.proto.dicom_dimse.DimseObserver`:
those keep whole PDU bodies, which is right during negotiation and wrong for a relay that must
stay flat in memory while a multi-GB study passes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from medlb.errors import DicomProtocolError
from medlb.proto.dicom_dimse import CommandSet, parse_command_set
from medlb.proto.dicom_pdu import AbortReason, AbortSource

P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07
#: PDU types that may follow an established association (PS3.8 Sta6 and the release states).
_RELAY_TYPES = frozenset({P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT})
#: Default bound on one reassembled command set: real ones are a few hundred bytes.
MAX_COMMAND = 64 * 1024

#: A PDU header followed by a PDV item header: type, reserved, PDU length, item length, context, flags.
_BULK = struct.Struct(">BxIIBB")

_HDR = 0  # reading a PDU header
_PDV_HDR = 1  # inside a P-DATA-TF, reading a PDV item header
_CMD = 2  # inside a command fragment
_DATA = 3  # inside a data-set fragment
_BODY = 4  # inside the body of another PDU (release, abort)


def _error(message: str) -> DicomProtocolError:
    return DicomProtocolError(
        message,
        abort_source=AbortSource.SERVICE_PROVIDER,
        abort_reason=AbortReason.INVALID_PDU_PARAMETER_VALUE,
    )


@dataclass(slots=True)
class TapEvents:
    """What one :meth:`AssociationTap.feed` saw complete."""

    commands: list[CommandSet] = field(default_factory=list)
    #: PDU types other than P-DATA-TF that ended in this chunk (release RQ/RP, abort).
    control: list[int] = field(default_factory=list)


class AssociationTap:
    """Walk one direction of an association's PDUs; count bytes; collect command sets."""

    __slots__ = (
        "_cmd",
        "_hdr",
        "_left_pdu",
        "_left_pdv",
        "_pdu_type",
        "_pdv_flags",
        "_state",
        "data_bytes",
        "max_command",
        "pdus",
    )

    def __init__(self, *, max_command: int = MAX_COMMAND) -> None:
        self.max_command = max_command
        self._state = _HDR
        self._hdr = bytearray()
        self._cmd = bytearray()
        self._pdu_type = 0
        self._left_pdu = 0
        self._left_pdv = 0
        self._pdv_flags = 0
        #: Complete PDUs seen, and data-set bytes seen (fragment payloads only).
        self.pdus = 0
        self.data_bytes = 0

    @property
    def at_boundary(self) -> bool:
        """True between two PDUs: an A-ABORT may be injected here without corrupting the stream."""
        return self._state == _HDR and not self._hdr

    def feed(self, data: bytes | bytearray | memoryview) -> TapEvents | None:
        """Look at the next chunk; return what completed in it, or None when nothing did (the usual case)."""
        events: TapEvents | None = None
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                # The bulk of a C-STORE: skip the payload without touching it.
                step = min(self._left_pdv, end - pos)
                pos += step
                self.data_bytes += step
                self._left_pdv -= step
                if not self._left_pdv:
                    self._fragment_done()
                continue
            if state == _HDR and end - pos > 12 and not self._hdr:
                # Fast path for the bulk shape of a C-STORE: a P-DATA-TF holding exactly one
                # data-set PDV. Both headers are read in one unpack and the fragment is skipped by
                # the _DATA branch: two loop turns per PDU instead of five.
                pdu_type, length, item_length, context_id, flags = _BULK.unpack_from(data, pos)
                if pdu_type == P_DATA_TF and item_length + 4 == length and context_id & 1 and not flags & 1:
                    if item_length < 2:  # pragma: no cover - excluded by the sum above (length >= 6)
                        raise _error(f"PDV item of {item_length} bytes")
                    pos += 12
                    self._pdu_type = P_DATA_TF
                    self._left_pdu = 0
                    self._pdv_flags = flags
                    self._left_pdv = item_length - 2
                    self._state = _DATA
                    if not self._left_pdv:
                        self._fragment_done()
                    continue
            if state in (_HDR, _PDV_HDR):
                take = min(6 - len(self._hdr), end - pos)
                self._hdr += data[pos : pos + take]
                pos += take
                if len(self._hdr) < 6:
                    continue
                if state == _HDR:
                    self._pdu_header()
                elif self._pdv_header():  # an empty fragment (item length 2) ends with its header
                    events = self._end_fragment(events)
                continue
            if state == _CMD:
                take = min(self._left_pdv, end - pos)
                if len(self._cmd) + take > self.max_command:
                    raise _error(f"DIMSE command set longer than {self.max_command} bytes")
                self._cmd += data[pos : pos + take]
                pos += take
                self._left_pdv -= take
                if not self._left_pdv:
                    events = self._end_fragment(events)
                continue
            # _BODY: a release or abort PDU body (4 bytes): nothing to keep.
            step = min(self._left_pdu, end - pos)
            pos += step
            self._left_pdu -= step
            if not self._left_pdu:
                self._state = _HDR
                events = self._pdu_done(events)
        return events

    # -- framing

    def _pdu_header(self) -> None:
        hdr = self._hdr
        pdu_type = hdr[0]
        length = int.from_bytes(hdr[2:6], "big")
        self._hdr.clear()
        if pdu_type not in _RELAY_TYPES:
            raise _error(f"PDU type 0x{pdu_type:02x} is not valid on an established association")
        if pdu_type == P_DATA_TF:
            if length < 6:
                raise _error(f"P-DATA-TF of {length} bytes cannot hold a PDV item")
        elif length != 4:
            raise _error(f"PDU type 0x{pdu_type:02x} has length {length}, not 4")
        self._pdu_type = pdu_type
        self._left_pdu = length
        self._state = _PDV_HDR if pdu_type == P_DATA_TF else _BODY

    def _pdv_header(self) -> bool:
        """Take a PDV item header; True when its fragment is empty, i.e. the item already ended."""
        hdr = self._hdr
        item_length = int.from_bytes(hdr[0:4], "big")
        context_id = hdr[4]
        flags = hdr[5]
        self._hdr.clear()
        if item_length < 2 or item_length + 4 > self._left_pdu:
            raise _error(f"PDV item of {item_length} bytes does not fit its P-DATA-TF ({self._left_pdu} left)")
        if context_id % 2 == 0:
            raise _error(f"PDV presentation context ID {context_id} is not odd")
        self._left_pdu -= item_length + 4  # the whole item, header and fragment, is accounted now
        self._left_pdv = item_length - 2
        self._pdv_flags = flags
        self._state = _CMD if flags & 0x01 else _DATA
        return not self._left_pdv

    def _end_fragment(self, events: TapEvents | None) -> TapEvents | None:
        """A PDV item ended: complete the command set if it was its last fragment, then move on.

        Also for an empty last command fragment (PDV item length 2), which PS3.8 allows: skipping it
        would leave the command's bytes in the buffer, glued to the next command.
        """
        if self._state == _CMD and self._pdv_flags & 0x02:  # last fragment: the command set is whole
            command = parse_command_set(bytes(self._cmd))
            self._cmd.clear()
            if events is None:
                events = TapEvents()
            events.commands.append(command)
        self._fragment_done()
        return events

    def _fragment_done(self) -> None:
        if self._left_pdu:
            if self._left_pdu < 6:
                raise _error(f"{self._left_pdu} bytes left in a P-DATA-TF: too few for a PDV item")
            self._state = _PDV_HDR
        else:
            self._state = _HDR
            self.pdus += 1

    def _pdu_done(self, events: TapEvents | None) -> TapEvents | None:
        self.pdus += 1
        if self._pdu_type == P_DATA_TF:
            return events
        if events is None:
            events = TapEvents()
        events.control.append(self._pdu_type)
        return events
