"""HL7 v2 message routing, per-key ordering and duplicate suppression: the pure decisions of ``mode: hl7``.

Pure (ring 3): the I/O ring (:mod:`medlb.io.hl7`) owns the sockets and timers and asks these
objects what to do.

- :class:`Hl7Router`: which backend a message goes to, by its MSH fields (first matching rule
  wins, else the frontend's default backend).
- :class:`KeyOrder`: messages with the same ordering key (a patient, by default PID-3) are delivered
  strictly one at a time, in arrival order; other keys proceed in parallel. At most one message per
  key is ever outstanding, which also bounds retry storms: a failing key retries one message.
- :class:`DedupTable`: (MSH-3, MSH-4, MSH-10) of messages a server acknowledged, with the ACK that
  was returned, for a window. A sender that did not see our ACK resends; the resend is answered with
  the same ACK and not delivered twice. Only successes are kept: a message that was NAKed may be
  resent and must be tried again.
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from medlb.config import FrontendConfig, Hl7FrontendSettings, Hl7Rule
from medlb.proto.hl7 import Hl7Header

T = TypeVar("T")


def _matcher(patterns: list[str] | None) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _type_matches(matcher: re.Pattern[str] | None, message_type: str, component: str) -> bool:
    """MSH-9 matches as sent, or without its third component (``ADT^A01^ADT_A01`` ~ ``ADT^A01``)."""
    if matcher is None:
        return True
    if matcher.match(message_type):
        return True
    short = component.join(message_type.split(component)[:2])
    return matcher.match(short) is not None


@dataclass(frozen=True, slots=True)
class _Rule:
    message_type: re.Pattern[str] | None
    sending_application: re.Pattern[str] | None
    sending_facility: re.Pattern[str] | None
    receiving_application: re.Pattern[str] | None
    receiving_facility: re.Pattern[str] | None
    backend: str

    @classmethod
    def compile(cls, rule: Hl7Rule) -> _Rule:
        m = rule.if_
        return cls(
            _matcher(m.message_type),
            _matcher(m.sending_application),
            _matcher(m.sending_facility),
            _matcher(m.receiving_application),
            _matcher(m.receiving_facility),
            rule.use_backend,
        )

    def matches(self, header: Hl7Header) -> bool:
        if not _type_matches(self.message_type, header.message_type, header.component_separator):
            return False
        for matcher, value in (
            (self.sending_application, header.sending_application),
            (self.sending_facility, header.sending_facility),
            (self.receiving_application, header.receiving_application),
            (self.receiving_facility, header.receiving_facility),
        ):
            if matcher is not None and matcher.match(value) is None:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Hl7Router:
    """A frontend's compiled ``hl7.rules``."""

    rules: tuple[_Rule, ...] = ()

    @classmethod
    def compile(cls, frontend: FrontendConfig) -> Hl7Router:
        settings = frontend.hl7 or Hl7FrontendSettings()
        return cls(tuple(_Rule.compile(rule) for rule in settings.rules))

    def route(self, header: Hl7Header) -> str | None:
        """The backend for a message, or None for the frontend's default backend."""
        for rule in self.rules:
            if rule.matches(header):
                return rule.backend
        return None


class KeyOrder(Generic[T]):
    """One message in flight per key; the others wait in arrival order.

    ``None`` is "no key": such messages never wait for each other.
    """

    __slots__ = ("_queues",)

    def __init__(self) -> None:
        self._queues: dict[Hashable, deque[T]] = {}

    def admit(self, key: Hashable | None, item: T) -> bool:
        """Register ``item``; True when it may go now (its key has nothing in flight)."""
        if key is None:
            return True
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = deque([item])
            return True
        queue.append(item)
        return False

    def done(self, key: Hashable | None, item: T) -> T | None:
        """``item`` (the one in flight for ``key``) is finished; return the next one to send, if any."""
        if key is None:
            return None
        queue = self._queues.get(key)
        if not queue or queue[0] is not item:
            return None
        queue.popleft()
        if not queue:
            del self._queues[key]
            return None
        return queue[0]

    def forget(self, key: Hashable | None, item: T) -> T | None:
        """Drop ``item`` wherever it waits (its sender left); return the next to send if it was in flight."""
        if key is None:
            return None
        queue = self._queues.get(key)
        if not queue:
            return None
        if queue[0] is item:
            return self.done(key, item)
        # By identity, as everywhere here: deque.remove() compares with ==, and a waiting message equal
        # to the one in flight (a resend with the same content) would remove the one in flight.
        for index, waiting in enumerate(queue):
            if index and waiting is item:
                del queue[index]
                break
        return None

    def waiting(self) -> int:
        """Messages queued behind another of their key."""
        return sum(len(q) - 1 for q in self._queues.values())

    def __len__(self) -> int:
        return len(self._queues)


class DedupTable:
    """Acknowledged messages by (MSH-3, MSH-4, MSH-10) for ``window`` seconds, at most ``size`` of them."""

    __slots__ = ("_entries", "size", "window")

    def __init__(self, window: float, size: int) -> None:
        self.window = window
        self.size = size
        self._entries: OrderedDict[tuple[bytes, bytes, bytes], tuple[float, bytes]] = OrderedDict()

    def get(self, key: tuple[bytes, bytes, bytes], now: float) -> bytes | None:
        """The ACK returned for ``key`` if it was acknowledged within the window."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        at, ack = entry
        if now - at > self.window:
            del self._entries[key]
            return None
        return ack

    def remember(self, key: tuple[bytes, bytes, bytes], ack: bytes, now: float) -> None:
        if self.size <= 0 or self.window <= 0:
            return
        entries = self._entries
        entries[key] = (now, ack)
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)
        # Expire from the old end: entries are in insertion (= time) order.
        while entries:
            oldest = next(iter(entries.values()))
            if now - oldest[0] <= self.window:
                break
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
