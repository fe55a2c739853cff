"""chatkit.experiments: each naive run always shows its anomaly, each fixed run never does.

Races are made certain by construction (an in-flight gate plus chosen latencies), so these tests repeat each
experiment many times with zero latency and expect the exact same outcome every time.
"""

from __future__ import annotations

import asyncio

import pytest

from chatkit import experiments
from chatkit.experiments import Anomaly, InFlight, find_history_anomalies

REPEATS = 20
NAIVE = pytest.mark.xfail(strict=True, reason="the naive version loses data by construction")


# ------------------------------------------------------------------------------------------ helpers
def test_find_history_anomalies_reports_lost_reordered_and_duplicated() -> None:
    expected = ["u1", "a1", "u2", "a2", "u3", "a3"]
    assert find_history_anomalies(expected, expected, who=str) == ()
    found = find_history_anomalies(expected, ["u2", "a2", "u1", "a1", "a1"], who=lambda m: "r" + m[1])
    assert found == (
        Anomaly("lost message", "r3", "u3"),
        Anomaly("lost message", "r3", "a3"),
        Anomaly("duplicated message", "r1", "a1"),
        Anomaly("reordered message", "r2", "u2"),
        Anomaly("reordered message", "r2", "a2"),
    )


async def test_in_flight_gate_opens_only_when_everyone_arrived() -> None:
    gate = InFlight(["A", "B", "C"])
    waiting = asyncio.create_task(gate.arrive("A"))
    gate.mark("A")  # idempotent
    gate.mark("B")
    await asyncio.sleep(0)
    assert not waiting.done() and not gate.is_open
    gate.mark("C")
    await waiting
    assert gate.is_open and "open=True" in repr(gate)


def test_in_flight_needs_names() -> None:
    with pytest.raises(ValueError, match="at least one"):
        InFlight([])


# --------------------------------------------------------------------------------- checkpointer race
async def test_checkpointer_race_naive_always_loses_two_turns() -> None:
    for _ in range(REPEATS):
        result = await experiments.checkpointer_race(locked=False, latency=0.0)
        assert result.count("lost turn") == 2
        assert result.count("lost message") == 4
        assert result.branches == 3
        assert len(result.observed) == 2
        assert result.summary() == (
            "raw graph.ainvoke: 3 concurrent turns, 2 of 6 messages kept, 2 turns lost; 3 checkpoint branches"
        )


async def test_checkpointer_race_locked_never_loses_anything() -> None:
    for _ in range(REPEATS):
        result = await experiments.checkpointer_race(locked=True, latency=0.0)
        assert result.ok and result.branches == 1
        assert result.observed == result.expected


@pytest.mark.parametrize("locked", [pytest.param(False, marks=NAIVE), True])
async def test_checkpointer_race_keeps_every_turn(locked: bool) -> None:
    result = await experiments.checkpointer_race(locked=locked, latency=0.0)
    assert result.observed == result.expected


async def test_checkpointer_race_timeline_shows_turns_models_and_lost_turns() -> None:
    result = await experiments.checkpointer_race(locked=False, latency=0.0)
    phases = {(r.who, r.phase) for r in result.timeline.rows()}
    assert {("request 1", "turn"), ("request 2", "model")} <= phases
    assert sum(r.phase == "lost turn" for r in result.timeline.rows()) == 2
    fixed = await experiments.checkpointer_race(locked=True, latency=0.0)
    assert {r.phase for r in fixed.timeline.rows()} == {"turn", "model", "wait", "hold"}


