"""``GET /metrics``: the running balancer in the Prometheus text format.

Why it looks like this:

- **Nothing on the data path.** The relay and the sessions bump plain integer
  attributes on the model objects (see :mod:`medlb.model.server`); no
  ``prometheus_client`` counter, lock or callback is ever touched per byte or
  per connection. The collectors here read those attributes only when a
  scraper asks, so an idle Prometheus costs the balancer nothing and a busy
  one costs one pass over servers and sessions per scrape.
- **Names after HAProxy's exporter** (``haproxy_server_up`` becomes
  ``medlb_server_up``), so existing dashboards and alert rules translate by a
  prefix change. Enum states are exported one-hot (``state="drain"`` is 1, the
  other states 0), as HAProxy's exporter does, because that is what PromQL
  filters and sums easily.
- **A private registry**, built once per exporter: the process-wide default
  registry is shared global state that tests, reloads and embedding would all
  trip over, and registering the same names twice there raises.
- **Counters never go backwards.** A backend's byte counters are the sum of
  its servers; when a server leaves (removed through the API, or retired and
  pruned after a reload) the exporter keeps what it last saw of that server,
  so the backend total does not drop and Prometheus does not mistake the
  removal for a counter reset (a reset makes ``rate()`` count the whole total
  again).

Retired objects: servers and frontends that a reload or the API removed but
that still carry sessions are exported too, with an extra ``retired="true"``
label. Operators can watch them drain, and the label keeps their series apart
from a new server or frontend of the same name. If two retired objects share
a name (two reloads in a row, both still draining), only the first is
exported: duplicate series would make Prometheus drop samples.

Call :meth:`MetricsExporter.render` on the event loop thread: it reads
objects the loop mutates, and is cheap enough (microseconds per server,
one dictionary update per live session) not to need a thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

import medlb
from medlb.io.runtime import Runtime
from medlb.model.backend import Backend
from medlb.model.health import OpState
from medlb.model.server import AdminState, Server

__all__ = [
    "FAMILIES",
    "AlertCollector",
    "MetricsExporter",
    "RuntimeCollector",
    "render_metrics",
]

RuntimeGetter = Callable[[], Runtime]
AlertStatsGetter = Callable[[], Mapping[str, object]]

#: Every family the runtime collector exports: (type, exposed name, help).
#: The exposed name is what appears in the exposition (counters end in
#: ``_total``); docs/metrics.md lists the same names and a test keeps them in step.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    # -- process ---------------------------------------------------------------------
    ("gauge", "medlb_build_info", "medlb version (always 1; the version is the label)."),
    ("gauge", "medlb_start_time_seconds", "Unix time medlb started."),
    ("counter", "medlb_reloads_total", "Configuration reloads applied since start."),
    # -- frontends -------------------------------------------------------------------
    ("gauge", "medlb_frontend_current_sessions", "Client sessions open on the frontend."),
    ("counter", "medlb_frontend_sessions_total", "Client sessions accepted by the frontend."),
    ("gauge", "medlb_frontend_max_sessions", "The frontend's maxconn: beyond it, medlb stops accepting."),
    ("gauge", "medlb_frontend_listeners", "Open listening sockets of the frontend."),
    # -- backends --------------------------------------------------------------------
    ("gauge", "medlb_backend_up", "1 if the backend has a usable server (primary or backup), else 0."),
    ("gauge", "medlb_backend_active_servers", "Usable primary servers (op UP, admin READY, weight > 0)."),
    ("gauge", "medlb_backend_backup_servers", "Usable backup servers."),
    ("gauge", "medlb_backend_current_sessions", "Sessions open on the backend, queued ones included."),
    ("counter", "medlb_backend_sessions_total", "Sessions the backend has received."),
    ("gauge", "medlb_backend_current_queue", "Sessions waiting in the backend queue for a server slot."),
    ("gauge", "medlb_backend_max_queue", "The backend's maxqueue (0: unbounded)."),
    ("counter", "medlb_backend_no_server_total", "Sessions refused because no server was usable."),
    ("counter", "medlb_backend_queue_full_total", "Sessions refused because the queue was at maxqueue."),
    ("counter", "medlb_backend_queue_timeouts_total", "Sessions that gave up after timeouts.queue in the queue."),
    ("counter", "medlb_backend_connection_errors_total", "Failed connection attempts to the backend's servers."),
    ("counter", "medlb_backend_bytes_in_total", "Bytes from clients to the backend's servers, live sessions too."),
    ("counter", "medlb_backend_bytes_out_total", "Bytes from the backend's servers to clients, live sessions too."),
    # -- servers ---------------------------------------------------------------------
    ("gauge", "medlb_server_up", "1 if the server's op state is UP, else 0."),
    ("gauge", "medlb_server_status", "Combined status, one-hot: maint/drain (admin) take precedence over up/down."),
    ("gauge", "medlb_server_admin_state", "Admin state, one-hot over ready/drain/maint."),
    ("gauge", "medlb_server_backup", "1 for a backup server, else 0."),
    ("gauge", "medlb_server_weight", "Configured weight (as last set by config, API or agent)."),
    ("gauge", "medlb_server_effective_weight", "Weight in use now: agent percentage and slow-start ramp applied."),
    ("gauge", "medlb_server_current_sessions", "Sessions holding a slot on the server."),
    ("gauge", "medlb_server_max_sessions", "The server's maxconn (0: unlimited)."),
    ("counter", "medlb_server_sessions_total", "Sessions given a slot on the server (redispatched: on each)."),
    ("counter", "medlb_server_bytes_in_total", "Bytes from clients to the server, live sessions included."),
    ("counter", "medlb_server_bytes_out_total", "Bytes from the server to clients, live sessions included."),
    ("counter", "medlb_server_connection_errors_total", "Failed connection attempts to the server."),
    ("counter", "medlb_server_retries_total", "Connection attempts retried after failing on the server."),
    ("counter", "medlb_server_redispatch_total", "Sessions redispatched to the server after failing on another."),
    ("counter", "medlb_server_state_changes_total", "Op and admin state changes of the server."),
    ("counter", "medlb_server_dimse_requests_total", "mode dicom: DIMSE requests relayed to the server, by command."),
    ("counter", "medlb_server_dimse_responses_total", "mode dicom: final DIMSE responses from the server, by status."),
    ("counter", "medlb_server_hl7_messages_total", "mode hl7: messages the server answered, by message type (MSH-9)."),
    ("counter", "medlb_server_hl7_acks_total", "mode hl7: the server's acknowledgments, by code (MSA-1)."),
    ("gauge", "medlb_server_last_state_change_seconds", "Unix time of the server's last op or admin state change."),
    ("gauge", "medlb_server_check_duration_seconds", "Duration of the last health check (absent before the first)."),
    ("gauge", "medlb_server_last_check_ok", "1 if the last health check passed, 0 if not (absent before the first)."),
)

#: The alert families, exported only when an alert stats getter is given.
ALERT_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("counter", "medlb_alerts_sent_total", "Alerts delivered, by channel."),
    ("counter", "medlb_alerts_failed_total", "Alert deliveries that failed, by channel."),
    ("counter", "medlb_alerts_suppressed_total", "Alerts held back by the rate limit or deduplication."),
    ("counter", "medlb_alerts_dropped_total", "Alerts dropped because the alert queue was full."),
)

_ADMIN_STATES = tuple(state.value for state in AdminState)
_STATUSES = ("up", "down", "drain", "maint")
_RETIRED = {"retired": "true"}

Labels = dict[str, str]


def _families(spec: Iterable[tuple[str, str, str]]) -> dict[str, Metric]:
    """Empty families keyed by exposed name; ``describe`` and ``collect`` share them."""
    out: dict[str, Metric] = {}
    for kind, name, doc in spec:
        out[name] = CounterMetricFamily(name, doc) if kind == "counter" else GaugeMetricFamily(name, doc)
    return out


def _put(family: Metric, labels: Labels, value: float) -> None:
    """Add one sample with an arbitrary label set.

    ``add_metric`` fixes the label names per family; retired objects carry one
    label more, so samples are appended directly. A counter family's name has
    no ``_total`` (prometheus_client strips it), its samples do.
    """
    name = family.name + "_total" if family.type == "counter" else family.name
    family.samples.append(Sample(name, labels, float(value)))


def _one_hot(family: Metric, labels: Labels, states: Iterable[str], current: str) -> None:
    for state in states:
        _put(family, {**labels, "state": state}, 1.0 if state == current else 0.0)


def _status(server: Server) -> str:
    if server.admin_state is AdminState.MAINT:
        return "maint"
    if server.admin_state is AdminState.DRAIN:
        return "drain"
    return "up" if server.op_state is OpState.UP else "down"


class RuntimeCollector(Collector):
    """Reads the runtime on each scrape and yields fresh metric families.

    ``runtime_getter`` rather than a runtime: the supervisor may swap objects
    on reload, and the collector must always read the current ones.

    The collector remembers, between scrapes, the byte counters of every
    server it saw, so that a server leaving its backend does not lower the
    backend's byte counters (see the module docstring). That memory holds the
    servers of one scrape only.
    """

    def __init__(self, runtime_getter: RuntimeGetter) -> None:
        self._runtime_getter = runtime_getter
        #: Server -> (backend name, bytes in, bytes out) at the last scrape.
        self._last_seen: dict[Server, tuple[str, int, int]] = {}
        #: Backend name -> [bytes in, bytes out] of servers that have left it.
        self._departed: dict[str, list[int]] = {}

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets the registry reject a clashing extra collector."""
        return iter(_families(FAMILIES).values())

    def collect(self) -> Iterator[Metric]:
        runtime = self._runtime_getter()
        runtime.prune()  # drained servers and frontends leave the exposition
        fam = _families(FAMILIES)
        live = runtime.live_bytes()
        self._account_departures(live)
        # Per backend name, not per membership: a retired server still draining
        # counts for its backend; departed servers keep their last-seen bytes.
        backend_bytes = {name: list(totals) for name, totals in self._departed.items()}
        for server, (b_in, b_out) in live.items():
            totals = backend_bytes.setdefault(server.backend_name, [0, 0])
            totals[0] += b_in
            totals[1] += b_out
        self._collect_process(runtime, fam)
        self._collect_frontends(runtime, fam)
        for backend in runtime.backends.values():
            self._collect_backend(backend, backend_bytes.get(backend.name, [0, 0]), fam)
        self._collect_servers(runtime, live, fam)
        return iter(fam.values())

    # -- parts ------------------------------------------------------------------------

    def _account_departures(self, live: Mapping[Server, tuple[int, int]]) -> None:
        seen: dict[Server, tuple[str, int, int]] = {}
        for server, (b_in, b_out) in live.items():
            seen[server] = (server.backend_name, b_in, b_out)
        for server, (backend_name, b_in, b_out) in self._last_seen.items():
            if server not in seen:
                departed = self._departed.setdefault(backend_name, [0, 0])
                departed[0] += b_in
                departed[1] += b_out
        self._last_seen = seen

    @staticmethod
    def _collect_process(runtime: Runtime, fam: dict[str, Metric]) -> None:
        _put(fam["medlb_build_info"], {"version": medlb.__version__}, 1)
        _put(fam["medlb_start_time_seconds"], {}, runtime.started_at)
        _put(fam["medlb_reloads_total"], {}, runtime.reloads)

    @staticmethod
    def _collect_frontends(runtime: Runtime, fam: dict[str, Metric]) -> None:
        seen: set[str] = set()
        current = [(f, False) for f in runtime.frontends.values()]
        retired = [(f, True) for f in runtime.retired_frontends]
        for frontend, is_retired in current + retired:
            if is_retired:
                if frontend.name in seen:
                    continue
                seen.add(frontend.name)
            labels: Labels = {"frontend": frontend.name}
            if is_retired:
                labels.update(_RETIRED)
            _put(fam["medlb_frontend_current_sessions"], labels, frontend.cur_sessions)
            _put(fam["medlb_frontend_sessions_total"], labels, frontend.total_sessions)
            _put(fam["medlb_frontend_max_sessions"], labels, frontend.maxconn)
            # A closed listener stays in the list (retired frontends): count the open ones.
            _put(
                fam["medlb_frontend_listeners"],
                labels,
                sum(1 for listener in frontend.listeners if listener.sock.fileno() >= 0),
            )

    @staticmethod
    def _collect_backend(backend: Backend, byte_totals: list[int], fam: dict[str, Metric]) -> None:
        labels: Labels = {"backend": backend.name}
        active = sum(1 for s in backend.servers if not s.backup and s.usable)
        backup = sum(1 for s in backend.servers if s.backup and s.usable)
        _put(fam["medlb_backend_up"], labels, 1 if backend.usable() else 0)
        _put(fam["medlb_backend_active_servers"], labels, active)
        _put(fam["medlb_backend_backup_servers"], labels, backup)
        _put(fam["medlb_backend_current_sessions"], labels, backend.all_sessions)
        _put(fam["medlb_backend_sessions_total"], labels, backend.total_sessions)
        _put(fam["medlb_backend_current_queue"], labels, len(backend.queue))
        _put(fam["medlb_backend_max_queue"], labels, backend.policy.maxqueue)
        _put(fam["medlb_backend_no_server_total"], labels, backend.no_server)
        _put(fam["medlb_backend_queue_full_total"], labels, backend.queue_full)
        _put(fam["medlb_backend_queue_timeouts_total"], labels, backend.queue_timeouts)
        _put(fam["medlb_backend_connection_errors_total"], labels, backend.connect_errors)
        _put(fam["medlb_backend_bytes_in_total"], labels, byte_totals[0])
        _put(fam["medlb_backend_bytes_out_total"], labels, byte_totals[1])

    @staticmethod
    def _collect_servers(runtime: Runtime, live: Mapping[Server, tuple[int, int]], fam: dict[str, Metric]) -> None:
        # Slow start ramps on the loop clock (Server.up_since is loop time), so
        # "now" must come from a backend's clock, never from time.time().
        clocks = {name: backend.clock for name, backend in runtime.backends.items()}
        any_clock = next(iter(clocks.values()), None)
        current = [(s, False) for b in runtime.backends.values() for s in b.servers]
        retired_seen: set[tuple[str, str]] = set()
        retired: list[tuple[Server, bool]] = []
        for server in runtime.retired_servers:
            key = (server.backend_name, server.name)
            if key not in retired_seen:
                retired_seen.add(key)
                retired.append((server, True))
        for server, is_retired in current + retired:
            labels: Labels = {"backend": server.backend_name, "server": server.name}
            if is_retired:
                labels.update(_RETIRED)
            clock = clocks.get(server.backend_name, any_clock)
            b_in, b_out = live.get(server, (server.bytes_in, server.bytes_out))
            _put(fam["medlb_server_up"], labels, 1 if server.op_state is OpState.UP else 0)
            _one_hot(fam["medlb_server_status"], labels, _STATUSES, _status(server))
            _one_hot(fam["medlb_server_admin_state"], labels, _ADMIN_STATES, server.admin_state.value)
            _put(fam["medlb_server_backup"], labels, 1 if server.backup else 0)
            _put(fam["medlb_server_weight"], labels, server.weight)
            if clock is not None:
                _put(fam["medlb_server_effective_weight"], labels, server.effective_weight(clock()))
            _put(fam["medlb_server_current_sessions"], labels, server.all_sessions)
            _put(fam["medlb_server_max_sessions"], labels, server.maxconn)
            _put(fam["medlb_server_sessions_total"], labels, server.total_sessions)
            _put(fam["medlb_server_bytes_in_total"], labels, b_in)
            _put(fam["medlb_server_bytes_out_total"], labels, b_out)
            _put(fam["medlb_server_connection_errors_total"], labels, server.connect_errors)
            _put(fam["medlb_server_retries_total"], labels, server.retries)
            _put(fam["medlb_server_redispatch_total"], labels, server.redispatches)
            _put(fam["medlb_server_state_changes_total"], labels, server.state_changes)
            for command, count in list(server.dimse_requests.items()):
                _put(fam["medlb_server_dimse_requests_total"], {**labels, "command": command}, count)
            for status, count in list(server.dimse_responses.items()):
                _put(fam["medlb_server_dimse_responses_total"], {**labels, "status": status}, count)
            for kind, count in list(server.hl7_messages.items()):
                _put(fam["medlb_server_hl7_messages_total"], {**labels, "type": kind}, count)
            for code, count in list(server.hl7_acks.items()):
                _put(fam["medlb_server_hl7_acks_total"], {**labels, "code": code}, count)
            _put(fam["medlb_server_last_state_change_seconds"], labels, runtime.wall(server.last_change))
            check = server.last_check
            if check is not None:
                _put(fam["medlb_server_check_duration_seconds"], labels, check.duration)
                _put(fam["medlb_server_last_check_ok"], labels, 1 if check.ok else 0)


