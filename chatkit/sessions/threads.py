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

On a fenced saver (:mod:`chatkit.sessions.fencing`) every step is fenced: a commit is a compare-and-set on
the checkpoint the turn started from (and, with ``shared_tokens``, is refused when a newer lock holder
has claimed the thread); a new lock holder claims the thread before it reads it; deletes and prunes are
refused for a stale token. Each refusal is :class:`~chatkit.StaleCommit`, and changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple, get_checkpoint_id

from .fencing import fence, is_fenced
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
    """The sessions' threads in one checkpoint saver: read, claim, commit, delete, prune, scan.

    Args:
        saver: the checkpoint saver (its async API is used).
        keep: the newest checkpoints kept per thread after each turn (``None``: keep all).
        fence_writes: fence every write when ``saver`` is a fenced saver (``False``: the naive service,
            whose writes are plain).
        shared_tokens: the lock's fencing tokens order every writer of the saver (a cross-process lock):
            fence with them and claim threads; otherwise writes are fenced by compare-and-set only.

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

    def __init__(
        self, saver: BaseCheckpointSaver, *, keep: int | None, fence_writes: bool = True, shared_tokens: bool = False
    ) -> None:
        self.saver = saver
        self.keep = keep
        self.fenced = fence_writes and is_fenced(saver)
        self._tokens = self.fenced and shared_tokens
        if keep is not None and not can_prune(saver):
            logger.info("%s cannot delete old checkpoints: sessions keep all of theirs", type(saver).__name__)

    def __repr__(self) -> str:
        fencing = "tokens" if self._tokens else "compare-and-set" if self.fenced else "none"
        return f"<ThreadStore saver={type(self.saver).__name__} keep={self.keep} fencing={fencing}>"

    def _fence_token(self, token: int | None) -> int | None:
        return token if self._tokens else None

    async def read(self, thread_id: str) -> CheckpointTuple | None:
        """The thread's latest checkpoint (``None``: no such session)."""
        return await self.saver.aget_tuple(thread_config(thread_id))

    async def read_checkpoint(self, thread_id: str, checkpoint_id: str) -> CheckpointTuple | None:
        """One checkpoint of the thread, by id."""
        config = thread_config(thread_id)
        config["configurable"]["checkpoint_id"] = checkpoint_id
        return await self.saver.aget_tuple(config)

    async def claim(self, thread_id: str, token: int | None) -> None:
        """A new lock holder raises the thread's newest token to its own, before it reads the thread.

        A holder that lost the lock earlier is then refused whatever it writes, even before this one
        commits. Nothing to do without shared tokens.

        Raises:
            StaleCommit: ``token`` is older than the thread's newest (this holder lost its lock already).
        """
        if self._tokens and token is not None:
            await self.saver.aclaim_thread(thread_id, token=token)  # type: ignore[attr-defined]

    async def commit(self, thread_id: str, *, start: str | None, write: TurnWrite, token: int | None) -> str:
        """Write ``write`` as the thread's new latest checkpoint, a child of checkpoint ``start``.

        This is the commit seam: the one place a session's state is written.

        Args:
            thread_id: the session's thread.
            start: the id of the checkpoint the turn started from, which must still be the thread's
                latest (``None``: the thread must have no checkpoint yet). On a fenced saver this is
                checked in the transaction that writes (a compare-and-set); on a plain one the session's
                lock is what makes it so, and the naive service (``locking=False``) does not check.
            write: the whole state after the turn (every channel), its metadata and the channel
                versions it moved.
            token: the fencing token of the lock acquisition the turn holds (``None``: no lock, or a
                lock without tokens). Stored in the checkpoint's metadata; with shared tokens, a fenced
                saver refuses the write if a newer token has claimed or written the thread.

        Returns:
            The new checkpoint's id.

        Raises:
            StaleCommit: (fenced saver) the thread's head is no longer ``start``, or ``token`` is stale;
                nothing was written.
        """
        config = thread_config(thread_id)
        if start is not None:
            config["configurable"]["checkpoint_id"] = start
        if self.fenced:
            config = fence(config, token=self._fence_token(token))
        metadata = {**write.metadata, FENCE_KEY: token}
        saved = await self.saver.aput(config, write.checkpoint, metadata, write.new_versions)  # type: ignore[arg-type]
        return get_checkpoint_id(saved) or write.checkpoint_id

    async def delete(self, thread_id: str, *, token: int | None = None) -> None:
        """Delete the thread and all its checkpoints (fenced: unless ``token`` is stale).

        Raises:
            NotImplementedError: the saver cannot delete threads.
            StaleCommit: (fenced saver, shared tokens) ``token`` is older than the thread's newest.
        """
        if self.fenced:
            await self.saver.adelete_thread_fenced(thread_id, token=self._fence_token(token))  # type: ignore[attr-defined]
        else:
            await self.saver.adelete_thread(thread_id)

    async def prune(self, thread_id: str, *, token: int | None = None) -> None:
        """Keep the newest ``keep`` checkpoints of the thread (nothing to do with ``keep=None``).

        Raises:
            StaleCommit: (fenced saver, shared tokens) ``token`` is older than the thread's newest.
        """
        if self.keep is None:
            return
        if self.fenced:
            await self.saver.aprune_thread_fenced(thread_id, keep=self.keep, token=self._fence_token(token))  # type: ignore[attr-defined]
        else:
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
