"""The medlb exception tree.

Everything medlb raises on purpose derives from :class:`MedlbError`, so the CLI
can turn any of them into one clear message and a non-zero exit code instead of
a traceback::

    MedlbError
    +-- ConfigError          the configuration is invalid; carries every problem
    +-- StartupError         a resource could not be acquired (port in use, ...)
    +-- ProtocolError        a peer sent bytes that break a protocol rule
        +-- ProxyProtocolError
        +-- DicomProtocolError   carries the A-ABORT (or A-ASSOCIATE-RJ) to answer with
        +-- Hl7ProtocolError     carries the MSA-1 of the NAK to answer with, if any

This module imports nothing from medlb: it sits in the innermost ring.
"""

from __future__ import annotations

from dataclasses import dataclass


class MedlbError(Exception):
    """Base class of every error medlb raises deliberately."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a configuration, with its location.

    ``loc`` uses the dotted/indexed form an operator can follow in the YAML
    file, e.g. ``backends[1].servers[0].address``.
    """

    loc: str
    message: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.message}" if self.loc else self.message


class ConfigError(MedlbError):
    """The configuration is invalid. ``issues`` lists *all* problems found.

    Reporting every problem at once matters to an operator editing a file over
    a slow change-control process: one round trip, not one per typo.
    """

    def __init__(self, issues: list[ConfigIssue], source: str = "") -> None:
        self.issues = issues
        self.source = source
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{head}{len(issues)} configuration error(s):\n{lines}")


class StartupError(MedlbError):
    """A runtime resource could not be acquired (address in use, no permission)."""


class ProtocolError(MedlbError):
    """A peer violated a protocol rule; the session is closed, the process stays up."""


class ProxyProtocolError(ProtocolError):
    """A PROXY protocol header was malformed."""


class DicomProtocolError(ProtocolError):
    """A DICOM peer broke a PS3.8 Upper Layer or PS3.7 DIMSE encoding rule.

    The error carries the answer the peer should get, so the layer that catches it
    sends a protocol-correct goodbye instead of just dropping the TCP connection
    (ARCHITECTURE.md §6: "abort with a protocol-correct message"):

    * ``abort_source`` / ``abort_reason``: the A-ABORT to send (PS3.8 §9.3.8). The
      default is source 2 (service provider) with reason 0 (not specified); the
      codec narrows the reason where PS3.8 names one (1 unrecognized PDU, 2
      unexpected PDU, 4 unrecognized PDU parameter, 5 unexpected PDU parameter, 6
      invalid PDU parameter value).
    * ``reject``: ``(result, source, reason)`` of an A-ASSOCIATE-RJ (PS3.8 §9.3.4),
      or ``None``. Only meaningful while the peer still waits for the answer to its
      A-ASSOCIATE-RQ; afterwards the abort applies.

    The values are plain ints so this module keeps importing nothing from medlb;
    the named constants live in :mod:`medlb.proto.dicom_pdu`.
    """

    def __init__(
        self,
        message: str,
        *,
        abort_source: int = 2,
        abort_reason: int = 0,
        reject: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.abort_source = abort_source
        self.abort_reason = abort_reason
        self.reject = reject


class Hl7ProtocolError(ProtocolError):
    """An HL7 v2 peer broke an MLLP framing rule or the ER7 encoding of a message header.

    HL7 has no abort message: a sender learns about a failure from a NAK (an ACK whose MSA-1 is
    AE/AR, or CE/CR in enhanced mode) or from the connection closing, after which its MLLP client
    reconnects and resends (delivery is at-least-once). The error therefore carries what the layer
    needs to choose between the two:

    * ``ack_code``: the MSA-1 of the NAK to answer with, in original-mode spelling (``"AE"``: this
      message will never be accepted, e.g. it is too large; ``"AR"``: it was rejected in transit,
      resending may succeed), or ``None`` when no message can be identified (junk on the wire).
      The codec maps it to CE/CR when the message asked for enhanced mode.
    * ``head``: the first bytes of the offending message as received (bounded, never the whole
      message), from which the layer reads MSH to address the NAK; ``b""`` when no message started.

    The policy, documented in :mod:`medlb.proto.mllp`: answer the NAK when ``ack_code`` is set and
    ``head`` holds a readable MSH, then close the connection; otherwise just close it.

    The values are plain so this module keeps importing nothing from medlb; the NAK itself is built by
    :func:`medlb.proto.hl7.nak_for_error`.
    """

    def __init__(self, message: str, *, ack_code: str | None = None, head: bytes = b"") -> None:
        super().__init__(message)
        self.ack_code = ack_code
        self.head = head
