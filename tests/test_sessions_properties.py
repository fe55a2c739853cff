"""Property: whatever the interleaving of turns across sessions (arrival order, the order in which models
finish, failures, cancellations, chat or stream), every session's history is exactly its successful turns,
in arrival order, each reply computed with every earlier one: nothing lost, reordered or duplicated. For the
built-in graph and for a graph of one's own with a custom state key reduced by ``operator.add`` (which must
hold exactly one entry per committed turn)."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AnyMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

from chatkit import ExtractiveChatModel, SessionManager
from chatkit.sessions import ChatResult
from tests._session_helpers import Gates, conversation, pairs, reply_to, until

Op = tuple[int, str, bool]  # (session index, fate, streamed)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[Op], list[int], list[int]]:
    n_sessions = draw(st.integers(1, 3))
    ops = draw(
        st.lists(
            st.tuples(st.integers(0, n_sessions - 1), st.sampled_from(["ok", "ok", "error", "cancel"]), st.booleans()),
            min_size=1,
            max_size=8,
        )
    )
    order = draw(st.permutations(range(len(ops))))  # when each turn's model may finish (or the caller leaves)
    yields = draw(st.lists(st.integers(0, 4), min_size=len(ops), max_size=len(ops)))  # event-loop steps between
    return n_sessions, ops, list(order), yields


def in_flight(manager: SessionManager) -> int:
    stats = manager.statistics()
    return stats.running + stats.waiting


class Logged(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    log: Annotated[list[str], operator.add]


def own_graph(model: ExtractiveChatModel) -> StateGraph:
    """``note`` (appends to ``log``) then ``generate`` (the model over the messages)."""

    async def generate(state: Logged, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"], config)]}

    builder = StateGraph(Logged)
    builder.add_node("note", lambda state: {"log": [state["messages"][-1].text]})
    builder.add_node("generate", generate)
    builder.add_edge(START, "note")
    builder.add_edge("note", "generate")
    return builder


async def run(graph: str, n_sessions: int, ops: list[Op], order: list[int], yields: list[int]) -> None:
    gates = Gates()
    model = ExtractiveChatModel(latency=gates)
    manager = SessionManager(model=model) if graph == "built-in" else SessionManager(graph=own_graph(model))
    sids = [await manager.create_session() for _ in range(n_sessions)]
    texts = [f"session {s} message {i}" for i, (s, _, _) in enumerate(ops)]

    async def collect(sid: str, text: str) -> str:
        return "".join([chunk async for chunk in manager.stream(sid, text)])

    tasks: list[asyncio.Task[Any]] = []
    for text, (s, fate, streamed) in zip(texts, ops):
        if fate == "error":
            gates.fail(text)
        coro = collect(sids[s], text) if streamed else manager.chat(sids[s], text)
        tasks.append(asyncio.create_task(coro))  # arrival order = creation order
    await until(lambda: in_flight(manager) == len(ops))  # all arrived (running or queued)
    for i, steps in zip(order, yields):
        if ops[i][1] == "cancel":
            tasks[i].cancel()
        else:
            gates.release(texts[i])
        for _ in range(steps):
            await asyncio.sleep(0)
    results = await asyncio.gather(*tasks, return_exceptions=True)

    for s, sid in enumerate(sids):
        committed = [t for t, (owner, fate, _) in zip(texts, ops) if owner == s and fate == "ok"]
        assert pairs(await manager.get_history(sid)) == conversation(*committed)
        if graph == "own":
            state = await manager.graph.aget_state({"configurable": {"thread_id": sid}})
            assert state.values.get("log", []) == committed
    for text, (s, fate, streamed), result in zip(texts, ops, results):
        if fate == "cancel":
            assert isinstance(result, asyncio.CancelledError)
        elif fate == "error":
            assert isinstance(result, RuntimeError)
        else:
            committed = [t for t, (owner, f, _) in zip(texts, ops) if owner == s and f == "ok"]
            expected = reply_to(text, committed.index(text) + 1)
            assert (result if streamed else result.reply) == expected
            assert streamed or isinstance(result, ChatResult)
    stats = manager.statistics()
    fates = [fate for _, fate, _ in ops]
    assert (stats.completed, stats.failed, stats.cancelled) == (
        fates.count("ok"),
        fates.count("error"),
        fates.count("cancel"),
    )
    assert (stats.running, stats.waiting) == (0, 0)
    assert not manager.lock.is_busy()


@pytest.mark.parametrize("graph", ["built-in", "own"])
@given(scenario=scenarios())
@settings(max_examples=60, deadline=None)
def test_interleavings_lose_reorder_or_duplicate_nothing(
    graph: str, scenario: tuple[int, list[Op], list[int], list[int]]
) -> None:
    asyncio.run(run(graph, *scenario))
