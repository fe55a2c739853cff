"""The LangGraph checkpointer race: concurrent ``graph.ainvoke`` calls on one ``thread_id``, with and without a lock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..locks import KeyedLock
from ..timeline import Timeline, lane
from ._common import (
    QUESTIONS,
    Anomaly,
    Comparison,
    FakeLLM,
    InFlight,
    RaceResult,
    _check_questions,
    _checkpoint_tree,
    _gather_named,
    _latency,
    _plural,
    find_history_anomalies,
    mark_lost_updates,
)

__all__ = [
    "CheckpointRaceResult",
    "checkpointer_race",
    "compare_checkpointer_race",
]


@dataclass(frozen=True, slots=True)
class CheckpointRaceResult(RaceResult):
    """A :class:`RaceResult` for the LangGraph checkpointer race.

    Attributes:
        turns: how many concurrent turns were sent.
        checkpoints: how many checkpoints the saver holds for the thread.
        branches: how many leaves the checkpoint tree has (1 for a straight history; each concurrent
            turn that started from the same checkpoint adds a branch).
    """

    turns: int = 0
    checkpoints: int = 0
    branches: int = 0

    def summary(self) -> str:
        lost_turns = self.count("lost turn")
        lost = f"{lost_turns} turn{'s' if lost_turns != 1 else ''} lost" if lost_turns else "nothing lost"
        branches = f"{self.branches} checkpoint branch{'es' if self.branches != 1 else ''}"
        return (
            f"{self.variant}: {self.turns} concurrent turns, {len(self.observed)} of {len(self.expected)} "
            f"messages kept, {lost}; {branches}"
        )


def _two_node_graph(*, latencies: dict[str, float], owner: dict[str, str], gate: InFlight, timeline: Timeline) -> Any:
    """``context -> model`` over messages, compiled with ``InMemorySaver`` (the graph of notebook 2).

    ``context`` marks the read (the history the turn runs on); ``model`` waits at ``gate`` (all requests
    in flight), then thinks for the request's latency (a :class:`FakeLLM`, so quicker requests thinking
    at the same time answer first) and answers ``"answer to: <question>"``.
    """
    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import END, START, MessagesState, StateGraph

    llm = FakeLLM(seconds=dict(reversed(latencies.items())), timeline=timeline)  # ties: the last request first

    async def context(state: MessagesState) -> dict[str, Any]:
        history = state["messages"][:-1]  # the last message is this turn's question
        timeline.mark("read", key="thread-1", detail=f"saw {_plural(len(history), 'message')}")
        return {}

    async def model(state: MessagesState) -> dict[str, Any]:
        question = str(state["messages"][-1].content)
        await gate.arrive(owner[question])
        await llm(state["messages"][:-1], question)
        return {"messages": [AIMessage(f"answer to: {question}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("context", context)
    builder.add_node("model", model)
    builder.add_edge(START, "context")
    builder.add_edge("context", "model")
    builder.add_edge("model", END)
    return builder.compile(checkpointer=InMemorySaver())


async def checkpointer_race(
    *,
    locked: bool,
    questions: Sequence[str] = QUESTIONS,
    latency: float = 0.02,
) -> CheckpointRaceResult:
    """Concurrent ``graph.ainvoke`` calls on one ``thread_id`` with ``InMemorySaver``.

    The graph is ``context -> model`` (two nodes) over ``MessagesState``. Naive (``locked=False``): every
    call loads the same checkpoint, adds its question and answer, and saves a child of that checkpoint:
    the thread's checkpoint tree grows one branch per call, and the latest state (what the next turn
    sees) keeps only the last writer's two messages. The timeline marks what each turn read and wrote
    and each lost turn at the write that erased it. Fixed (``locked=True``):
    each call runs under a :class:`~chatkit.KeyedLock` on the thread id, so each turn starts from the
    previous turn's checkpoint and nothing is lost (this is what :class:`~chatkit.SessionManager` does).

    Args:
        locked: run the fixed version.
        questions: one question per concurrent request (at least 2).
        latency: seconds; request ``i`` (0-based) answers after ``latency * (len(questions) - i)``.

    Returns:
        A :class:`CheckpointRaceResult`; ``anomalies`` lists each lost turn and lost message.

    Raises:
        ValueError: fewer than two questions, duplicated questions, or a negative latency.
    """
    from langchain_core.messages import HumanMessage

    questions = _check_questions(questions)
    if latency < 0:
        raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
    names = [f"request {i + 1}" for i in range(len(questions))]
    owner = {q: n for q, n in zip(questions, names, strict=True)}
    latencies = {n: _latency(i, len(names), latency) for i, n in enumerate(names)}
    timeline = Timeline()
    gate = InFlight(names)
    graph = _two_node_graph(latencies=latencies, owner=owner, gate=gate, timeline=timeline)
    config: dict[str, Any] = {"configurable": {"thread_id": "thread-1"}}
    lock = KeyedLock(observer=timeline.observe_lock)
    lock.add_observer(gate.observe_lock)

    def request(name: str, question: str) -> Callable[[], Awaitable[Any]]:
        async def turn() -> Any:
            with lane(name), timeline.span("turn", key="thread-1"):
                if locked:
                    async with lock("thread-1", label=name):
                        out = await graph.ainvoke({"messages": [HumanMessage(question)]}, config)
                else:
                    out = await graph.ainvoke({"messages": [HumanMessage(question)]}, config)
                # ainvoke returns once its last checkpoint is saved
                timeline.mark("write", key="thread-1", detail=f"wrote {_plural(len(out['messages']), 'message')}")
            return out

        return turn

    timeline.clear()  # time 0 = the moment the requests are sent
    outcomes = await _gather_named([(n, request(n, q)) for n, q in zip(names, questions, strict=True)])
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    state = await graph.aget_state(config)
    observed = tuple(str(m.content) for m in state.values.get("messages", []))
    expected = tuple(m for q in questions for m in (q, f"answer to: {q}"))
    who = {m: owner[m.removeprefix("answer to: ")] for m in expected}
    anomalies = list(find_history_anomalies(expected, observed, who=who.__getitem__))
    lost_turns = [n for n, q in zip(names, questions, strict=True) if q not in observed]
    anomalies[:0] = [Anomaly("lost turn", n, q) for n, q in zip(names, questions, strict=True) if n in lost_turns]
    mark_lost_updates(timeline, what="lost turn")
    checkpoints, branches = _checkpoint_tree(graph.checkpointer, config)
    return CheckpointRaceResult(
        experiment="checkpointer race",
        variant="graph.ainvoke under KeyedLock" if locked else "raw graph.ainvoke",
        fixed=locked,
        timeline=timeline,
        expected=expected,
        observed=observed,
        anomalies=tuple(anomalies),
        turns=len(questions),
        checkpoints=checkpoints,
        branches=branches,
    )


async def compare_checkpointer_race(*, questions: Sequence[str] = QUESTIONS, latency: float = 0.02) -> Comparison:
    """Run :func:`checkpointer_race` naive, then fixed."""
    before = await checkpointer_race(locked=False, questions=questions, latency=latency)
    after = await checkpointer_race(locked=True, questions=questions, latency=latency)
    return Comparison(before, after)
