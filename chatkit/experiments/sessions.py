"""The session history race: concurrent ``SessionManager.chat()`` calls on one session, with and without locking."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..timeline import lane
from ._common import (
    QUESTIONS,
    Comparison,
    FakeLLM,
    InFlight,
    RaceResult,
    RecordingSaver,
    _check_questions,
    _checkpoint_tree,
    _GatedTimeline,
    _gather_named,
    _latency,
    _reply_owner,
    find_history_anomalies,
    mark_lost_updates,
)

__all__ = [
    "SessionRaceResult",
    "session_race",
    "compare_session_race",
]


@dataclass(frozen=True, slots=True)
class SessionRaceResult(RaceResult):
    """A :class:`RaceResult` for the session history race (``SessionManager(locking=...)``).

    Attributes:
        replies: each request's reply, in request order.
        branches: leaves of the session thread's checkpoint tree (1 = one straight history).
    """

    replies: tuple[str, ...] = ()
    branches: int = 0

    def summary(self) -> str:
        lost = self.count("lost message")
        reordered = self.count("reordered message")
        damage = [f"{lost} lost"] if lost else []
        damage += [f"{reordered} reordered"] if reordered else []
        return (
            f"{self.variant}: {len(self.expected) // 2} concurrent messages, {len(self.observed)} of "
            f"{len(self.expected)} history entries kept, "
            + (", ".join(damage) if damage else "nothing lost or reordered")
        )


def _gated_latency(
    gate: InFlight, owner: dict[str, str], latencies: dict[str, float]
) -> Callable[[str], Awaitable[None]]:
    """An ``ExtractiveChatModel`` latency: wait until every request is in flight, then think (a
    :class:`FakeLLM`: quicker requests thinking at the same time always answer first)."""
    llm = FakeLLM(seconds=dict(reversed(latencies.items())))  # on a tie, the last request answers first

    async def wait(text: str) -> None:
        who = owner.get(text)
        if who is None:  # a message the experiment did not send (should not happen)
            return
        await gate.arrive(who)
        await llm((), text, who=who)

    return lambda text: wait(text)


async def session_race(
    *,
    locking: bool,
    questions: Sequence[str] = QUESTIONS,
    latency: float = 0.02,
) -> SessionRaceResult:
    """The original plan's scenario: three concurrent ``chat()`` calls on one session.

    Naive (``locking=False``): every turn reads the same history, the model runs, and each turn commits
    on the state it read: the last commit wins and the other turns' messages are lost. The timeline
    marks each read of the session (``saw N messages``), each write (``wrote N messages``) and each lost
    turn at the write that erased it (``overwritten by request 2``). Fixed
    (``locking=True``): the session's lock runs the turns one at a time in arrival order and the history is
    ``[user1, assistant1, user2, assistant2, user3, assistant3]``.

    Args:
        locking: run ``SessionManager(locking=True)`` (the fix) instead of ``locking=False``.
        questions: one message per concurrent request (at least 2, distinct).
        latency: seconds; request ``i`` (0-based) answers after ``latency * (len(questions) - i)``.

    Raises:
        ValueError: fewer than two or duplicated questions, or a negative latency.
    """
    from ..models import ExtractiveChatModel
    from ..sessions import SessionManager

    questions = _check_questions(questions)
    if latency < 0:
        raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
    names = [f"request {i + 1}" for i in range(len(questions))]
    owner = dict(zip(questions, names, strict=True))
    latencies = {n: _latency(i, len(names), latency) for i, n in enumerate(names)}
    gate = InFlight(names)
    timeline = _GatedTimeline(gate)
    model = ExtractiveChatModel(latency=_gated_latency(gate, owner, latencies))
    saver = RecordingSaver(timeline)
    manager = SessionManager(model=model, locking=locking, timeline=timeline, checkpointer=saver)
    sid = await manager.create_session()

    def request(name: str, question: str) -> Callable[[], Awaitable[Any]]:
        async def send() -> Any:
            with lane(name):  # the commit runs in a task of its own: keep its write in this lane
                return await manager.chat(sid, question)

        return send

    timeline.clear()
    outcomes = await _gather_named([(n, request(n, q)) for n, q in zip(names, questions, strict=True)])
    saver.recording = False
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    history = await manager.get_history(sid)
    observed = tuple(
        m.content if m.role == "user" else f"answer to: {_reply_owner(m.content, questions)}" for m in history
    )
    expected = tuple(m for q in questions for m in (q, f"answer to: {q}"))
    who = {m: owner[m.removeprefix("answer to: ")] for m in expected}
    anomalies = find_history_anomalies(expected, observed, who=lambda m: who.get(m, "?"))
    mark_lost_updates(timeline, what="lost message")
    _, branches = _checkpoint_tree(manager.checkpointer, {"configurable": {"thread_id": sid}})
    return SessionRaceResult(
        experiment="session history race",
        variant="SessionManager(locking=True)" if locking else "SessionManager(locking=False)",
        fixed=locking,
        timeline=timeline,
        expected=expected,
        observed=observed,
        anomalies=anomalies,
        replies=tuple(getattr(o, "reply", "") for o in outcomes),
        branches=branches,
    )


async def compare_session_race(*, questions: Sequence[str] = QUESTIONS, latency: float = 0.02) -> Comparison:
    """Run :func:`session_race` naive, then fixed."""
    before = await session_race(locking=False, questions=questions, latency=latency)
    after = await session_race(locking=True, questions=questions, latency=latency)
    return Comparison(before, after)
