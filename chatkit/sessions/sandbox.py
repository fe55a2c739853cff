"""How a turn is computed without writing anything, and the checkpoints a commit writes.

A turn runs the session's graph (compiled without a checkpointer) on a :class:`TurnSandbox`: a
checkpoint saver that starts from the thread's latest checkpoint, as read from the real saver, and keeps
whatever the run saves in memory (no serialisation), so the run sees exactly the thread's state (every
channel, custom keys included, nothing re-reduced) and LangGraph applies the new message with the
channel's own reducer, as in any checkpointed run. When the run ends, :meth:`TurnSandbox.result` gives
its final checkpoint as a :class:`TurnWrite`: the *whole* state after the turn, which one commit then
stores as a new checkpoint whose parent is the one the turn started from (LangGraph's time travel: a
fork of that checkpoint). Reducers ran once, inside the run; the commit only copies their result.

The other writes a session needs are built here too, each a whole checkpoint: :func:`initial_write`
(a new, empty session), :func:`kept_message_write` (policy ``interrupt``: the start state plus the user
message, through the channel's reducer) and :func:`revert_write` (the start state again, on top of a
commit whose caller went away while it was written).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.channels.base import BaseChannel
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    copy_checkpoint,
    empty_checkpoint,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.base.id import uuid6

__all__ = ["TurnWrite", "TurnSandbox", "initial_write", "kept_message_write", "revert_write"]

_INTERRUPT = "__interrupt__"  # the channel LangGraph's interrupt() writes to


@dataclass(frozen=True, slots=True)
class TurnWrite:
    """One checkpoint to commit: the whole state (``checkpoint["channel_values"]``: every channel's value),
    its metadata, and the channels whose version it moved (``new_versions``, what a saver stores anew).

    Attributes:
        checkpoint: the checkpoint, with a fresh id (time-ordered: the newest checkpoint is the thread's head).
        metadata: its metadata (``source``, ``step``, ``parents``, chatkit's keys).
        new_versions: the channel versions that differ from the parent checkpoint's.
    """

    checkpoint: Checkpoint
    metadata: CheckpointMetadata
    new_versions: ChannelVersions

    @property
    def checkpoint_id(self) -> str:
        """The id the new checkpoint will have."""
        return self.checkpoint["id"]


def _fresh(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` with a new id and time: ids are time-ordered, so it becomes the thread's newest."""
    checkpoint["id"] = str(uuid6(clock_seq=0))
    checkpoint["ts"] = datetime.now(UTC).isoformat()
    return checkpoint


def initial_write(metadata: CheckpointMetadata) -> TurnWrite:
    """The first checkpoint of a new session: an empty state."""
    return TurnWrite(_fresh(empty_checkpoint()), {"source": "input", "step": -1, "parents": {}, **metadata}, {})


def kept_message_write(
    start: CheckpointTuple,
    channel: BaseChannel,
    message: Any,
    saver: BaseCheckpointSaver,
    metadata: CheckpointMetadata,
) -> TurnWrite:
    """``start``'s state plus ``message`` in the ``messages`` channel, applied with the channel's reducer
    (``channel`` is the compiled graph's, empty, ``messages`` channel)."""
    checkpoint = copy_checkpoint(start.checkpoint)
    values = checkpoint["channel_values"]
    live = channel.from_checkpoint(values["messages"]) if "messages" in values else channel.copy()
    live.update([[message]])
    values["messages"] = live.checkpoint()
    version = saver.get_next_version(checkpoint["channel_versions"].get("messages"), None)
    checkpoint["channel_versions"]["messages"] = version
    checkpoint["updated_channels"] = ["messages"]
    meta: CheckpointMetadata = {
        **start.metadata,
        "source": "update",
        "step": int(start.metadata.get("step", -1)) + 1,
        **metadata,
    }
    return TurnWrite(_fresh(checkpoint), meta, {"messages": version})


def revert_write(
    start: CheckpointTuple,
    committed: TurnWrite,
    saver: BaseCheckpointSaver,
    metadata: CheckpointMetadata,
) -> TurnWrite:
    """A child of ``committed`` whose state is ``start``'s again.

    Every channel the commit changed gets a new version (versions never repeat within a thread: savers
    such as PostgreSQL's keep the first blob stored under a version), with ``start``'s value, or none.
    """
    start_cp = start.checkpoint
    checkpoint = copy_checkpoint(committed.checkpoint)
    before = start_cp["channel_versions"]
    versions = checkpoint["channel_versions"]
    new_versions: dict[str, Any] = {}
    for name in sorted(set(before) | set(versions)):
        if before.get(name) != versions.get(name):
            new_versions[name] = versions[name] = saver.get_next_version(versions.get(name), None)
    checkpoint["channel_values"] = dict(start_cp["channel_values"])
    checkpoint["updated_channels"] = sorted(new_versions)
    meta: CheckpointMetadata = {
        **start.metadata,
        "source": "update",
        "step": int(committed.metadata.get("step", -1)) + 1,
        **metadata,
    }
    return TurnWrite(_fresh(checkpoint), meta, new_versions)


class TurnSandbox(BaseCheckpointSaver[Any]):
    """The checkpointer of one turn's run: it starts from ``start`` and keeps what the run saves in memory.

    Reads of the root namespace return ``start`` (a copy: the run mutates what it gets) until the run
    saves, then its latest checkpoint; subgraphs get their own namespaces. Nothing is serialised and
    nothing reaches the real saver, whose ``serde`` and ``get_next_version`` it borrows so that channel
    versions continue the thread's own.

    Example:
        >>> import asyncio
        >>> from langgraph.checkpoint.memory import InMemorySaver
        >>> from langgraph.graph import START, MessagesState, StateGraph
        >>> from langchain_core.messages import AIMessage, HumanMessage
        >>> builder = StateGraph(MessagesState)
        >>> builder = builder.add_node("reply", lambda state: {"messages": [AIMessage("hi!")]})
        >>> builder = builder.add_edge(START, "reply")
        >>> sandbox = TurnSandbox(InMemorySaver(), start=None)
        >>> graph = builder.compile().copy(update={"checkpointer": sandbox})
        >>> _ = asyncio.run(graph.ainvoke({"messages": [HumanMessage("hello")]},
        ...                 {"configurable": {"thread_id": "t"}}, durability="exit"))
        >>> [m.content for m in sandbox.result({}).checkpoint["channel_values"]["messages"]]
        ['hello', 'hi!']
    """

    def __init__(self, saver: BaseCheckpointSaver, start: CheckpointTuple | None) -> None:
        super().__init__(serde=saver.serde)
        self._saver = saver
        self._start = start
        self._start_versions: ChannelVersions = dict(start.checkpoint["channel_versions"]) if start else {}
        self._saved: dict[str, CheckpointTuple] = {}
        self._interrupted = False

    def __repr__(self) -> str:
        return f"<TurnSandbox start={None if self._start is None else get_checkpoint_id(self._start.config)!r}>"

    def get_next_version(self, current: Any, channel: None) -> Any:
        return self._saver.get_next_version(current, channel)

    def _lookup(self, config: RunnableConfig) -> CheckpointTuple | None:
        ns = config["configurable"].get("checkpoint_ns", "")
        wanted = get_checkpoint_id(config)
        saved = self._saved.get(ns)
        if saved is not None and (wanted is None or wanted == get_checkpoint_id(saved.config)):
            return saved
        start = self._start
        if ns == "" and start is not None and (wanted is None or wanted == get_checkpoint_id(start.config)):
            return CheckpointTuple(
                start.config, copy_checkpoint(start.checkpoint), start.metadata, start.parent_config, []
            )
        return None

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._lookup(config)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._lookup(config)

    def list(self, config: RunnableConfig | None, **kwargs: Any) -> Iterator[CheckpointTuple]:
        return iter(())

    async def alist(self, config: RunnableConfig | None, **kwargs: Any) -> AsyncIterator[CheckpointTuple]:
        for item in ():
            yield item

    def put(
        self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata, new_versions: ChannelVersions
    ) -> RunnableConfig:
        conf = config["configurable"]
        ns = conf.get("checkpoint_ns", "")
        saved_config: RunnableConfig = {
            "configurable": {"thread_id": conf["thread_id"], "checkpoint_ns": ns, "checkpoint_id": checkpoint["id"]}
        }
        parent = config if get_checkpoint_id(config) else None
        self._saved[ns] = CheckpointTuple(saved_config, checkpoint, get_checkpoint_metadata(config, metadata), parent, [])
        return saved_config

    async def aput(
        self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata, new_versions: ChannelVersions
    ) -> RunnableConfig:
        return self.put(config, checkpoint, metadata, new_versions)

    def put_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        if config["configurable"].get("checkpoint_ns", "") == "" and any(c == _INTERRUPT for c, _ in writes):
            self._interrupted = True

    async def aput_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        self.put_writes(config, writes, task_id, task_path)

    def result(self, metadata: Mapping[str, Any]) -> TurnWrite:
        """The run's final state as a :class:`TurnWrite` on top of the start checkpoint.

        Raises:
            RuntimeError: the run stopped at ``interrupt()`` (a turn must run to the end), or saved nothing.
        """
        if self._interrupted:
            raise RuntimeError(
                "the graph stopped at interrupt(), waiting for human input; a SessionManager turn must run to "
                "the end, so nothing was saved"
            )
        saved = self._saved.get("")
        if saved is None:
            raise RuntimeError("the graph run saved no state; nothing was saved")
        checkpoint = saved.checkpoint
        before = self._start_versions
        new_versions = {k: v for k, v in checkpoint["channel_versions"].items() if before.get(k) != v}
        return TurnWrite(_fresh(checkpoint), {**saved.metadata, **metadata}, new_versions)
