"""The chat graph of :class:`~chatkit.SessionManager`: a LangGraph ``StateGraph`` over messages,
``retrieve`` (when a vector store is given) then ``generate``.

The state keeps the conversation (``messages``, merged by id with ``add_messages``; each message stored by
:class:`~chatkit.SessionManager` carries when it was written in ``response_metadata["chatkit_timestamp"]``)
and the chunks retrieved for the current turn (``context``). The
context reaches the model as a system message built by :func:`chatkit.models.format_context`, put in front
of the conversation for that one call and never stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AnyMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from ..models import format_context, last_user_text

if TYPE_CHECKING:
    from langchain_core.vectorstores import VectorStore

    from ..timeline import Timeline

__all__ = ["ChatState", "build_chat_graph", "WHO_KEY", "SESSION_KEY", "GENERATE"]

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
    model: BaseChatModel,
    store: VectorStore | None = None,
    retrieve_k: int = 4,
    timeline: Timeline | None = None,
) -> StateGraph:
    """The uncompiled graph: ``START -> retrieve -> generate -> END`` (``START -> generate`` without a store).

    ``retrieve`` asks ``store.as_retriever(search_kwargs={"k": retrieve_k})`` with the last user message;
    ``generate`` calls ``model`` with the context system message (if any chunks came back) and the whole
    conversation, and appends the reply.
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
        return {"messages": [reply]}

    builder.add_node(GENERATE, generate)
    builder.add_edge(GENERATE, END)
    return builder
