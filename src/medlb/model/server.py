"""A server at runtime: its two state axes, its weights and its counters.

State lives on two independent axes, as in HAProxy's ``server-t.h``
(``srv_state`` and ``srv_admin``):

- the **op state** (UP / DOWN) is what checks, passive observation and agents
  believe about the server's health;
- the **admin state** (READY / DRAIN / MAINT) is what people (or an agent on
  the server's behalf) want: DRAIN takes no new sessions but lets existing ones
  finish and keeps checking; MAINT takes nothing and stops checks.

Counters are plain integer attributes bumped on the data path and exported on
scrape: no locks, no callbacks, nothing that costs per byte.

Pure module: time is always passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from medlb.config import HostPort
from medlb.model.health import HealthCounter, OpState, Transition


class AdminState(enum.Enum):
    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one health check, kept for status output and logs."""

    ok: bool
    text: str
    at: float
    duration: float


#: Called on every state change of a server: (server, what changed, cause).
StateListener = Callable[["Server", str, str], None]


class SharedCount(Protocol):
    """A server's current sessions in every process of the node (``global.workers``).

    Each process adds its own changes; ``total`` is what ``maxconn`` is held against, so
    the limit is the node's, not each process's.
    """

    def add(self, n: int) -> None: ...

    def total(self) -> int: ...


