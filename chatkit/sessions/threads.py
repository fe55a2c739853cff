"""Sessions as LangGraph threads in the checkpointer: the one durable record of a session.

A session is a thread with at least one checkpoint. Every checkpoint :class:`~chatkit.SessionManager`
writes carries, in its metadata, the marker ``chatkit: "session"`` (how :meth:`ThreadStore.scan` finds the
sessions of a shared checkpointer), when the session was last used (``chatkit_last_used``, on the
manager's clock: what idle expiry compares) and the fencing token of the lock acquisition that wrote it
(``chatkit_fence``). Nothing about which sessions exist lives only in memory: another manager given the
same checkpointer (after a restart, or in another process) sees the same sessions.

:meth:`ThreadStore.commit` is the only method that writes a session's state: every turn, the first
checkpoint of a new session, the message an interrupted turn keeps and the undoing of a commit whose
caller went away all go through it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple, get_checkpoint_id

from .pruning import can_prune, prune_thread
from .sandbox import TurnWrite

__all__ = ["ThreadStore", "SessionHead", "MARK_KEY", "MARK", "LAST_USED_KEY", "FENCE_KEY"]

logger = logging.getLogger(__name__)

MARK_KEY, MARK = "chatkit", "session"  # metadata of every checkpoint SessionManager writes
LAST_USED_KEY = "chatkit_last_used"  # the manager's clock when the checkpoint was written
FENCE_KEY = "chatkit_fence"  # the fencing token of the lock acquisition that wrote it (None: no lock)


def thread_config(thread_id: str) -> RunnableConfig:
    """The config that names the latest checkpoint of a thread's root namespace."""
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


@dataclass(frozen=True, slots=True)
class SessionHead:
    """What a scan learns about one session: when it was last used, and its newest checkpoint's id."""

    session_id: str
    last_used: float
    checkpoint_id: str


def last_used_of(saved: CheckpointTuple) -> float:
    """When the session was last used, from a checkpoint's metadata (or its timestamp, for a checkpoint
    written by other means, such as a raw ``graph.ainvoke`` on the thread)."""
    value = saved.metadata.get(LAST_USED_KEY) if saved.metadata else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return datetime.fromisoformat(saved.checkpoint["ts"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


class ThreadStore:
    """The sessions' threads in one checkpoint saver: read, commit, delete, prune, scan.

    Args:
        saver: the checkpoint saver (its async API is used).
        keep: the newest checkpoints kept per thread after each turn (``None``: keep all).

    Example:
        >>> import asyncio
        >>> from langgraph.checkpoint.memory import InMemorySaver
        >>> from chatkit.sessions.sandbox import initial_write
        >>> threads = ThreadStore(InMemorySaver(), keep=2)
        >>> async def main():
        ...     write = initial_write({MARK_KEY: MARK, LAST_USED_KEY: 5.0})
        ...     await threads.commit("s1", start=None, write=write, token=None)
        ...     return [(h.session_id, h.last_used) for h in await threads.scan()]
        >>> asyncio.run(main())
        [('s1', 5.0)]
    """

    def __init__(self, saver: BaseCheckpointSaver, *, keep: int | None) -> None:
        self.saver = saver
        self.keep = keep
        if keep is not None and not can_prune(saver):
            logger.info("%s cannot delete old checkpoints: sessions keep all of theirs", type(saver).__name__)

    def __repr__(self) -> str:
        return f"<ThreadStore saver={type(self.saver).__name__} keep={self.keep}>"

    async def read(self, thread_id: str) -> CheckpointTuple | None:
        """The thread's latest checkpoint (``None``: no such session)."""
        return await self.saver.aget_tuple(thread_config(thread_id))

    async def read_checkpoint(self, thread_id: str, checkpoint_id: str) -> CheckpointTuple | None:
        """One checkpoint of the thread, by id."""
        config = thread_config(thread_id)
        config["configurable"]["checkpoint_id"] = checkpoint_id
        return await self.saver.aget_tuple(config)

    async def commit(self, thread_id: str, *, start: str | None, write: TurnWrite, token: int | None) -> str:
        """Write ``write`` as the thread's new latest checkpoint, a child of checkpoint ``start``.

        This is the commit seam: the one place a session's state is written.

        Args:
            thread_id: the session's thread.
            start: the id of the checkpoint the turn started from, which must still be the thread's
                latest (``None``: the thread must have no checkpoint yet). Under the session's lock nobody
                else writes the thread, so it is; the naive service (``locking=False``) does not check.
            write: the whole state after the turn (every channel), its metadata and the channel
                versions it moved.
            token: the fencing token of the lock acquisition the turn holds (``None``: no lock, or a
                lock without tokens). Stored in the checkpoint's metadata.

        Returns:
            The new checkpoint's id.

        A store shared by several processes makes this a compare-and-set inside the database's
        transaction: refuse the write if the thread's latest checkpoint is no longer ``start`` or if a
        newer fencing token than ``token`` has written the thread.
        """
        config = thread_config(thread_id)
        if start is not None:
            config["configurable"]["checkpoint_id"] = start
        metadata = {**write.metadata, FENCE_KEY: token}
        saved = await self.saver.aput(config, write.checkpoint, metadata, write.new_versions)  # type: ignore[arg-type]
        return get_checkpoint_id(saved) or write.checkpoint_id

    async def delete(self, thread_id: str) -> None:
        """Delete the thread and all its checkpoints.

        Raises:
            NotImplementedError: the saver cannot delete threads.
        """
        await self.saver.adelete_thread(thread_id)

    async def prune(self, thread_id: str) -> None:
        """Keep the newest ``keep`` checkpoints of the thread (nothing to do with ``keep=None``)."""
        if self.keep is not None:
            await prune_thread(self.saver, thread_id, self.keep)

    async def scan(self) -> list[SessionHead]:
        """Every session in the saver, from its newest checkpoint written by a SessionManager.

        Reads every such checkpoint (a saver lists checkpoints, not threads): its cost grows with the
        number of sessions times ``keep``.
        """
        newest: dict[str, tuple[str, CheckpointTuple]] = {}
        async for saved in self.saver.alist(None, filter={MARK_KEY: MARK}):
            conf = saved.config["configurable"]
            if conf.get("checkpoint_ns", "") != "":
                continue
            thread_id, checkpoint_id = str(conf["thread_id"]), str(conf["checkpoint_id"])
            seen = newest.get(thread_id)
            if seen is None or checkpoint_id > seen[0]:
                newest[thread_id] = (checkpoint_id, saved)
        return [SessionHead(tid, last_used_of(saved), cid) for tid, (cid, saved) in newest.items()]
