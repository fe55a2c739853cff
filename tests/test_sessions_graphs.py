"""Bring your own graph: SessionManager(graph=...) with tools, several nodes, subgraphs and custom state keys
keeps every guarantee (order, each turn sees the earlier ones, atomic turns, the four policies); any chat
Runnable as the built-in graph's model; config passed through to the run; any lock of the protocol."""

from __future__ import annotations

import asyncio
import operator
import re
import subprocess
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.channels import DeltaChannel
from langgraph.errors import GraphRecursionError
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import interrupt
from typing_extensions import TypedDict

from chatkit import ExtractiveChatModel, KeyedLock, SessionBusy, SessionManager
from chatkit.experiments.agent import FakeToolCallingModel, build_tool_agent
from chatkit.locks import AsyncKeyLock
from chatkit.sessions import TurnInterrupted
from tests._session_helpers import conversation, pairs, reply_to, until
from tests.conftest import FakeClock


class ToolGates:
    """An async tool ``lookup``: each query waits until the test releases it (or fails once released)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.events: dict[str, asyncio.Event] = {}
        self.failing: set[str] = set()

    def event(self, query: str) -> asyncio.Event:
        return self.events.setdefault(query, asyncio.Event())

    def release(self, *queries: str) -> None:
        for q in queries:
            self.event(q).set()

    def tool(self) -> Any:
        @tool
        async def lookup(query: str) -> str:
            """Look something up."""
            self.started.append(query)
            await self.event(query).wait()
            if query in self.failing:
                raise RuntimeError(f"lookup failed on {query!r}")
            return f"result for {query}"

        return lookup


def agent_manager(gates: ToolGates, **kwargs: Any) -> SessionManager:
    return SessionManager(graph=build_tool_agent(FakeToolCallingModel(), [gates.tool()]), **kwargs)


def turn_of(query: str) -> list[tuple[str, str]]:
    """What get_history shows of one agent turn (the tool call and its result are left out)."""
    return [("user", query), ("assistant", f"lookup: result for {query}")]


async def messages_of(manager: SessionManager, sid: str) -> list[str]:
    state = await manager.graph.aget_state({"configurable": {"thread_id": sid}})
    return [type(m).__name__ for m in state.values.get("messages", [])]


# ---------------------------------------------------------------- a tool-calling agent


async def test_a_tool_calling_agent_answers_concurrent_messages_in_arrival_order() -> None:
    gates = ToolGates()
    manager = agent_manager(gates)
    sid = await manager.create_session()
    queries = ["first", "second", "third"]
    tasks = [asyncio.create_task(manager.chat(sid, q)) for q in queries]
    await until(lambda: gates.started == ["first"] and manager.statistics().waiting == 2)
    gates.release(*reversed(queries))
    results = await asyncio.gather(*tasks)
    assert [r.turn for r in results] == [1, 2, 3]
    assert pairs(await manager.get_history(sid)) == [p for q in queries for p in turn_of(q)]
    assert gates.started == queries
    assert await messages_of(manager, sid) == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"] * 3
    state = await manager.graph.aget_state({"configurable": {"thread_id": sid}})
    assert state.next == ()


@pytest.mark.parametrize("how", ["tool error", "cancelled in the tool", "turn_timeout in the tool"])
async def test_a_failed_agent_turn_leaves_no_dangling_message_or_tool_result(how: str, loop_clock: FakeClock) -> None:
    gates = ToolGates()
    manager = agent_manager(gates, turn_timeout=5)
    sid = await manager.create_session()
    gates.release("before")
    await manager.chat(sid, "before")
    before = await messages_of(manager, sid)
    if how == "tool error":
        gates.failing.add("doomed")
        gates.release("doomed")
        with pytest.raises(RuntimeError, match="lookup failed"):
            await manager.chat(sid, "doomed")
    else:
        task = asyncio.create_task(manager.chat(sid, "doomed"))
        await until(lambda: "doomed" in gates.started)  # the model called the tool; it runs
        if how == "cancelled in the tool":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await loop_clock.advance_and_settle(6)
            with pytest.raises(TimeoutError, match="turn_timeout=5 s; nothing was saved"):
                await task
    assert await messages_of(manager, sid) == before  # no user message, no tool call, no tool result
    assert pairs(await manager.get_history(sid)) == turn_of("before")
    gates.release("after")
    assert (await manager.chat(sid, "after")).turn == 2


@pytest.mark.parametrize("policy", ["interrupt", "rollback"])
async def test_interrupt_and_rollback_work_on_an_agent(policy: str) -> None:
    gates = ToolGates()
    manager = agent_manager(gates)
    sid = await manager.create_session()
    first = asyncio.create_task(manager.chat(sid, "first"))
    await until(lambda: gates.started == ["first"])  # inside its tool call
    gates.release("second")
    result = await manager.chat(sid, "second", policy=policy)
    with pytest.raises(TurnInterrupted) as info:
        await first
    if policy == "interrupt":  # the user message stays (through the messages reducer), the tool call does not
        assert info.value.kept_message and result.turn == 2
        assert pairs(await manager.get_history(sid)) == [("user", "first"), *turn_of("second")]
        assert await messages_of(manager, sid) == ["HumanMessage", "HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    else:
        assert not info.value.kept_message and result.turn == 1
        assert pairs(await manager.get_history(sid)) == turn_of("second")


async def test_reject_works_on_an_agent() -> None:
    gates = ToolGates()
    manager = agent_manager(gates, policy="reject")
    sid = await manager.create_session()
    first = asyncio.create_task(manager.chat(sid, "first"))
    await until(lambda: gates.started == ["first"])
    with pytest.raises(SessionBusy):
        await manager.chat(sid, "second")
    gates.release("first")
    await first
    assert pairs(await manager.get_history(sid)) == turn_of("first")


async def test_an_agent_turn_streams_its_answer() -> None:
    gates = ToolGates()
    gates.release("where")
    manager = agent_manager(gates)
    sid = await manager.create_session()
    chunks = [c async for c in manager.stream(sid, "where")]
    assert "".join(chunks) == "lookup: result for where"
    assert len(chunks) > 1
    assert pairs(await manager.get_history(sid)) == turn_of("where")


async def test_a_tool_that_chats_on_its_own_session_fails_at_once() -> None:
    errors: list[str] = []

    @tool
    async def recurse(query: str) -> str:
        """Ask the same session again (a mistake: it would wait for this very turn)."""
        try:
            await manager.chat(sid, "from the tool")
        except RuntimeError as exc:
            errors.append(str(exc))
            return "refused"
        return "not refused"

    # (without the check, the tool's chat() would wait lock_timeout for its own turn, then fail it)
    manager = SessionManager(graph=build_tool_agent(FakeToolCallingModel(), [recurse]), lock_timeout=30)
    sid = await manager.create_session()
    assert (await manager.chat(sid, "go")).reply == "recurse: refused"
    assert len(errors) == 1 and "from inside a turn of that same session" in errors[0]


# ---------------------------------------------------------------- custom state keys, several nodes, subgraphs


class Notes(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    log: Annotated[list[str], operator.add]  # a non-idempotent reducer: applied twice, it would double
    turns: int  # a plain value the graph keeps across turns
    note: str  # written by the subgraph


class SubState(TypedDict):
    turns: int
    note: str


def notes_graph() -> StateGraph:
    """``count`` (custom keys) -> ``summary`` (a subgraph) -> ``reply`` (sees everything)."""

    def count(state: Notes) -> dict[str, Any]:
        n = state.get("turns", 0) + 1
        return {"turns": n, "log": [f"turn {n}: {state['messages'][-1].text}"]}

    sub = StateGraph(SubState)
    sub.add_node("note", lambda state: {"note": f"the subgraph saw turn {state['turns']}"})
    sub.add_edge(START, "note")

    def reply(state: Notes) -> dict[str, Any]:
        seen = [m.text for m in state["messages"] if isinstance(m, HumanMessage)]
        return {"messages": [AIMessage(f"turn {state['turns']}, log {len(state['log'])}, {state['note']}, seen {seen}")]}

    builder = StateGraph(Notes)
    builder.add_node("count", count)
    builder.add_node("summary", sub.compile())
    builder.add_node("reply", reply)
    builder.add_edge(START, "count")
    builder.add_edge("count", "summary")
    builder.add_edge("summary", "reply")
    builder.add_edge("reply", END)
    return builder


@pytest.mark.parametrize("how", ["StateGraph", "builder function"])
async def test_custom_state_keys_subgraphs_and_reducers_carry_over_exactly(how: str) -> None:
    manager = SessionManager(graph=notes_graph() if how == "StateGraph" else notes_graph)
    sid = await manager.create_session()
    results = await asyncio.gather(*(manager.chat(sid, q) for q in ("a", "b", "c")))
    assert [r.reply for r in results] == [
        "turn 1, log 1, the subgraph saw turn 1, seen ['a']",
        "turn 2, log 2, the subgraph saw turn 2, seen ['a', 'b']",
        "turn 3, log 3, the subgraph saw turn 3, seen ['a', 'b', 'c']",
    ]
    state = await manager.graph.aget_state({"configurable": {"thread_id": sid}})
    assert state.values["turns"] == 3
    assert state.values["log"] == ["turn 1: a", "turn 2: b", "turn 3: c"]  # each reduced exactly once
    assert state.next == ()


async def test_a_cancelled_turn_leaves_custom_keys_as_they_were() -> None:
    """The turn is cancelled in its last node, after ``count`` and the subgraph changed every custom key."""
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow(state: Notes) -> dict[str, Any]:
        entered.set()
        await gate.wait()
        return {"log": ["slow"]}

    def graph() -> StateGraph:
        builder = notes_graph()
        builder.add_node("slow", slow)
        builder.add_edge("reply", "slow")  # reply -> END and reply -> slow: slow runs after the reply
        return builder

    manager = SessionManager(graph=graph)
    sid = await manager.create_session()
    gate.set()
    await manager.chat(sid, "a")
    before = (await manager.graph.aget_state({"configurable": {"thread_id": sid}})).values
    gate.clear()
    entered.clear()
    task = asyncio.create_task(manager.chat(sid, "b"))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = (await manager.graph.aget_state({"configurable": {"thread_id": sid}})).values
    assert after == before
    assert before["turns"] == 1 and before["log"] == ["turn 1: a", "slow"]


async def test_a_graph_that_stops_at_interrupt_saves_nothing() -> None:
    def ask(state: MessagesState) -> dict[str, Any]:
        answer = interrupt("which order?")
        return {"messages": [AIMessage(f"order {answer}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    manager = SessionManager(graph=builder)
    sid = await manager.create_session()
    with pytest.raises(RuntimeError, match=r"stopped at interrupt\(\).*nothing was saved"):
        await manager.chat(sid, "hello")
    assert await manager.get_history(sid) == []


async def test_a_graph_that_does_not_reply_saves_nothing() -> None:
    builder = StateGraph(MessagesState)
    builder.add_node("echo", lambda state: {"messages": [HumanMessage("not a reply")]})
    builder.add_edge(START, "echo")
    manager = SessionManager(graph=builder)
    sid = await manager.create_session()
    with pytest.raises(TypeError, match="must end a turn with an AIMessage"):
        await manager.chat(sid, "hello")
    assert await manager.get_history(sid) == []


def _compiled() -> Any:
    return build_tool_agent(FakeToolCallingModel(), [ToolGates().tool()]).compile()


class NoMessages(TypedDict):
    question: str


class Delta(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    events: Annotated[list[str], DeltaChannel(operator.add)]


def _graph_of(schema: type) -> StateGraph:
    builder = StateGraph(schema)
    builder.add_node("n", lambda state: {})
    builder.add_edge(START, "n")
    return builder


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"graph": "agent"}, TypeError, "StateGraph or a function returning one, got 'agent'"),
        ({"graph": _compiled()}, TypeError, "not a compiled graph.*pass graph.builder"),
        ({"graph": lambda: 42}, TypeError, "must return an uncompiled StateGraph, got 42"),
        ({"graph": _graph_of(NoMessages)}, ValueError, "no 'messages' channel.*question"),
        ({"graph": _graph_of(Delta)}, ValueError, r"\['events'\] are DeltaChannels"),
        ({"graph": _graph_of(MessagesState), "model": ExtractiveChatModel()}, ValueError, "model configure the built-in graph"),
        ({"graph": _graph_of(MessagesState), "retrieve_k": 2}, ValueError, "retrieve_k configure"),
    ],
)
def test_bad_graphs_are_refused(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        SessionManager(**kwargs)


# ---------------------------------------------------------------- any chat Runnable as the model


class Flaky(ExtractiveChatModel):
    failures: int = 1

    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("the provider hiccuped")
        return await super()._agenerate(*args, **kwargs)


def _runnables() -> dict[str, Any]:
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), MessagesPlaceholder("messages")])
    return {
        "bind": ExtractiveChatModel().bind(stop=["zzz"]),
        "with_retry": Flaky().with_retry(stop_after_attempt=2, wait_exponential_jitter=False),
        "with_fallbacks": Flaky(failures=10).with_fallbacks([ExtractiveChatModel()]),
        "prompt | model": prompt | ExtractiveChatModel(),
        "bind_tools": FakeToolCallingModel().bind_tools([ToolGates().tool()]).with_config(tags=["x"]),
    }


@pytest.mark.parametrize("name", list(_runnables()))
async def test_any_chat_runnable_works_as_the_model(name: str) -> None:
    manager = SessionManager(model=_runnables()[name])
    sid = await manager.create_session()
    first = await manager.chat(sid, "hello")
    second = await manager.chat(sid, "again")
    if name == "bind_tools":  # the built-in graph has no tool node: the tool call is the (empty) reply
        assert first.reply == second.reply == ""
        return
    assert [first.reply, second.reply] == [reply_to("hello", 1), reply_to("again", 2)]
    assert pairs(await manager.get_history(sid)) == conversation("hello", "again")


async def test_a_generic_fake_chat_model_streams_through_the_built_in_graph() -> None:
    model = GenericFakeChatModel(messages=iter(["one two three"]))
    manager = SessionManager(model=model)
    sid = await manager.create_session()
    assert [c async for c in manager.stream(sid, "go")] == ["one", " ", "two", " ", "three"]


# ---------------------------------------------------------------- config passes through to the run


class Recorder(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.chains: list[tuple[str, list[str], dict[str, Any]]] = []
        self.models = 0

    async def on_chain_start(self, serialized: Any, inputs: Any, *, tags: Any = None, metadata: Any = None,
                             **kwargs: Any) -> None:
        self.chains.append((kwargs.get("name") or "", list(tags or []), dict(metadata or {})))

    async def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.models += 1


@pytest.mark.parametrize("how", ["chat", "stream"])
async def test_callbacks_tags_and_metadata_reach_the_run(how: str) -> None:
    manager = SessionManager()
    sid = await manager.create_session()
    recorder = Recorder()
    config = {"callbacks": [recorder], "tags": ["web"], "metadata": {"user": "u1"}, "run_name": "support turn"}
    if how == "chat":
        await manager.chat(sid, "hello", config=config)
    else:
        [c async for c in manager.stream(sid, "hello", config=config)]
    name, tags, metadata = recorder.chains[0]
    assert name == "support turn" and "web" in tags and metadata["user"] == "u1"
    assert recorder.models == 1
    assert len(recorder.chains) > 1  # the nodes too


async def test_recursion_limit_reaches_the_run_and_nothing_is_saved() -> None:
    gates = ToolGates()
    gates.release("loop")
    manager = agent_manager(gates)
    sid = await manager.create_session()
    with pytest.raises(GraphRecursionError):
        await manager.chat(sid, "loop", config={"recursion_limit": 2})
    assert await manager.get_history(sid) == []
    assert (await manager.chat(sid, "loop")).reply == "lookup: result for loop"


@pytest.mark.parametrize(
    ("config", "error", "pattern"),
    [
        ("tags", TypeError, "config must be a RunnableConfig"),
        ({"tag": ["x"]}, ValueError, r"unknown keys \['tag'\]"),
        ({"configurable": {"thread_id": "other"}}, ValueError, r"\['thread_id'\] is set by SessionManager"),
        ({"configurable": {"checkpoint_id": "x"}}, ValueError, "checkpoint_id"),
        ({"configurable": []}, TypeError, "must be a dict"),
    ],
)
async def test_bad_configs_are_refused_and_nothing_changes(config: Any, error: type[Exception], pattern: str) -> None:
    manager = SessionManager()
    sid = await manager.create_session()
    with pytest.raises(error, match=pattern):
        await manager.chat(sid, "hello", config=config)
    assert await manager.get_history(sid) == [] and not manager.is_busy(sid)


async def test_configurable_values_reach_the_nodes() -> None:
    seen: list[Any] = []

    def node(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        seen.append(config["configurable"].get("user_id"))
        return {"messages": [AIMessage("ok")]}

    builder = StateGraph(MessagesState)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    manager = SessionManager(graph=builder)
    sid = await manager.create_session()
    await manager.chat(sid, "hello", config={"configurable": {"user_id": "u7"}})
    assert seen == ["u7"]


# ---------------------------------------------------------------- any lock of the protocol


class PlainLock:
    """A per-key lock written against the protocol only: asyncio.Lock per key, fencing tokens."""

    def __init__(self) -> None:
        self.locks: dict[Hashable, asyncio.Lock] = {}
        self.tokens = 0
        self.observers: list[Any] = []
        self.acquired: list[Hashable] = []

    def __call__(self, key: Hashable = None, /, *more: Hashable, timeout: float | None = None,
                 label: str | None = None) -> Any:
        return _PlainRequest(self, (key, *more), timeout)

    async def run(self, keys: Any, fn: Any, *args: Any, timeout: float | None = None, label: str | None = None,
                  **kwargs: Any) -> Any:
        async with self(*(keys if isinstance(keys, list) else [keys]), timeout=timeout):
            return fn(*args, **kwargs)

    def add_observer(self, observer: Any) -> None:
        self.observers.append(observer)

    def remove_observer(self, observer: Any) -> None:
        self.observers.remove(observer)


class _PlainRequest:
    def __init__(self, lock: PlainLock, keys: tuple[Hashable, ...], timeout: float | None) -> None:
        self.lock, self.keys, self.timeout = lock, keys, timeout
        self._token: int | None = None

    @property
    def token(self) -> int | None:
        return self._token

    async def __aenter__(self) -> None:
        inner = self.lock.locks.setdefault(self.keys[0], asyncio.Lock())
        await asyncio.wait_for(inner.acquire(), self.timeout)
        self.lock.tokens += 1
        self._token = self.lock.tokens
        self.lock.acquired.append(self.keys[0])

    async def __aexit__(self, *exc: Any) -> None:
        self.lock.locks[self.keys[0]].release()


async def test_any_lock_of_the_protocol_serializes_turns_and_its_tokens_are_stored() -> None:
    lock = PlainLock()
    assert isinstance(lock, AsyncKeyLock)
    gates = ToolGates()
    manager = agent_manager(gates, lock=lock)
    assert manager.lock is lock
    sid = await manager.create_session()
    tasks = [asyncio.create_task(manager.chat(sid, q)) for q in ("a", "b", "c")]
    await until(lambda: gates.started == ["a"] and manager.statistics().waiting == 2)
    gates.release("c", "b", "a")
    await asyncio.gather(*tasks)
    assert pairs(await manager.get_history(sid)) == [p for q in "abc" for p in turn_of(q)]
    assert lock.acquired == [sid] * 3
    fences = [t.metadata.get("chatkit_fence") async for t in manager.checkpointer.alist({"configurable": {"thread_id": sid}})]
    assert fences[:3] == [3, 2, 1]  # newest first: each commit carries its acquisition's token


async def test_the_default_lock_is_a_new_keyed_lock_and_tokens_are_stored() -> None:
    manager = SessionManager()
    assert isinstance(manager.lock, KeyedLock) and manager.lock is not SessionManager().lock
    sid = await manager.create_session()
    await manager.chat(sid, "hello")
    head = await manager.checkpointer.aget_tuple({"configurable": {"thread_id": sid}})
    assert isinstance(head.metadata["chatkit_fence"], int)
    assert [m.type for m in head.checkpoint["channel_values"]["messages"]] == ["human", "ai"]
    assert not any(isinstance(m, ToolMessage) for m in head.checkpoint["channel_values"]["messages"])


def test_the_readme_agent_example_prints_what_the_readme_says() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("### Your own graph: a tool-calling agent")
    section = readme[start : readme.index("\n### ", start + 10)]
    code, expected = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout == expected
