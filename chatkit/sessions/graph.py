"""The graphs of :class:`~chatkit.SessionManager`: the built-in one, a LangGraph ``StateGraph`` over messages,
``retrieve`` (when a vector store is given) then ``generate``; and the checks a caller's own graph passes.

The state keeps the conversation (``messages``, merged by id with ``add_messages``; each message stored by
:class:`~chatkit.SessionManager` carries when it was written in ``response_metadata["chatkit_timestamp"]``)
and the chunks retrieved for the latest turn (``context``, replaced by each turn). They reach the model as
a system message built by :func:`chatkit.models.format_context`, put in front of the conversation for that
one call; the system message itself is never stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

from langchain_core.documents import Document
from langchain_core.messages import AIMessage, AnyMessage, SystemMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.channels import DeltaChannel
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph

from ..models import format_context, last_user_text

if TYPE_CHECKING:
    from langchain_core.vectorstores import VectorStore

    from ..timeline import Timeline

__all__ = ["ChatState", "build_chat_graph", "check_graph", "WHO_KEY", "SESSION_KEY", "GENERATE"]

WHO_KEY = "chatkit_who"  # configurable: the request's label, for timeline spans
SESSION_KEY = "chatkit_session"  # configurable: the session id, for timeline spans
GENERATE = "generate"
RETRIEVE = "retrieve"


class ChatState(TypedDict, total=False):
    """The graph state: the conversation, and the chunks retrieved for the current turn."""

    messages: Annotated[list[AnyMessage], add_messages]
    context: list[Document]


def _span(timeline: Timeline | None, phase: str, config: RunnableConfig) -> contextlib.AbstractContextManager[None]:
    if timeline is None:
        return contextlib.nullcontext()
    conf = config.get("configurable") or {}
    key: Hashable | None = conf.get(SESSION_KEY, conf.get("thread_id"))
    return timeline.span(phase, who=conf.get(WHO_KEY), key=key)


def build_chat_graph(
    *,
    model: Runnable[Any, Any],
    store: VectorStore | None = None,
    retrieve_k: int = 4,
    timeline: Timeline | None = None,
) -> StateGraph:
    """The uncompiled graph: ``START -> retrieve -> generate -> END`` (``START -> generate`` without a store).

    ``retrieve`` asks ``store.as_retriever(search_kwargs={"k": retrieve_k})`` with the last user message;
    ``generate`` calls ``model`` (any chat model or chat Runnable: ``bind(...)``, ``with_retry()``,
    ``with_fallbacks(...)``, ``prompt | model``) with the list of messages, the context system message (if
    any chunks came back) first, and appends the reply (a ``str`` reply becomes an ``AIMessage``).
    """
    builder = StateGraph(ChatState)

    if store is not None:
        retriever = store.as_retriever(search_kwargs={"k": retrieve_k})

        async def retrieve(state: ChatState, config: RunnableConfig) -> dict[str, Any]:
            with _span(timeline, "search", config):
                docs = await retriever.ainvoke(last_user_text(state.get("messages", [])), config)
            return {"context": list(docs)}

        builder.add_node(RETRIEVE, retrieve)
        builder.add_edge(START, RETRIEVE)
        builder.add_edge(RETRIEVE, GENERATE)
    else:
        builder.add_edge(START, GENERATE)

    async def generate(state: ChatState, config: RunnableConfig) -> dict[str, Any]:
        messages: list[Any] = list(state.get("messages", []))
        docs = state.get("context") if store is not None else None
        if docs:
            messages.insert(0, SystemMessage(format_context(docs)))
        with _span(timeline, "model", config):
            reply = await model.ainvoke(messages, config)
        if isinstance(reply, str):  # e.g. prompt | model | StrOutputParser()
            reply = AIMessage(reply)
        return {"messages": [reply]}

    builder.add_node(GENERATE, generate)
    builder.add_edge(GENERATE, END)
    return builder


def check_graph(graph: object) -> StateGraph:
    """The caller's graph for :class:`~chatkit.SessionManager`: an uncompiled ``StateGraph`` (or a function of
    no arguments returning one) whose state has a ``messages`` channel that its input accepts.

    Raises:
        TypeError: not a ``StateGraph`` (a compiled graph is refused: pass its builder), or a builder function
            that returns something else.
        ValueError: no ``messages`` channel in the state or the input, or a ``DeltaChannel`` (whose history
            lives in old checkpoints, which sessions prune).
    """
    builder = graph
    if callable(graph) and not isinstance(graph, (StateGraph, CompiledStateGraph, Runnable)):
        builder = graph()
        if not isinstance(builder, StateGraph):
            raise TypeError(f"the graph builder function {graph!r} must return an uncompiled StateGraph, got {builder!r:.80}")
    if isinstance(builder, CompiledStateGraph):
        raise TypeError(
            f"graph must be the uncompiled StateGraph, not a compiled graph ({builder!r:.60}): SessionManager compiles "
            "it with its own checkpointer; pass graph.builder (or the StateGraph before .compile())"
        )
    if not isinstance(builder, StateGraph):
        raise TypeError(f"graph must be a LangGraph StateGraph or a function returning one, got {builder!r:.80}")
    compiled = builder.compile()
    if "messages" not in compiled.channels:
        raise ValueError(
            f"the graph's state has no 'messages' channel (it has {sorted(c for c in compiled.channels if not c.startswith(('__', 'branch:')))}); "
            "SessionManager sends each user message there, e.g. with MessagesState"
        )
    inputs = sorted(builder.schemas.get(builder.input_schema, {}))
    if "messages" not in inputs:
        raise ValueError(f"the graph's input schema does not accept 'messages' (it accepts {inputs})")
    delta = sorted(name for name, channel in compiled.channels.items() if isinstance(channel, DeltaChannel))
    if delta:
        raise ValueError(
            f"the graph's channels {delta} are DeltaChannels, whose state is rebuilt from old checkpoints; "
            "SessionManager prunes old checkpoints and does not support them"
        )
    return builder
