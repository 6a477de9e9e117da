"""The pure decisions of ``mode: hl7``: MSH routing rules, per-key ordering and duplicate suppression.

Headers are read from real ER7 text by :func:`medlb.proto.hl7.parse_header` and routers are compiled
from a parsed configuration, so the tests see exactly what the I/O ring hands these objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from medlb.config import parse_config
from medlb.layers.hl7 import DedupTable, Hl7Router, KeyOrder
from medlb.proto.hl7 import Hl7Header, parse_header

# --------------------------------------------------------------------------- Hl7Router


def router(*rules: dict[str, Any]) -> Hl7Router:
    raw = {
        "frontends": [
            {
                "name": "his",
                "mode": "hl7",
                "bind": ["127.0.0.1:0"],
                "default_backend": "default",
                "hl7": {"rules": list(rules)},
            }
        ],
        "backends": [
            {"name": n, "servers": [{"name": "s", "address": "10.0.0.1:2575"}]} for n in ("default", "a", "b", "c")
        ],
    }
    return Hl7Router.compile(parse_config(raw).frontends[0])


def header(
    message_type: str = "ADT^A01^ADT_A01",
    *,
    sending_application: str = "HIS",
    sending_facility: str = "HOSP",
    receiving_application: str = "RIS",
    receiving_facility: str = "RAD",
    encoding: str = "^~\\&",
) -> Hl7Header:
    fields = [
        "MSH",
        encoding,
        sending_application,
        sending_facility,
        receiving_application,
        receiving_facility,
        "20240301120000",
        "",
        message_type,
        "MSG00001",
        "P",
        "2.5",
    ]
    return parse_header(("|".join(fields) + "\rPID|1||123^^^HOSP\r").encode("latin-1"))


def when(backend: str = "a", **conditions: list[str]) -> dict[str, Any]:
    return {"if": conditions, "use_backend": backend}


def test_no_rules_means_the_default_backend() -> None:
    assert router().route(header()) is None


def test_a_rule_without_conditions_matches_everything() -> None:
    r = router(when("a"))
    assert r.route(header()) == "a"
    assert r.route(header("ORU^R01", sending_application="", receiving_facility="")) == "a"


@pytest.mark.parametrize(
    ("pattern", "message_type", "matches"),
    [
        # MSH-9 as sent ...
        ("ADT^A01^ADT_A01", "ADT^A01^ADT_A01", True),
        ("ADT^A01", "ADT^A01", True),
        # ... or without its third component (the message structure, absent before v2.3.1)
        ("ADT^A01", "ADT^A01^ADT_A01", True),
        ("ADT^A0?", "ADT^A08^ADT_A01", True),
        ("ADT^A0*", "ADT^A01^ADT_A01", True),
        ("ADT^A0*", "ADT^A01", True),
        ("*^A01", "ADT^A01^ADT_A01", True),
        ("ADT^*", "ADT^A40^ADT_A39", True),
        # a third component in the pattern must be there and match
        ("ADT^A01^ADT_A01", "ADT^A01", False),
        ("ADT^A01^ADT_A02", "ADT^A01^ADT_A01", False),
        ("*^*^ADT_A01", "ADT^A08", False),
        # whole-value matches: no prefix, no suffix, no substring
        ("ADT", "ADT^A01", False),
        ("ADT^A0", "ADT^A01^ADT_A01", False),
        ("DT^A01", "ADT^A01", False),
        ("ADT^A01", "ADT^A011", False),
        ("ADT^A01", "ADT^A02^ADT_A01", False),
        ("ADT^A0?", "ADT^A10", False),
        # case-sensitive, and regex syntax in a pattern is literal
        ("adt^a01", "ADT^A01", False),
        ("ADT.A01", "ADTXA01", False),
        ("ADT^A01+", "ADT^A011", False),
        ("ORU^R0[1]", "ORU^R01", True),
    ],
)
def test_message_type_patterns(pattern: str, message_type: str, matches: bool) -> None:
    r = router(when("a", message_type=[pattern]))
    assert r.route(header(message_type)) == ("a" if matches else None)


def test_the_short_message_type_uses_the_messages_own_component_separator() -> None:
    # MSH-2 "#~\&": the component separator is '#', and the third component is dropped on '#'.
    msg = header("ADT#A01#ADT_A01", encoding="#~\\&")
    assert router(when("a", message_type=["ADT#A01"])).route(msg) == "a"
    assert router(when("a", message_type=["ADT#A01#ADT_A01"])).route(msg) == "a"
    assert router(when("a", message_type=["ADT^A01"])).route(msg) is None


def test_any_pattern_of_a_list_may_match() -> None:
    r = router(when("a", message_type=["ORU^R01", "ADT^A0?"]))
    assert r.route(header("ORU^R01^ORU_R01")) == "a"
    assert r.route(header("ADT^A04^ADT_A01")) == "a"
    assert r.route(header("SIU^S12")) is None


@pytest.mark.parametrize(
    ("condition", "value_field"),
    [
        ("sending_application", "sending_application"),
        ("sending_facility", "sending_facility"),
        ("receiving_application", "receiving_application"),
        ("receiving_facility", "receiving_facility"),
    ],
)
def test_each_msh_name_field_is_matched_with_wildcards(condition: str, value_field: str) -> None:
    r = router(when("a", **{condition: ["LAB-?", "CARDIO*"]}))
    assert r.route(header(**{value_field: "LAB-1"})) == "a"
    assert r.route(header(**{value_field: "CARDIOLOGY"})) == "a"
    assert r.route(header(**{value_field: "LAB-12"})) is None
    assert r.route(header(**{value_field: "XLAB-1"})) is None
    assert r.route(header(**{value_field: ""})) is None
    # The other name fields are not looked at by this condition.
    others = {name: "LAB-1" for name in ("sending_application", "sending_facility") if name != value_field}
    assert r.route(header(**{value_field: "NOPE", **others})) is None


def test_a_field_matches_as_sent_with_its_components() -> None:
    msg = header(sending_facility="LAB^1.2.840.99^ISO")
    assert router(when("a", sending_facility=["LAB"])).route(msg) is None
    assert router(when("a", sending_facility=["LAB^*"])).route(msg) == "a"
    assert router(when("a", sending_facility=["LAB^1.2.840.99^ISO"])).route(msg) == "a"


def test_an_empty_field_matches_only_a_pattern_that_allows_empty() -> None:
    msg = header(receiving_facility="")
    assert router(when("a", receiving_facility=["*"])).route(msg) == "a"
    assert router(when("a", receiving_facility=["?*"])).route(msg) is None


def test_all_conditions_of_a_rule_must_hold() -> None:
    r = router(when("a", message_type=["ORU^R01"], sending_application=["LIS"], receiving_facility=["RAD"]))
    assert r.route(header("ORU^R01", sending_application="LIS", receiving_facility="RAD")) == "a"
    assert r.route(header("ADT^A01", sending_application="LIS", receiving_facility="RAD")) is None
    assert r.route(header("ORU^R01", sending_application="HIS", receiving_facility="RAD")) is None
    assert r.route(header("ORU^R01", sending_application="LIS", receiving_facility="CARDIO")) is None


def test_the_first_matching_rule_wins() -> None:
    r = router(
        when("a", message_type=["ORU^*"], sending_application=["LIS"]),
        when("b", message_type=["ORU^*"]),
        when("c"),
    )
    assert r.route(header("ORU^R01", sending_application="LIS")) == "a"
    assert r.route(header("ORU^R01", sending_application="HIS")) == "b"
    assert r.route(header("ADT^A01")) == "c"
    # The same rules in another order give other answers.
    r = router(when("c"), when("a", message_type=["ORU^*"]))
    assert r.route(header("ORU^R01")) == "c"


# --------------------------------------------------------------------------- KeyOrder


@dataclass(eq=True)
class Item:
    """A message stand-in that compares by value: KeyOrder must track items by identity."""

    tag: int


def test_the_first_message_of_a_key_goes_the_others_wait() -> None:
    order: KeyOrder[Item] = KeyOrder()
    a1, a2, b1 = Item(1), Item(2), Item(3)
    assert order.admit("A", a1) is True
    assert order.admit("A", a2) is False
    assert order.admit("B", b1) is True  # another key proceeds in parallel
    assert order.waiting() == 1
    assert len(order) == 2


def test_done_releases_the_next_in_arrival_order() -> None:
    order: KeyOrder[Item] = KeyOrder()
    items = [Item(n) for n in range(4)]
    assert [order.admit(b"pat-1", item) for item in items] == [True, False, False, False]
    assert order.waiting() == 3
    assert order.done(b"pat-1", items[0]) is items[1]
    assert order.done(b"pat-1", items[1]) is items[2]
    assert order.waiting() == 1
    assert order.done(b"pat-1", items[2]) is items[3]
    assert order.done(b"pat-1", items[3]) is None
    assert (len(order), order.waiting()) == (0, 0)
    # The key was dropped: its next message goes at once.
    assert order.admit(b"pat-1", Item(9)) is True


def test_done_for_a_message_that_is_not_in_flight_changes_nothing() -> None:
    order: KeyOrder[Item] = KeyOrder()
    first, second = Item(1), Item(2)
    order.admit("A", first)
    order.admit("A", second)
    assert order.done("A", second) is None  # waiting, not in flight
    assert order.done("A", Item(1)) is None  # equal to the one in flight, but another message
    assert order.done("B", first) is None  # unknown key
    assert order.waiting() == 1
    assert order.done("A", first) is second


def test_none_keys_never_wait_and_are_not_tracked() -> None:
    order: KeyOrder[Item] = KeyOrder()
    items = [Item(n) for n in range(3)]
    assert all(order.admit(None, item) for item in items)
    assert (len(order), order.waiting()) == (0, 0)
    assert order.done(None, items[0]) is None
    assert order.forget(None, items[1]) is None
    # None is not a key shared with anything else.
    assert order.admit("A", items[0]) is True
    assert order.admit(None, Item(7)) is True


def test_forgetting_a_waiting_message_drops_it_from_the_queue() -> None:
    order: KeyOrder[Item] = KeyOrder()
    a, b, c = Item(1), Item(2), Item(3)
    for item in (a, b, c):
        order.admit("K", item)
    assert order.forget("K", b) is None  # its sender left; nothing new to send
    assert order.waiting() == 1
    assert order.done("K", a) is c  # b is skipped
    assert order.done("K", c) is None
    assert len(order) == 0


def test_forgetting_the_message_in_flight_releases_the_next() -> None:
    order: KeyOrder[Item] = KeyOrder()
    a, b = Item(1), Item(2)
    order.admit("K", a)
    order.admit("K", b)
    assert order.forget("K", a) is b
    assert order.waiting() == 0
    assert order.forget("K", b) is None
    assert len(order) == 0


def test_forgetting_an_unknown_message_changes_nothing() -> None:
    order: KeyOrder[Item] = KeyOrder()
    a, b = Item(1), Item(2)
    order.admit("K", a)
    order.admit("K", b)
    assert order.forget("K", Item(5)) is None
    assert order.forget("other", a) is None
    assert order.waiting() == 1
    assert order.done("K", a) is b


def test_forgetting_a_waiting_message_equal_to_the_one_in_flight_keeps_the_one_in_flight() -> None:
    # Two messages with equal content (a sender's resend, say) are still two messages.
    order: KeyOrder[Item] = KeyOrder()
    in_flight, resend = Item(1), Item(1)
    order.admit("K", in_flight)
    order.admit("K", resend)
    assert order.forget("K", resend) is None
    assert order.waiting() == 0
    assert len(order) == 1
    assert order.done("K", in_flight) is None  # still recognised as the one in flight
    assert len(order) == 0


def test_forgetting_removes_that_very_message_among_equal_ones() -> None:
    order: KeyOrder[Item] = KeyOrder()
    head, x, y = Item(0), Item(1), Item(1)
    for item in (head, x, y):
        order.admit("K", item)
    order.forget("K", y)
    assert order.done("K", head) is x
    order2: KeyOrder[Item] = KeyOrder()
    for item in (head, x, y):
        order2.admit("K", item)
    order2.forget("K", x)
    assert order2.done("K", head) is y


class KeyOrderMachine(RuleBasedStateMachine):
    """Random admit / done / forget against a model of per-key FIFO queues.

    Items compare equal by value (a few tags only), so any mix-up between equality and identity shows.
    Checked: at most one message in flight per key, each key's messages are sent in arrival order
    (skipping the forgotten), and every admitted message is eventually sent or was forgotten.
    """

    admitted = Bundle("admitted")

    def __init__(self) -> None:
        super().__init__()
        self.order: KeyOrder[Item] = KeyOrder()
        self.queues: dict[str, list[Item]] = {}  # model: per key, unfinished messages in arrival order
        self.in_flight: dict[str, Item] = {}  # what the code has released and not yet finished
        self.sent: dict[str, list[Item]] = {}  # per key, every message released, in release order
        self.arrivals: dict[str, list[Item]] = {}
        self.forgotten: list[Item] = []
        self.finished: list[Item] = []

    def _release(self, key: str, item: Item | None) -> None:
        if item is None:
            return
        assert key not in self.in_flight, "two messages of one key in flight"
        assert self.queues[key] and self.queues[key][0] is item, "released out of arrival order"
        self.in_flight[key] = item
        self.sent.setdefault(key, []).append(item)

    @rule(target=admitted, key=st.sampled_from(["a", "b", "c"]), tag=st.integers(0, 2))
    def admit(self, key: str, tag: int) -> tuple[str, Item]:
        item = Item(tag)
        queue = self.queues.setdefault(key, [])
        queue.append(item)
        self.arrivals.setdefault(key, []).append(item)
        went = self.order.admit(key, item)
        assert went == (len(queue) == 1)
        if went:
            self._release(key, item)
        return key, item

    @rule(tag=st.integers(0, 2))
    def admit_without_key(self, tag: int) -> None:
        before = (len(self.order), self.order.waiting())
        assert self.order.admit(None, Item(tag)) is True
        assert (len(self.order), self.order.waiting()) == before

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.in_flight)))
        item = self.in_flight.pop(key)
        self.queues[key].pop(0)
        self.finished.append(item)
        self._release(key, self.order.done(key, item))

    @rule(entry=consumes(admitted))
    def forget(self, entry: tuple[str, Item]) -> None:
        key, item = entry
        queue = self.queues.get(key, [])
        if not any(x is item for x in queue):  # already finished: forgetting it is a no-op
            assert self.order.forget(key, item) is None
            return
        self.forgotten.append(item)
        if self.in_flight.get(key) is item:
            del self.in_flight[key]
            queue.pop(0)
            self._release(key, self.order.forget(key, item))
        else:
            self.queues[key] = [x for x in queue if x is not item]
            assert self.order.forget(key, item) is None

    @rule(entry=admitted)
    def done_out_of_turn(self, entry: tuple[str, Item]) -> None:
        """``done`` for a message that is not the one in flight is ignored."""
        key, item = entry
        if self.in_flight.get(key) is item:
            return
        before = (len(self.order), self.order.waiting())
        assert self.order.done(key, item) is None
        assert (len(self.order), self.order.waiting()) == before

    @invariant()
    def counts_match_the_model(self) -> None:
        assert len(self.order) == sum(1 for q in self.queues.values() if q)
        assert self.order.waiting() == sum(max(len(q) - 1, 0) for q in self.queues.values())
        # Every key with unfinished messages has exactly one in flight: its oldest.
        for key, queue in self.queues.items():
            assert (key in self.in_flight) == bool(queue)
            if queue:
                assert self.in_flight[key] is queue[0]

    def teardown(self) -> None:
        # Drain: finishing whatever is in flight must eventually send every message not forgotten.
        while self.in_flight:
            key, item = next(iter(self.in_flight.items()))
            del self.in_flight[key]
            self.queues[key].pop(0)
            self.finished.append(item)
            self._release(key, self.order.done(key, item))
        assert len(self.order) == 0 and self.order.waiting() == 0
        for key, arrivals in self.arrivals.items():
            sent = self.sent.get(key, [])
            # Sent in arrival order, each at most once ...
            positions = [next(i for i, a in enumerate(arrivals) if a is s) for s in sent]
            assert positions == sorted(set(positions))
            # ... and nothing lost: every message was sent or forgotten (before or while in flight).
            for item in arrivals:
                assert any(item is s for s in sent) or any(item is f for f in self.forgotten)


TestKeyOrderMachine = KeyOrderMachine.TestCase
TestKeyOrderMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, report_multiple_bugs=False
)


# --------------------------------------------------------------------------- DedupTable

K1 = (b"HIS", b"HOSP", b"MSG1")
K2 = (b"HIS", b"HOSP", b"MSG2")
K3 = (b"HIS", b"HOSP", b"MSG3")
K4 = (b"HIS", b"HOSP", b"MSG4")


def ack(n: int) -> bytes:
    return f"MSH|^~\\&|RIS|RAD|HIS|HOSP|20240301||ACK^A01^ACK|A{n}|P|2.5\rMSA|AA|MSG{n}\r".encode()


def test_an_acknowledged_message_is_remembered_for_the_window() -> None:
    table = DedupTable(window=600.0, size=100)
    assert table.get(K1, 0.0) is None
    table.remember(K1, ack(1), now=1000.0)
    assert table.get(K1, 1000.0) == ack(1)
    assert table.get(K1, 1600.0) == ack(1)  # the window's last instant still counts
    assert table.get(K2, 1000.0) is None  # another control ID
    assert table.get((b"OTHER", b"HOSP", b"MSG1"), 1000.0) is None  # same MSH-10, other sender
    assert table.get(K1, 1600.001) is None
    assert len(table) == 0  # an expired entry is dropped when looked up
    assert table.get(K1, 1000.0) is None  # ... for good


def test_remembering_expires_old_entries_without_a_lookup() -> None:
    table = DedupTable(window=10.0, size=100)
    table.remember(K1, ack(1), now=0.0)
    table.remember(K2, ack(2), now=5.0)
    table.remember(K3, ack(3), now=10.0)
    assert len(table) == 3  # K1 is exactly at the window's end
    table.remember(K4, ack(4), now=15.5)
    assert len(table) == 2
    assert (table.get(K3, 15.5), table.get(K4, 15.5)) == (ack(3), ack(4))


def test_the_size_bound_evicts_the_least_recently_remembered() -> None:
    table = DedupTable(window=600.0, size=3)
    for n, key in enumerate((K1, K2, K3, K4), start=1):
        table.remember(key, ack(n), now=float(n))
    assert len(table) == 3
    assert table.get(K1, 5.0) is None
    assert [table.get(k, 5.0) for k in (K2, K3, K4)] == [ack(2), ack(3), ack(4)]
    table.remember(K1, ack(1), now=6.0)
    assert table.get(K2, 6.0) is None  # now K2 is the oldest
    assert len(table) == 3


def test_remembering_again_refreshes_the_entry() -> None:
    table = DedupTable(window=100.0, size=3)
    table.remember(K1, ack(1), now=0.0)
    table.remember(K2, ack(2), now=1.0)
    table.remember(K3, ack(3), now=2.0)
    table.remember(K1, b"newer ack", now=50.0)  # K1 becomes the most recent ...
    table.remember(K4, ack(4), now=51.0)  # ... so K2 is evicted, not K1
    assert len(table) == 3
    assert table.get(K2, 51.0) is None
    assert table.get(K1, 51.0) == b"newer ack"  # the latest ACK is the one replayed
    assert table.get(K1, 149.0) == b"newer ack"  # and its window restarted
    assert table.get(K3, 149.0) is None


def test_a_lookup_does_not_extend_the_window() -> None:
    table = DedupTable(window=100.0, size=2)
    table.remember(K1, ack(1), now=0.0)
    table.remember(K2, ack(2), now=10.0)
    assert table.get(K1, 90.0) == ack(1)
    assert table.get(K1, 101.0) is None
    table.remember(K1, ack(1), now=102.0)
    table.remember(K3, ack(3), now=103.0)
    assert table.get(K2, 103.0) is None  # a lookup is not a "use": eviction follows remember order


@pytest.mark.parametrize(("window", "size"), [(600.0, 0), (0.0, 100), (0.0, 0)])
def test_size_zero_or_window_zero_disable_the_table(window: float, size: int) -> None:
    table = DedupTable(window=window, size=size)
    table.remember(K1, ack(1), now=10.0)
    assert len(table) == 0
    assert table.get(K1, 10.0) is None


_keys = st.sampled_from([K1, K2, K3, K4, (b"X", b"", b"1")])


@settings(max_examples=200, deadline=None)
@given(
    window=st.sampled_from([0.5, 3.0, 50.0]),
    size=st.integers(1, 4),
    steps=st.lists(st.tuples(st.booleans(), _keys, st.floats(0.0, 2.0)), max_size=60),
)
def test_dedup_table_against_its_contract(
    window: float, size: int, steps: list[tuple[bool, tuple[bytes, bytes, bytes], float]]
) -> None:
    """Random remember/get on a monotonic clock.

    A lookup answers only the latest ACK remembered for the key, only within the window, and always
    answers it when the key was remembered within the window and fewer than ``size`` other keys were
    remembered since. The table never holds more than ``size`` entries.
    """
    table = DedupTable(window=window, size=size)
    now = 0.0
    history: list[tuple[tuple[bytes, bytes, bytes], float, bytes]] = []
    for n, (is_remember, key, dt) in enumerate(steps):
        now += dt
        if is_remember:
            value = b"ack%d" % n
            table.remember(key, value, now)
            history.append((key, now, value))
        else:
            got = table.get(key, now)
            last = next((i for i in range(len(history) - 1, -1, -1) if history[i][0] == key), None)
            if last is None:
                assert got is None
                continue
            _, at, value = history[last]
            others_since = {k for k, _, _ in history[last + 1 :]} - {key}
            if now - at > window:
                assert got is None
            elif len(others_since) < size:
                assert got == value
            else:
                assert got in (None, value)
        assert len(table) <= size