def _count(value: object) -> float:
    """A counter value from loosely typed stats; garbage reads as NaN, not as a crash."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


class AlertCollector(Collector):
    """Exports the alert dispatcher's delivery counters.

    The dispatcher lives in another module and owns its own counters; a getter
    returning ``{"sent": {channel: n}, "failed": {channel: n}, "suppressed": n,
    "dropped": n}`` keeps this module from importing it. Missing keys export
    as zero (or no channel series), so the two can evolve separately.
    """

    def __init__(self, stats_getter: AlertStatsGetter) -> None:
        self._stats_getter = stats_getter

    def describe(self) -> Iterator[Metric]:
        return iter(_families(ALERT_FAMILIES).values())

    def collect(self) -> Iterator[Metric]:
        stats = self._stats_getter()
        fam = _families(ALERT_FAMILIES)
        for key, name in (("sent", "medlb_alerts_sent_total"), ("failed", "medlb_alerts_failed_total")):
            by_channel = stats.get(key)
            if isinstance(by_channel, Mapping):
                for channel, value in sorted(by_channel.items(), key=lambda item: str(item[0])):
                    _put(fam[name], {"channel": str(channel)}, _count(value))
        _put(fam["medlb_alerts_suppressed_total"], {}, _count(stats.get("suppressed", 0)))
        _put(fam["medlb_alerts_dropped_total"], {}, _count(stats.get("dropped", 0)))
        return iter(fam.values())


class MetricsExporter:
    """One private registry, built once, rendered on every scrape.

    ``process_metrics`` adds prometheus_client's standard ``process_*``
    (CPU, memory, open fds, start time; Linux only), ``python_info`` and
    ``python_gc_*`` families: each costs a few reads of ``/proc`` or the
    ``gc`` module per scrape and answers the first question of an incident
    (is medlb out of fds or memory?).
    """

    def __init__(
        self,
        runtime_getter: RuntimeGetter,
        alert_stats_getter: AlertStatsGetter | None = None,
        *,
        extra: Iterable[Collector] = (),
        process_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(RuntimeCollector(runtime_getter))
        if alert_stats_getter is not None:
            self.registry.register(AlertCollector(alert_stats_getter))
        for collector in extra:
            self.registry.register(collector)
        if process_metrics:
            _attach_process(self.registry)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Return ``(body, content_type)``.

        ``accept`` is the scraper's ``Accept`` header: Prometheus asks for
        OpenMetrics when it can, and prometheus_client picks the format; without
        it the answer is the classic text format (version 0.0.4), which every
        scraper reads.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def _attach_process(registry: CollectorRegistry) -> None:
    """Register fresh process/platform/GC collectors into ``registry``.

    New instances, not the library's module-level ``PROCESS_COLLECTOR`` and
    friends: those are registered in the global registry already.
    """
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


def render_metrics(runtime: Runtime, extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """Return ``(body, content_type)`` of the Prometheus text exposition of ``runtime``.

    A one-shot convenience (tests, ``medlb ctl``): it builds a new exporter per
    call, so it has no memory of departed servers. A long-running ``/metrics``
    endpoint should keep one :class:`MetricsExporter`.
    """
    return MetricsExporter(lambda: runtime, extra=extra).render()
