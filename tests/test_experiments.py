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
    assert {r.phase for r in fixed.timeline.rows()} == {"turn", "model", "wait", "hold", "read", "write"}


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
        # message 2's whole turn (its question and its reply) is erased by message 1's write
        [lost] = [r for r in result.timeline.rows() if r.phase == "lost turn"]
        assert (lost.who, lost.detail) == ("message 2", "overwritten by message 1")


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
    assert {"embed", "write", "search saw v1", "search saw v2", "partial read"} <= {r.phase for r in naive.timeline.rows()}
    cow = await experiments.store_race(cow=True)
    assert {"embed", "publish", "search saw v1", "search saw v2", "hold"} <= {r.phase for r in cow.timeline.rows()}


@pytest.mark.parametrize("kwargs", [{"parts": 1}, {"max_searches": 0}])
async def test_store_race_rejects_bad_input(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        await experiments.store_race(cow=True, **kwargs)


# ------------------------------------------------------------------------ timelines a student reads
def _marks(result: object, phase: str) -> list:  # type: ignore[type-arg]
    return [r for r in result.timeline.rows() if r.end is None and r.phase == phase]  # type: ignore[attr-defined]


async def test_fake_llm_answers_quicker_requests_first_whatever_the_timers() -> None:
    from chatkit.experiments import FakeLLM

    for _ in range(5):
        llm = FakeLLM(seconds={"B": 0.0, "A": 0.0})  # a tie: B is listed first, so B answers first
        done: list[str] = []

        async def ask(name: str) -> None:
            await llm([], name, who=name)
            done.append(name)

        await asyncio.gather(ask("A"), ask("B"))  # A starts thinking first
        assert done == ["B", "A"]
    sequential = FakeLLM(seconds={"B": 0.0, "A": 0.01})
    assert await sequential([], "q", who="A") == 'answer to "q" (saw 0 messages)'  # alone: nobody to wait for
    with pytest.raises(ValueError, match="'A'"):
        FakeLLM(seconds={"A": -1.0})


def test_mark_lost_updates_follows_the_state_through_every_write() -> None:
    from chatkit.experiments import mark_lost_updates
    from chatkit.timeline import Timeline, TimelineRow

    tl = Timeline()
    # A reads, B writes, C reads (sees B), A writes (erases B), C writes (brings B back, erases A)
    for who, phase, t in [("A", "read", 0), ("B", "read", 0), ("B", "write", 1), ("C", "read", 2),
                          ("A", "write", 3), ("C", "write", 4)]:
        tl.add(TimelineRow(who, phase, t))
    assert mark_lost_updates(tl) == ("A",)
    assert mark_lost_updates(tl) == ("A",)  # marking again adds nothing
    [lost] = [r for r in tl.rows() if r.phase == "lost message"]
    assert (lost.who, lost.start, lost.detail) == ("A", 4, "overwritten by C")


def test_mark_reordered_writes_names_the_earlier_arrivals_each_write_jumped() -> None:
    from chatkit.experiments import mark_reordered_writes
    from chatkit.timeline import Timeline, TimelineRow

    tl = Timeline()
    for who in ("request 1", "request 2", "request 3"):
        tl.add(TimelineRow(who, "read", 0.0))
    for t, who in enumerate(("request 3", "request 2", "request 1"), start=1):
        tl.add(TimelineRow(who, "write", float(t)))
    assert mark_reordered_writes(tl) == ("request 3", "request 2")
    assert [(r.who, r.detail) for r in tl.rows() if r.phase == "reordered message"] == [
        ("request 3", "ahead of request 1 and request 2"),
        ("request 2", "ahead of request 1"),
    ]


@pytest.mark.parametrize("experiment", ["session", "checkpointer"])
async def test_naive_race_timeline_shows_every_read_before_any_write_and_who_erased_whom(experiment: str) -> None:
    if experiment == "session":
        result = await experiments.session_race(locking=False, latency=0.0)
        damage = "lost message"
    else:
        result = await experiments.checkpointer_race(locked=False, latency=0.0)
        damage = "lost turn"
    reads, writes = _marks(result, "read"), _marks(result, "write")
    assert sorted(r.who for r in reads) == ["request 1", "request 2", "request 3"]
    assert {r.detail for r in reads} == {"saw 0 messages"}
    assert max(r.start for r in reads) <= min(w.start for w in writes)  # all three read before any wrote
    assert [(w.who, w.detail) for w in writes] == [(f"request {i}", "wrote 2 messages") for i in (3, 2, 1)]
    write_at = {w.who: w.start for w in writes}
    lost = {r.who: r for r in _marks(result, damage)}
    assert lost["request 3"].detail == "overwritten by request 2"
    assert lost["request 3"].start == write_at["request 2"]  # placed where it happens
    assert lost["request 2"].detail == "overwritten by request 1"
    assert lost["request 2"].start == write_at["request 1"]


@pytest.mark.parametrize("experiment", ["session", "checkpointer"])
async def test_locked_race_timeline_shows_each_turn_reading_what_the_previous_one_wrote(experiment: str) -> None:
    if experiment == "session":
        result = await experiments.session_race(locking=True, latency=0.0)
    else:
        result = await experiments.checkpointer_race(locked=True, latency=0.0)
    assert [(r.who, r.detail) for r in _marks(result, "read")] == [
        ("request 1", "saw 0 messages"), ("request 2", "saw 2 messages"), ("request 3", "saw 4 messages")
    ]
    assert [r.detail for r in _marks(result, "write")] == ["wrote 2 messages", "wrote 4 messages", "wrote 6 messages"]
    assert not [r for r in result.timeline.rows() if r.end is None and r.phase not in ("read", "write")]


async def test_interrupt_and_rollback_timelines_differ_in_what_was_read_and_written() -> None:
    interrupt = await experiments.double_texting("interrupt", latency=0.0)
    rollback = await experiments.double_texting("rollback", latency=0.0)

    def steps(result: experiments.PolicyResult) -> list[tuple[str, str, str | None]]:
        return [(r.who, r.phase, r.detail) for r in result.timeline.rows() if r.phase in ("read", "write")]

    assert steps(interrupt) == [
        ("message 1", "read", "saw 0 messages"),
        ("message 1", "write", "wrote 1 message"),  # the interrupted question is kept
        ("message 2", "read", "saw 1 message"),
        ("message 2", "write", "wrote 3 messages"),
    ]
    assert steps(rollback) == [
        ("message 1", "read", "saw 0 messages"),  # ... and nothing of message 1 is written
        ("message 2", "read", "saw 0 messages"),
        ("message 2", "write", "wrote 2 messages"),
    ]
    for result in (interrupt, rollback):
        turn = next(r for r in result.timeline.rows() if (r.who, r.phase) == ("message 1", "turn"))
        assert turn.outcome == "cancelled"
        kinds = [r.phase for r in result.timeline.rows() if r.end is None]
        assert {"sent", "interrupted", "read", "write"} == set(kinds)


async def test_message_two_is_sent_once_message_one_has_visibly_run() -> None:
    latency = 0.06
    result = await experiments.double_texting("reject", latency=latency)
    [sent] = _marks(result, "sent")
    model = next(r for r in result.timeline.rows() if (r.who, r.phase) == ("message 1", "model"))
    assert sent.start - model.start >= latency / 2 * 0.9  # asyncio.sleep(latency / 2) never returns early
    busy = _marks(result, "SessionBusy")
    assert [b.detail for b in busy] == ["SessionBusy: refused at once"]


async def test_policy_charts_use_one_marker_shape_per_kind() -> None:
    comparison = await experiments.compare_double_texting(latency=0.0)
    fig = comparison.plot()
    for ax in fig.axes:
        legend = ax.get_legend()
        shapes = {t.get_text(): h.get_marker() for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
                  if hasattr(h, "get_marker")}
        assert len(set(shapes.values())) == len(shapes), shapes


async def test_cow_writer_holds_nothing_while_it_embeds_and_searches_flip_version_once() -> None:
    result = await experiments.store_race(cow=True)
    rows = result.timeline.rows()
    embeds = [r for r in rows if (r.who, r.phase) == ("writer", "embed")]
    holds = [r for r in rows if (r.who, r.phase) == ("writer", "hold")]
    assert embeds and holds
    for e in embeds:
        for h in holds:
            assert h.end is not None and e.end is not None
            assert h.end <= e.start or h.start >= e.end  # no hold overlaps the embedding
    [swap] = _marks(result, "swap")
    searches = [r for r in rows if r.who == "reader" and r.end is not None]
    assert searches and all(r.phase.startswith("search saw v") for r in searches)
    assert all(r.phase == "search saw v1" for r in searches if r.end <= swap.start)  # type: ignore[operator]
    assert all(r.phase == "search saw v2" for r in searches if r.start >= swap.start)
    assert searches[-1].phase == "search saw v2"


async def test_naive_store_partial_reads_say_what_they_saw() -> None:
    result = await experiments.store_race(cow=False)
    details = [r.detail for r in _marks(result, "partial read")]
    assert details[0] == "v1 5/6" and "no chunk" in details and details[-1] == "v2 5/6"
    assert len(details) == 11


async def test_store_race_on_the_knowledge_base() -> None:
    from pathlib import Path

    from chatkit.embedding_lab import load_corpus

    corpus = load_corpus(Path(__file__).resolve().parent.parent / "data")
    naive = await experiments.store_race(cow=False, corpus=corpus, source="copy-on-write.md", delay=0.0)
    cow = await experiments.store_race(cow=True, corpus=corpus, source="copy-on-write.md", delay=0.0)
    assert naive.count("partial document") >= 2 and naive.source == "copy-on-write.md"
    assert cow.ok and cow.observed[-1] == cow.expected[1]
    with pytest.raises(ValueError, match="'nope.md'"):
        await experiments.store_race(cow=True, corpus=corpus, source="nope.md")


async def test_lock_demos_label_work_as_work_and_deadlocked_lanes_say_who_holds_what() -> None:
    from chatkit._timeline_plot import lane_label

    fifo = await experiments.lock_fifo(hold=0.0)
    naive = await experiments.multi_key_deadlock(keyed=False, patience=0.02)
    keyed = await experiments.multi_key_deadlock(keyed=True)
    for result in (fifo, naive, keyed):
        assert "model" not in {r.phase for r in result.timeline.rows()}
    rows = naive.timeline.rows()
    assert lane_label("caller 1", rows) == "caller 1\nholds a · waits for b"
    assert lane_label("caller 2", rows) == "caller 2\nholds b · waits for a"
    assert [r.detail for r in rows if r.phase == "deadlock"] == ["waits for b, held by caller 2", "waits for a, held by caller 1"]


async def test_comparisons_draw_each_panel_on_its_own_axis() -> None:
    comparison = await experiments.compare_store_race()
    fig = comparison.plot()
    assert fig.axes[0].get_xlim() != fig.axes[1].get_xlim()
    assert all(ax.get_xlabel() for ax in fig.axes)