async def test_compare_checkpointer_race_plots_both() -> None:
    comparison = await experiments.compare_checkpointer_race(latency=0.0)
    assert not comparison.before.ok and comparison.after.ok
    fig = comparison.plot()
    assert len(fig.axes) == 2
    assert comparison._repr_html_().startswith("<img")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"questions": ["only one"]}, ValueError),
        ({"questions": ["same", "same"]}, ValueError),
        ({"questions": "a string"}, TypeError),
        ({"latency": -1.0}, ValueError),
    ],
)
async def test_checkpointer_race_rejects_bad_input(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        await experiments.checkpointer_race(locked=False, **kwargs)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- lock demos
async def test_lock_fifo_order_per_key_and_no_overlap() -> None:
    for _ in range(5):
        result = await experiments.lock_fifo(hold=0.0)
        assert result.order == ("s1: A -> B -> D -> F", "s2: C -> E")
        assert result.overlaps == 0 and not result.deadlocked


@pytest.mark.parametrize("keyed", [pytest.param(False, marks=NAIVE), True])
async def test_multi_key_requests_never_deadlock(keyed: bool) -> None:
    result = await experiments.multi_key_deadlock(keyed=keyed, patience=0.05)
    assert not result.deadlocked


async def test_naive_multi_key_always_deadlocks() -> None:
    for _ in range(5):
        result = await experiments.multi_key_deadlock(keyed=False, patience=0.02)
        assert result.deadlocked and result.order == ()
        assert "DEADLOCK" in result.summary()


async def test_shared_across_threads_never_overlaps() -> None:
    result = await experiments.shared_across_threads(rounds=5, hold=0.0)
    assert result.overlaps == 0
    assert result.order == (
        "another event loop: 5 acquisitions",
        "plain thread: 5 acquisitions",
        "this event loop: 5 acquisitions",
    )
    assert {r.who for r in result.timeline.rows()} == {"another event loop", "plain thread", "this event loop"}


# ------------------------------------------------------------------------------ session history race
async def test_session_race_naive_always_loses_four_messages() -> None:
    for _ in range(REPEATS // 2):
        result = await experiments.session_race(locking=False, latency=0.0)
        assert result.count("lost message") == 4
        assert len(result.observed) == 2 and result.branches == 3
        assert not result.fixed


async def test_session_race_locked_never_loses_or_reorders() -> None:
    for _ in range(REPEATS // 2):
        result = await experiments.session_race(locking=True, latency=0.0)
        assert result.ok and result.observed == result.expected and result.branches == 1
        assert [r.split(":")[0] for r in result.replies] == ["Message 1", "Message 2", "Message 3"]


@pytest.mark.parametrize("locking", [pytest.param(False, marks=NAIVE), True])
async def test_session_race_history_is_the_plans_scenario(locking: bool) -> None:
    result = await experiments.session_race(locking=locking, latency=0.0)
    q1, q2, q3 = experiments.QUESTIONS
    assert result.observed == (q1, f"answer to: {q1}", q2, f"answer to: {q2}", q3, f"answer to: {q3}")


async def test_session_race_timeline_records_the_manager_and_the_lock() -> None:
    fixed = await experiments.session_race(locking=True, latency=0.0)
    phases = {(r.who, r.phase) for r in fixed.timeline.rows()}
    for who in ("request 1", "request 2", "request 3"):
        assert {(who, "turn"), (who, "model"), (who, "wait"), (who, "hold")} <= phases
    naive = await experiments.session_race(locking=False, latency=0.0)
    assert sum(r.phase == "lost message" for r in naive.timeline.rows()) == 2


async def test_compare_session_race_summaries_are_deterministic() -> None:
    comparison = await experiments.compare_session_race(latency=0.0)
    assert comparison.summary() == (
        "before: SessionManager(locking=False): 3 concurrent messages, 2 of 6 history entries kept, 4 lost\n"
        "after:  SessionManager(locking=True): 3 concurrent messages, 6 of 6 history entries kept, "
        "nothing lost or reordered"
    )


# ------------------------------------------------------------------------------------ double texting
EXPECTED_OUTCOMES = {
    "enqueue": ("replied", "replied"),
    "reject": ("replied", "SessionBusy"),
    "interrupt": ("TurnInterrupted", "replied"),
    "rollback": ("TurnInterrupted", "replied"),
}


@pytest.mark.parametrize("policy", list(EXPECTED_OUTCOMES))
async def test_each_policy_keeps_its_promise_every_time(policy: str) -> None:
    for _ in range(5):
        result = await experiments.double_texting(policy, latency=0.0)
        assert result.outcomes == EXPECTED_OUTCOMES[policy]
        assert result.ok, result.summary()


async def test_double_texting_without_a_lock_always_loses_a_reply() -> None:
    for _ in range(5):
        result = await experiments.double_texting("no lock", latency=0.0)
        assert result.outcomes == ("replied", "replied")
        assert not result.ok and len(result.history) == 2
        assert any(r.phase == "lost reply" for r in result.timeline.rows())


async def test_compare_double_texting_covers_every_policy() -> None:
    comparison = await experiments.compare_double_texting(latency=0.0)
    assert [r.policy for r in comparison.results] == ["no lock", "enqueue", "reject", "interrupt", "rollback"]
    assert len(comparison.plot().axes) == 5
    assert "ANOMALY" in comparison.summary().split("enqueue")[0]


def test_double_texting_rejects_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="'shout'"):
        asyncio.run(experiments.double_texting("shout"))


# ------------------------------------------------------------------------------ vector-store race
async def test_naive_store_always_shows_partial_documents() -> None:
    for _ in range(REPEATS // 2):
        result = await experiments.store_race(cow=False)
        assert result.count("partial document") == 11
        assert result.observed[0] == "v1: 5" and "missing" in result.observed
        assert result.versions_seen == (1, 2)


async def test_cow_store_never_shows_a_partial_document() -> None:
    for _ in range(REPEATS // 2):
        result = await experiments.store_race(cow=True)
        assert result.ok, result.observed
        assert result.searches >= 1 and set(result.observed) <= {"v1: 6", "v2: 6"}
        assert result.observed[-1] == "v2: 6"


@pytest.mark.parametrize("cow", [pytest.param(False, marks=NAIVE), True])
async def test_every_search_sees_one_complete_version(cow: bool) -> None:
    result = await experiments.store_race(cow=cow)
    assert result.count("partial document") == 0


async def test_store_race_timeline_records_the_stores() -> None:
    naive = await experiments.store_race(cow=False)
    assert {"embed", "write", "search", "partial read"} <= {r.phase for r in naive.timeline.rows()}
    cow = await experiments.store_race(cow=True)
    assert {"embed", "publish", "search", "hold"} <= {r.phase for r in cow.timeline.rows()}


@pytest.mark.parametrize("kwargs", [{"parts": 1}, {"max_searches": 0}])
async def test_store_race_rejects_bad_input(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        await experiments.store_race(cow=True, **kwargs)
