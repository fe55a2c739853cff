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
