"""Frame HL7 v2 messages on a byte stream with the Minimal Lower Layer Protocol (MLLP), sans-IO.

Spec: HL7 v2.x Implementation Guide, Appendix C "Lower Layer Protocols", C.4 (MLLP release 1): a
message travels as ``<VT> payload <FS><CR>``, VT = 0x0B (start block), FS = 0x1C, CR = 0x0D (end
block). The payload is the ER7 message itself and must not contain VT or FS. The reference notes are in
``reference/dicom-hl7.md`` §4.1.

Theory of operation
-------------------
:class:`MllpFramer` takes the bytes of one direction of a connection, in chunks of any size, and returns
the payloads they complete, byte for byte: nothing is decoded, so whatever character set MSH-18 names
(ASCII, ISO-8859-1, UTF-8, ...) reaches the server exactly as the client sent it.

Between messages the framer is *outside* a frame; a VT takes it *inside*, where it collects payload
bytes until FS CR. Each chunk is searched once, from where the previous search stopped, with
``bytes.find`` (C speed): the held part of a message is never rescanned, so the work is linear in the
bytes fed, whatever the chunking (one byte per feed, or a thousand messages per feed). A payload that
lies wholly inside one chunk is sliced out with one copy; a payload that spans chunks is appended to a
``bytearray`` (amortised linear growth) and copied once when complete.

Size limit (h11's ``max_incomplete_event_size`` and h2's frame-size check are the precedent): a payload
may hold at most ``max_message`` bytes, 16 MiB by default, which is room for ORU results carrying a
base64 PDF (base64 inflates by 4/3, so 16 MiB carries a ~12 MiB document). The check happens *before*
bytes are appended: as soon as more than ``max_message`` payload bytes have arrived without an end block,
:class:`~medlb.errors.Hl7ProtocolError` is raised, and the framer never holds more than ``max_message``
payload bytes (plus its few fixed fields). A chunk is never searched further than the room left.

Policy for bytes that break framing
-----------------------------------
Every framing error leaves the stream without a trustworthy boundary, so the connection must be
closed. The error tells the caller whether to answer a NAK first (``ack_code``) and carries the first
bytes of the message (``head``) so the NAK can be addressed from its MSH
(:func:`medlb.proto.hl7.nak_for_error` builds it). The sender, which holds every message it has not seen
acknowledged, reconnects and resends: messages completed earlier in the same chunk as the error are
dropped with the error, and that is safe for the same reason (they were never acknowledged).

=============================================  =========================================================
what arrives                                   what happens
=============================================  =========================================================
CR, LF, NUL, space or tab outside a frame      skipped silently: seen in the wild as keep-alives and
                                               as a trailing newline after FS CR (connect#249)
any other byte outside a frame                 error "junk before start block", ``ack_code=None``: no
                                               message can be identified, so just close
VT inside a frame (before FS CR)               error, ``ack_code="AR"``: the previous message lost its
                                               end block (a sender that timed out and restarted);
                                               restarting silently would forward a truncated message
                                               as if it were whole. NAK the truncated one, then close
FS not followed by CR                          error, ``ack_code="AR"``: not MLLP release 1
more than ``max_message`` payload bytes        error, ``ack_code="AE"``: resending the same message
                                               cannot succeed, so the sender should not retry it
end of stream inside a frame                   not this module's call: :attr:`MllpFramer.at_boundary`
                                               is false, and the layer drops the partial message
=============================================  =========================================================

After an error the framer is failed: every later :meth:`MllpFramer.feed` raises the same error.

An empty frame (VT FS CR) is returned as ``b""``; it is the header parser's job to reject it. MLLP
release 2's commit blocks (a payload of one ACK 0x06 or NAK 0x15 byte) are likewise returned as payloads.

This module must not import asyncio, socket or time (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import re
from typing import Final

from medlb.errors import Hl7ProtocolError

__all__ = [
    "CR",
    "DEFAULT_MAX_MESSAGE",
    "END_BLOCK",
    "FS",
    "HEAD_LIMIT",
    "START_BLOCK",
    "VT",
    "MllpFramer",
    "frame",
]

VT: Final = 0x0B
"""Start block (vertical tab)."""
FS: Final = 0x1C
"""First byte of the end block (file separator)."""
CR: Final = 0x0D
"""Second byte of the end block (carriage return); also the HL7 segment terminator."""
START_BLOCK: Final = b"\x0b"
END_BLOCK: Final = b"\x1c\x0d"

DEFAULT_MAX_MESSAGE: Final = 16 * 1024 * 1024
"""Largest payload accepted by default: 16 MiB, room for a result carrying a base64-encoded PDF."""

HEAD_LIMIT: Final = 4096
"""How many payload bytes an error keeps in ``head``: far more than any MSH segment needs."""

# Bytes tolerated between frames (see the policy table above). A regex match runs in C, so a long
# run of NUL keep-alives costs one call, not one Python iteration per byte.
_FILLER: Final = re.compile(rb"[\x00\t\n\r ]*")


def frame(payload: bytes) -> bytes:
    """Wrap one message in MLLP: ``VT payload FS CR``.

    A payload holding VT or FS would be cut at the wrong place by the receiver, so it is refused with
    ``ValueError`` (a payload that came through :class:`MllpFramer` never holds them). To avoid the copy
    on a large message, a relay may write ``START_BLOCK``, the payload and ``END_BLOCK`` separately.
    """
    if START_BLOCK in payload or b"\x1c" in payload:
        raise ValueError("an MLLP payload must not contain VT (0x0B) or FS (0x1C)")
    return START_BLOCK + payload + END_BLOCK


class MllpFramer:
    """Split a byte stream into MLLP payloads, holding at most one partial message.

    ``max_message`` bounds the payload bytes held (and so the memory); it may be changed between calls.
    See the module docstring for the policy on junk, oversize messages and broken end blocks.
    """

    __slots__ = ("_buf", "_error", "_fs_seen", "_inside", "max_message")

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_message < 1:
            raise ValueError(f"max_message must be positive, not {max_message}")
        self.max_message = max_message
        self._buf = bytearray()  # payload bytes of the message in progress
        self._inside = False  # a VT was seen and its end block was not
        self._fs_seen = False  # the last byte fed was the FS of an end block; its CR is due
        self._error: Hl7ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Payload bytes held for the message in progress (never more than ``max_message``)."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """True when no partial message is held: the stream may end or be cut here without loss."""
        return not self._inside

    @property
    def failed(self) -> bool:
        """True after a framing error; the connection must be closed."""
        return self._error is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take the next bytes of the stream; return the payloads they complete, in order.

        Raises :class:`~medlb.errors.Hl7ProtocolError` on a framing error, and again on every later call.
        """
        if self._error is not None:
            raise self._error
        chunk = data if isinstance(data, bytes) else bytes(data)
        try:
            return self._feed(chunk)
        except Hl7ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._inside = self._fs_seen = False
            raise

    def _feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos, end = 0, len(data)
        if self._fs_seen and end:
            # The end block was split between two chunks: FS ended the previous one.
            if data[0] != CR:
                raise self._fs_without_cr(data, 0, 0)
            out.append(bytes(self._buf))
            self._buf = bytearray()  # a fresh buffer: the old one may have grown large
            self._inside = self._fs_seen = False
            pos = 1
        while pos < end:
            if not self._inside:
                match = _FILLER.match(data, pos)
                assert match is not None  # a starred pattern always matches
                pos = match.end()
                if pos == end:
                    break
                if data[pos] != VT:
                    raise Hl7ProtocolError(
                        f"junk before start block: {data[pos : pos + 16]!r}",
                        ack_code=None,
                    )
                pos += 1
                self._inside = True
                continue
            room = self.max_message - len(self._buf)
            # Never look further than one byte past the room left: a longer payload is an error anyway,
            # and a huge chunk must not be scanned (or copied) beyond the limit.
            stop = min(end, pos + room + 1)
            fs = data.find(b"\x1c", pos, stop)
            scan_end = stop if fs < 0 else fs
            vt = data.find(START_BLOCK, pos, scan_end)
            if vt >= 0:
                raise Hl7ProtocolError(
                    "start block inside a message: its end block is missing",
                    ack_code="AR",
                    head=self._head(data, pos, vt),
                )
            if fs < 0:
                if end - pos > room:
                    raise Hl7ProtocolError(
                        f"message larger than max_message ({self.max_message} bytes)",
                        ack_code="AE",
                        head=self._head(data, pos, stop),
                    )
                self._buf += memoryview(data)[pos:end]
                break
            if fs + 1 == end:
                self._buf += memoryview(data)[pos:fs]
                self._fs_seen = True
                break
            if data[fs + 1] != CR:
                raise self._fs_without_cr(data, pos, fs)
            if self._buf:
                self._buf += memoryview(data)[pos:fs]
                out.append(bytes(self._buf))
                self._buf = bytearray()
            else:
                out.append(data[pos:fs])
            self._inside = False
            pos = fs + 2
        return out

    def _head(self, data: bytes, start: int, stop: int) -> bytes:
        """The first :data:`HEAD_LIMIT` bytes of the message in progress, held part first."""
        held = bytes(self._buf[:HEAD_LIMIT])
        return held + data[start : min(stop, start + HEAD_LIMIT - len(held))]

    def _fs_without_cr(self, data: bytes, start: int, stop: int) -> Hl7ProtocolError:
        return Hl7ProtocolError("end block FS not followed by CR", ack_code="AR", head=self._head(data, start, stop))
