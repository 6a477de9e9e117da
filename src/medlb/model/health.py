"""The rise/fall health counter of one server: a pure state machine.

Theory of operation (after HAProxy's ``check-t.h`` health counter, with the
"consecutive" semantics its documentation promises):

- A server starts DOWN and *initial*: its first successful check brings it UP
  at once, so a cold start does not wait ``rise x inter`` before serving, yet
  no traffic reaches a server nobody has checked (HAProxy issue #3298).
- While UP, ``fall`` consecutive failures mark it DOWN; any success resets the
  failure run.
- While DOWN, ``rise`` consecutive successes mark it UP; any failure resets the
  success run.
- A server is *transitional* while a run has started but not completed; the
  scheduler then checks at ``fastinter`` to confirm quickly.

Time never comes from a clock here; the caller passes ``now``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OpState(enum.Enum):
    """Operational state, driven by checks, passive observation and agents."""

    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of op state, with the cause an operator will read in the log."""

    old: OpState
    new: OpState
    cause: str
    at: float


class HealthCounter:
    """Consecutive success/failure bookkeeping for one server."""

    __slots__ = ("failures", "fall", "initial", "rise", "state", "successes")

    def __init__(self, rise: int, fall: int, state: OpState = OpState.DOWN, initial: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        self.rise = rise
        self.fall = fall
        self.state = state
        self.initial = initial
        self.successes = 0
        self.failures = 0

    @property
    def transitional(self) -> bool:
        """True while a run towards the other state is in progress."""
        if self.state is OpState.UP:
            return self.failures > 0
        return self.successes > 0

    def record(self, ok: bool, now: float, cause: str) -> Transition | None:
        """Feed one check result; return the transition it caused, if any."""
        if ok:
            self.failures = 0
            if self.state is OpState.UP:
                return None
            self.successes += 1
            if self.initial or self.successes >= self.rise:
                return self._move(OpState.UP, now, cause)
            return None
        self.successes = 0
        if self.state is OpState.DOWN:
            self.initial = False  # a failed first check: from now on, rise applies
            return None
        self.failures += 1
        if self.failures >= self.fall:
            return self._move(OpState.DOWN, now, cause)
        return None

    def force(self, state: OpState, now: float, cause: str) -> Transition | None:
        """Set the state directly (agent ``up``/``down``, operator); resets both runs."""
        self.successes = self.failures = 0
        self.initial = False
        if state is self.state:
            return None
        return self._move(state, now, cause)

    def _move(self, new: OpState, now: float, cause: str) -> Transition:
        old, self.state = self.state, new
        self.successes = self.failures = 0
        self.initial = False
        return Transition(old, new, cause, now)


def next_interval(counter: HealthCounter, inter: float, fastinter: float, downinter: float) -> float:
    """Which interval applies now: ``fastinter`` while transitional, ``downinter``
    while steadily DOWN, ``inter`` while steadily UP (HAProxy's rule)."""
    if counter.transitional:
        return fastinter
    if counter.state is OpState.DOWN:
        return downinter
    return inter
