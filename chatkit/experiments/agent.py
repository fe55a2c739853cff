"""A small tool-calling agent that runs offline: a fake tool-calling chat model and a ReAct-style graph.

:class:`FakeToolCallingModel` is LangChain's ``GenericFakeChatModel`` with ``bind_tools`` and fixed rules
instead of a script, so it answers any number of turns, in any order: to a user message it calls the
first bound tool with ``{"query": <the message>}``; to a tool's result it replies with that result.
:func:`build_tool_agent` is the usual agent loop as an uncompiled ``StateGraph``: ``agent`` (the model with
the tools bound) and ``tools`` (LangGraph's ``ToolNode``), looping while the model calls tools. Hand it
to :class:`~chatkit.SessionManager` as ``graph=``: every turn of a session then runs the whole loop
atomically (no user message without its reply, no tool result without the answer that used it).

Example:
    >>> import asyncio, chatkit
    >>> from langchain_core.tools import tool
    >>> from chatkit.experiments.agent import FakeToolCallingModel, build_tool_agent
    >>> @tool
    ... def order_status(query: str) -> str:
    ...     '''Where an order is.'''
    ...     return "order 42 ships tomorrow"
    >>> async def main():
    ...     graph = build_tool_agent(FakeToolCallingModel(), [order_status])
    ...     async with chatkit.SessionManager(graph=graph) as manager:
    ...         sid = await manager.create_session()
    ...         result = await manager.chat(sid, "Where is order 42?")
    ...         state = await manager.graph.aget_state({"configurable": {"thread_id": sid}})
    ...         return result.reply, [type(m).__name__ for m in state.values["messages"]]
    >>> asyncio.run(main())
    ('order_status: order 42 ships tomorrow', ['HumanMessage', 'AIMessage', 'ToolMessage', 'AIMessage'])
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import GenericFakeChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import Field

__all__ = ["FakeToolCallingModel", "build_tool_agent"]


class FakeToolCallingModel(GenericFakeChatModel):
    """An offline, deterministic tool-calling chat model (LangChain's ``GenericFakeChatModel`` with rules).

    * The last message is the user's and tools are bound: call the first tool with ``{"query": text}``.
    * The last message is a tool's result: reply ``"<tool name>: <result>"``.
    * Otherwise (no tools bound): reply ``"You said: <text>"``.

    Streams like ``GenericFakeChatModel`` (word by word), tool calls as one chunk.

    Example:
        >>> from langchain_core.messages import HumanMessage
        >>> from langchain_core.tools import tool
        >>> @tool
        ... def lookup(query: str) -> str:
        ...     '''Look something up.'''
        ...     return "found"
        >>> reply = FakeToolCallingModel().bind_tools([lookup]).invoke([HumanMessage("refunds?")])
        >>> [(c["name"], c["args"]) for c in reply.tool_calls]
        [('lookup', {'query': 'refunds?'})]
    """

    messages: Iterator[AIMessage | str] = Field(default_factory=lambda: iter(()))
    """Unused: the replies follow the rules above."""

    @property
    def _llm_type(self) -> str:
        return "chatkit-fake-tool-calling"

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind ``tools`` (OpenAI tool format); the model calls the first one."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _reply(self, messages: list[BaseMessage], tools: Sequence[dict[str, Any]]) -> AIMessage:
        last = messages[-1] if messages else HumanMessage("")
        if isinstance(last, ToolMessage):
            return AIMessage(f"{last.name or 'tool'}: {last.text}")
        if isinstance(last, HumanMessage) and tools:
            name = tools[0]["function"]["name"]
            call = {"name": name, "args": {"query": last.text}, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
            return AIMessage("", tool_calls=[call])
        return AIMessage(f"You said: {last.text}")

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages, kwargs.get("tools") or ()))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop, **kwargs)  # no thread pool: it is instant

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        message = self._reply(messages, kwargs.get("tools") or ())
        if not message.tool_calls:  # GenericFakeChatModel streams it word by word (it asks _generate again)
            yield from super()._stream(messages, stop, run_manager, **kwargs)
            return
        chunks = [
            {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
            for i, c in enumerate(message.tool_calls)
        ]
        yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=chunks, chunk_position="last"))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._stream(messages, stop, **kwargs):
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def build_tool_agent(model: Any, tools: Sequence[BaseTool | Callable[..., Any]]) -> StateGraph:
    """The agent loop as an uncompiled ``StateGraph`` over ``MessagesState``.

    ``agent`` calls ``model.bind_tools(tools)`` with the messages; while its reply calls tools, ``tools``
    (a ``ToolNode``) runs them and ``agent`` goes again; a reply without tool calls ends the turn.

    Raises:
        ValueError: no tools.
    """
    if not tools:
        raise ValueError("build_tool_agent needs at least one tool")
    bound = model.bind_tools(list(tools))

    async def agent(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        return {"messages": [await bound.ainvoke(state["messages"], config)]}

    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(list(tools)))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder
