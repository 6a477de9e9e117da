"""Every (state, event) pair of the rise/fall health counter, with injected time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medlb.model.health import HealthCounter, OpState, next_interval


def test_first_success_brings_a_fresh_server_up() -> None:
    counter = HealthCounter(rise=3, fall=2)
    assert counter.state is OpState.DOWN
    transition = counter.record(True, 1.0, "L4OK")
    assert transition is not None and transition.new is OpState.UP and transition.at == 1.0


def test_failed_first_check_makes_rise_apply() -> None:
    counter = HealthCounter(rise=3, fall=2)
    assert counter.record(False, 1.0, "refused") is None
    assert counter.record(True, 2.0, "ok") is None
    assert counter.record(True, 3.0, "ok") is None
    transition = counter.record(True, 4.0, "ok")
    assert transition is not None and transition.new is OpState.UP


def test_fall_consecutive_failures_mark_down() -> None:
    counter = HealthCounter(rise=2, fall=3, state=OpState.UP, initial=False)
    assert counter.record(False, 1, "x") is None
    assert counter.record(False, 2, "x") is None
    transition = counter.record(False, 3, "timeout")
    assert transition is not None and transition.new is OpState.DOWN and transition.cause == "timeout"


def test_a_success_resets_the_failure_run() -> None:
    counter = HealthCounter(rise=2, fall=3, state=OpState.UP, initial=False)
    counter.record(False, 1, "x")
    counter.record(False, 2, "x")
    counter.record(True, 3, "ok")
    assert counter.record(False, 4, "x") is None
    assert counter.record(False, 5, "x") is None
    assert counter.state is OpState.UP


def test_a_failure_resets_the_success_run() -> None:
    counter = HealthCounter(rise=2, fall=1, state=OpState.DOWN, initial=False)
    counter.record(True, 1, "ok")
    counter.record(False, 2, "x")
    assert counter.record(True, 3, "ok") is None
    assert counter.record(True, 4, "ok") is not None


def test_up_success_and_down_failure_are_steady() -> None:
    up = HealthCounter(2, 2, OpState.UP, initial=False)
    assert up.record(True, 1, "ok") is None and not up.transitional
    down = HealthCounter(2, 2, OpState.DOWN, initial=False)
    assert down.record(False, 1, "x") is None and not down.transitional


def test_force_sets_state_and_resets_runs() -> None:
    counter = HealthCounter(2, 3, OpState.UP, initial=False)
    counter.record(False, 1, "x")
    transition = counter.force(OpState.DOWN, 2, "agent: down")
    assert transition is not None and transition.cause == "agent: down"
    assert counter.force(OpState.DOWN, 3, "again") is None
    assert counter.successes == counter.failures == 0


def test_intervals_follow_haproxy_rule() -> None:
    counter = HealthCounter(2, 3, OpState.UP, initial=False)
    assert next_interval(counter, 2.0, 0.5, 5.0) == 2.0
    counter.record(False, 1, "x")
    assert next_interval(counter, 2.0, 0.5, 5.0) == 0.5
    counter.record(False, 2, "x")
    counter.record(False, 3, "x")
    assert next_interval(counter, 2.0, 0.5, 5.0) == 5.0
    counter.record(True, 4, "ok")
    assert next_interval(counter, 2.0, 0.5, 5.0) == 0.5


def test_rise_and_fall_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HealthCounter(0, 1)


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_state_matches_a_reference_model(results: list[bool], rise: int, fall: int) -> None:
    """Against a direct reading of the rule: the state flips exactly when the
    trailing run of opposite results reaches rise/fall (or 1 for the first UP)."""
    counter = HealthCounter(rise, fall)
    state, initial, run = OpState.DOWN, True, 0
    for i, ok in enumerate(results):
        counter.record(ok, float(i), "t")
        if state is OpState.DOWN:
            run = run + 1 if ok else 0
            if not ok:
                initial = False
            if ok and (initial or run >= rise):
                state, run, initial = OpState.UP, 0, False
        else:
            run = run + 1 if not ok else 0
            if run >= fall:
                state, run = OpState.DOWN, 0
        assert counter.state is state
