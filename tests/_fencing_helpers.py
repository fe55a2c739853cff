"""A tiny message graph for the fencing tests: append one message as one checkpoint, read the history."""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def chat_graph(saver: BaseCheckpointSaver) -> Any:
    """One node that answers the last message (an ``ainvoke`` writes several checkpoints)."""
    builder = StateGraph(State)
    builder.add_node("reply", lambda s: {"messages": [AIMessage(f"reply to {s['messages'][-1].content}")]})
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=saver)


async def append_message(saver: BaseCheckpointSaver, config: RunnableConfig, text: str) -> RunnableConfig:
    """Commit one message on top of the checkpoint ``config`` names (one ``aupdate_state``: one checkpoint)."""
    result: RunnableConfig = await chat_graph(saver).aupdate_state(config, {"messages": [HumanMessage(text)]}, as_node="reply")
    return result


async def history(saver: BaseCheckpointSaver, thread_id: str) -> list[str]:
    """The texts of the thread's latest checkpoint."""
    saved = await saver.aget_tuple({"configurable": {"thread_id": thread_id}})
    if saved is None:
        return []
    return [m.content for m in saved.checkpoint["channel_values"].get("messages", [])]


async def chain(saver: BaseCheckpointSaver, thread_id: str) -> list[tuple[str, str | None]]:
    """Every checkpoint of the thread, oldest first, as ``(id, parent id)``."""
    rows = [
        (t.config["configurable"]["checkpoint_id"], None if t.parent_config is None else t.parent_config["configurable"]["checkpoint_id"])
        async for t in saver.alist({"configurable": {"thread_id": thread_id}})
    ]
    return rows[::-1]