class Server:
    """One real server of one backend."""

    __slots__ = (
        "address",
        "admin_source",
        "admin_state",
        "ae_title",
        "agent_pct",
        "backend_name",
        "backup",
        "bytes_in",
        "bytes_out",
        "connect_errors",
        "consecutive_errors",
        "cur_sessions",
        "dimse_requests",
        "dimse_responses",
        "ever_up",
        "health",
        "hl7_acks",
        "hl7_messages",
        "last_agent",
        "last_change",
        "last_check",
        "listeners",
        "maxconn",
        "name",
        "peer_sessions",
        "redispatches",
        "retries",
        "shared",
        "slowstart",
        "sockaddr",
        "state_changes",
        "total_sessions",
        "up_since",
        "weight",
    )

    def __init__(
        self,
        name: str,
        address: HostPort,
        *,
        backend_name: str = "",
        weight: int = 1,
        maxconn: int = 0,
        backup: bool = False,
        slowstart: float = 0.0,
        rise: int = 2,
        fall: int = 3,
        admin_state: AdminState = AdminState.READY,
        op_state: OpState = OpState.DOWN,
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.backend_name = backend_name
        self.address = address
        #: ``mode: dicom``: the server's own AE title (associations are readdressed to it), or None.
        self.ae_title: str | None = None
        #: Resolved socket address (family, sockaddr); None until resolution succeeds.
        self.sockaddr: tuple[int, tuple[str, int] | tuple[str, int, int, int]] | None = None
        self.weight = weight
        self.maxconn = maxconn
        self.backup = backup
        self.slowstart = slowstart
        self.health = HealthCounter(rise, fall, op_state, initial=op_state is OpState.DOWN)
        self.admin_state = admin_state
        self.admin_source = "config"
        self.agent_pct = 100
        self.last_check: CheckResult | None = None
        self.last_agent: str = ""
        self.last_change = now
        # Slow start only ramps a *recovered* server; like HAProxy, a server that is
        # UP from the first check of a fresh start gets its full weight at once.
        self.up_since: float | None = None
        self.ever_up = op_state is OpState.UP
        self.listeners: list[StateListener] = []
        # counters
        self.cur_sessions = 0
        #: ``global.workers``: sessions the worker processes last reported (the main process's
        #: view); ``cur_sessions`` stays this process's own, which maxconn and leastconn use.
        self.peer_sessions = 0
        #: ``global.workers``: the node-wide session count this server's maxconn is held against.
        self.shared: SharedCount | None = None
        self.total_sessions = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connect_errors = 0
        self.consecutive_errors = 0
        self.retries = 0
        self.redispatches = 0
        self.state_changes = 0
        #: ``mode: dicom``: DIMSE requests by command name ("C-STORE-RQ") and final responses by
        #: status category ("success", "warning", "failure", "cancel"), counted as they pass.
        self.dimse_requests: dict[str, int] = {}
        self.dimse_responses: dict[str, int] = {}
        #: ``mode: hl7``: messages the server answered, by MSH-9 type, and its answers by MSA-1 code.
        self.hl7_messages: dict[str, int] = {}
        self.hl7_acks: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Server {self.backend_name}/{self.name} {self.address} {self.op_state.name}/{self.admin_state.name}>"

    @property
    def key(self) -> str:
        """``backend/server``: how operators name a server in logs and commands."""
        return f"{self.backend_name}/{self.name}"

    @property
    def all_sessions(self) -> int:
        """Sessions on this server in every process: what status, metrics and drain waits report."""
        return self.cur_sessions + self.peer_sessions

    @property
    def op_state(self) -> OpState:
        return self.health.state

    @property
    def is_up(self) -> bool:
        return self.health.state is OpState.UP

    @property
    def usable(self) -> bool:
        """May take *new* sessions (ignoring maxconn)."""
        return self.health.state is OpState.UP and self.admin_state is AdminState.READY and self.weight > 0

    @property
    def node_sessions(self) -> int:
        """Sessions on this server in every process, now: what maxconn and leastconn weigh.

        With one process, ``cur_sessions``. With ``global.workers``, the shared board's live
        count (``all_sessions`` instead adds the workers' last reports, up to 0.5 s old).
        """
        shared = self.shared
        return self.cur_sessions if shared is None else shared.total()

    @property
    def full(self) -> bool:
        return self.maxconn > 0 and self.node_sessions >= self.maxconn

    def share(self, count: SharedCount) -> None:
        """Count this server's sessions in ``count`` from now on, including the ones it has."""
        old = self.shared
        if old is count:
            return
        if old is not None:
            old.add(-self.cur_sessions)
        count.add(self.cur_sessions)
        self.shared = count

    @property
    def checks_enabled(self) -> bool:
        """MAINT stops checks (HAProxy semantics); DRAIN keeps them running."""
        return self.admin_state is not AdminState.MAINT

    def effective_weight(self, now: float) -> float:
        """Configured weight scaled by the agent's percentage and the slow-start ramp.

        The ramp is linear from 1/slowstart of the weight to the full weight over
        ``slowstart`` seconds after recovery, never below a small positive floor so
        a recovering server still gets a trickle to prove itself.
        """
        weight = self.weight * self.agent_pct / 100.0
        if self.slowstart > 0 and self.up_since is not None:
            elapsed = now - self.up_since
            if elapsed < self.slowstart:
                weight *= max(elapsed / self.slowstart, 0.01)
        return weight

    # -- state changes --------------------------------------------------------------

    def _notify(self, what: str, cause: str) -> None:
        for listener in self.listeners:
            listener(self, what, cause)

    def apply_transition(self, transition: Transition | None) -> None:
        if transition is None:
            return
        self.state_changes += 1
        self.last_change = transition.at
        if transition.new is OpState.UP:
            # Only a *recovery* ramps up (slowstart); the first UP after start does not.
            self.up_since = transition.at if self.ever_up else None
            self.ever_up = True
        self.consecutive_errors = 0
        self._notify(f"op_state {transition.old.name} -> {transition.new.name}", transition.cause)

    def record_check(self, result: CheckResult) -> Transition | None:
        self.last_check = result
        transition = self.health.record(result.ok, result.at, result.text)
        self.apply_transition(transition)
        return transition

    def force_op_state(self, state: OpState, now: float, cause: str) -> Transition | None:
        transition = self.health.force(state, now, cause)
        self.apply_transition(transition)
        return transition

    def set_admin_state(self, state: AdminState, now: float, source: str, cause: str = "") -> bool:
        """Change the admin state; ``source`` is who asked (``operator``, ``agent``, ...)."""
        if state is self.admin_state:
            self.admin_source = source
            return False
        old = self.admin_state
        self.admin_state = state
        self.admin_source = source
        self.last_change = now
        self.state_changes += 1
        self._notify(f"admin_state {old.name} -> {state.name}", f"{source}: {cause}" if cause else source)
        return True

    def set_weight(self, weight: int, source: str) -> None:
        if weight != self.weight:
            old, self.weight = self.weight, weight
            self._notify(f"weight {old} -> {weight}", source)

    def set_agent_pct(self, pct: int) -> None:
        if pct != self.agent_pct:
            old, self.agent_pct = self.agent_pct, pct
            self._notify(f"agent weight {old}% -> {pct}%", "agent")
