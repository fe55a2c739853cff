"""Checkpoint savers that refuse a stale write: commits that cannot go stale, across processes.

A lock serializes the writers of a thread while it holds. It cannot stop a writer that lost the lock
without noticing (paused past its lease, cut off) from writing late, nor a writer that never took it.
The savers here check every *fenced* write inside the database transaction that stores it, and refuse
it with :class:`~chatkit.StaleCommit` when

* its **fencing token** is older than the newest token the thread has seen (a newer lock holder has
  written since), or
* the thread's **head** (its latest checkpoint in the write's namespace) is no longer the checkpoint the
  write was computed from: a compare-and-set on the head.

A refused write stores nothing; every committed checkpoint stays.

How to fence a write: pass the config the work started from through :func:`fence`::

    read = await saver.aget_tuple(thread)                     # the head the turn starts from (or None)
    ...                                                      # compute, holding the lock
    start = read.config if read is not None else thread      # no checkpoint yet: the thread must stay empty
    await graph.aupdate_state(fence(start, token=request.token), values, as_node=...)

``fence`` records, in ``config["configurable"]`` (keys starting with ``__``, which LangGraph neither stores
in checkpoint metadata nor drops on the way to ``aput``):

* the *base*: the config's ``checkpoint_id`` (absent: the thread must have no checkpoint yet);
* the *token* (``None``: no token check, only the compare-and-set);
* the *writer*: who writes (``token:<token>``, or a random id per ``fence`` call without a token).

The rules, for a fenced write of a new checkpoint whose parent is ``P`` (the ``checkpoint_id`` LangGraph
passes to ``aput``), checked under a row lock on the thread's fence row:

1. token older than the thread's newest token: refused (``reason="token"``);
2. the thread's last fenced write came from the same writer (a run that writes several checkpoints, or
   a second commit by the same lock holder): the head must still be ``P`` (it continues its own chain);
   otherwise the head must be the base;
3. the new checkpoint's id must sort after the head (else it would not become the latest).

Unfenced writes (no :func:`fence`) behave exactly as in the plain saver. Tokens must come from one lock
shared by every writer of the thread (one :class:`~chatkit.RedisKeyedLock` namespace; the in-process
:class:`~chatkit.KeyedLock` only within one process). Deleting a thread keeps its fence row, so a
lost holder cannot bring a deleted thread back. Pending writes (``aput_writes``) are not fenced: they
hang off a checkpoint and never move the head.

Savers: :class:`FencedInMemorySaver` (one process, for tests), ``FencedSqliteSaver`` (several processes
on one SQLite file; needs ``langgraph-checkpoint-sqlite``) and ``FencedPostgresSaver`` (needs
``chatkit[distributed]``); ``setup()`` creates their ``chatkit_fences`` table too.
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import ChannelVersions, Checkpoint, CheckpointMetadata
from langgraph.checkpoint.memory import InMemorySaver

from .._optional import optional_import
from ..errors import StaleCommit

__all__ = [
    "Fence",
    "fence",
    "read_fence",
    "FencedInMemorySaver",
    "FencedSqliteSaver",
    "FencedPostgresSaver",
    "FENCE_TABLE",
]

TOKEN_KEY = "__chatkit_fence_token__"
BASE_KEY = "__chatkit_fence_base__"
WRITER_KEY = "__chatkit_fence_writer__"
FENCE_TABLE = "chatkit_fences"
_NO_BASE = ""  # stored in the config for "the thread has no checkpoint yet"


@dataclass(frozen=True, slots=True)
class Fence:
    """What a fenced write carries (see :func:`fence`).

    Attributes:
        token: the lock's fencing token (``None``: compare-and-set only).
        base: the checkpoint id the work started from (``None``: the thread had no checkpoint).
        writer: who writes: ``token:<token>``, or a random id.
    """

    token: int | None
    base: str | None
    writer: str


def fence(config: RunnableConfig, *, token: int | None) -> RunnableConfig:
    """A copy of ``config`` whose checkpoint writes a fenced saver checks (see the module docstring).

    Args:
        config: the config the work started from: a checkpoint's config (``aget_tuple(...).config``,
            with its ``checkpoint_id``), or a thread config without one when the thread had no checkpoint.
        token: the lock request's fencing token (``request.token``), or ``None``.

    Raises:
        TypeError: ``config`` has no ``configurable`` mapping with a ``thread_id``, or ``token`` is not an
            int or None.

    Example:
        >>> cfg = fence({"configurable": {"thread_id": "t1", "checkpoint_id": "abc"}}, token=7)
        >>> read_fence(cfg)
        Fence(token=7, base='abc', writer='token:7')
    """
    configurable = config.get("configurable") if isinstance(config, dict) else None
    if not isinstance(configurable, dict) or "thread_id" not in configurable:
        raise TypeError(f"fence() needs a LangGraph config with configurable.thread_id, got {config!r}")
    if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
        raise TypeError(f"token must be an int (a lock request's token) or None, got {token!r}")
    base = configurable.get("checkpoint_id")
    writer = f"token:{token}" if token is not None else f"once:{secrets.token_hex(8)}"
    return {
        **config,
        "configurable": {
            **configurable,
            TOKEN_KEY: token,
            BASE_KEY: base if base else _NO_BASE,
            WRITER_KEY: writer,
        },
    }


def read_fence(config: RunnableConfig) -> Fence | None:
    """The :class:`Fence` a write's config carries, or ``None`` for an unfenced write."""
    configurable = config.get("configurable") or {}
    writer = configurable.get(WRITER_KEY)
    if writer is None:
        return None
    base = configurable.get(BASE_KEY)
    return Fence(token=configurable.get(TOKEN_KEY), base=base or None, writer=str(writer))


def judge(
    f: Fence,
    *,
    thread_id: str,
    parent: str | None,
    new_id: str,
    head: str | None,
    newest_token: int | None,
    last_writer: str | None,
) -> StaleCommit | None:
    """Apply the rules to one write; return the refusal, or ``None`` to accept it.

    Example:
        >>> f = Fence(token=3, base="b", writer="token:3")
        >>> judge(f, thread_id="t", parent="b", new_id="c", head="b", newest_token=5, last_writer="token:5").reason
        'token'
        >>> judge(f, thread_id="t", parent="b", new_id="c", head="b", newest_token=2, last_writer="token:2") is None
        True
    """
    if f.token is not None and newest_token is not None and f.token < newest_token:
        return StaleCommit(
            f"refused a stale write to thread {thread_id!r}: its fencing token {f.token} is older than {newest_token}, "
            "the newest this thread has seen (a newer lock holder has written since: this writer lost its lock); "
            "nothing of it was stored",
            thread_id=thread_id,
            reason="token",
            token=f.token,
            newest_token=newest_token,
            expected=f.base,
            head=head,
        )
    expected = parent if last_writer == f.writer else f.base
    if head != expected:
        where = "a thread with no checkpoint" if expected is None else f"checkpoint {expected!r}"
        now = "has no checkpoint" if head is None else f"is {head!r}"
        return StaleCommit(
            f"refused a stale write to thread {thread_id!r}: it was computed from {where} but the thread's head now "
            f"{now} (another writer committed first); nothing of it was stored",
            thread_id=thread_id,
            reason="head",
            token=f.token,
            newest_token=newest_token,
            expected=expected,
            head=head,
        )
    if head is not None and new_id <= head:
        return StaleCommit(
            f"refused a write to thread {thread_id!r}: its checkpoint id {new_id!r} does not sort after the head "
            f"{head!r}, so it would not become the latest (are the writers' clocks out of step?)",
            thread_id=thread_id,
            reason="order",
            token=f.token,
            newest_token=newest_token,
            expected=expected,
            head=head,
        )
    return None


def _newest(old: int | None, new: int | None) -> int | None:
    if old is None:
        return new
    if new is None:
        return old
    return max(old, new)


def _write_ids(config: RunnableConfig, checkpoint: Checkpoint) -> tuple[str, str, str | None, str]:
    c = config["configurable"]
    return str(c["thread_id"]), str(c.get("checkpoint_ns", "")), c.get("checkpoint_id"), str(checkpoint["id"])


# --------------------------------------------------------------------------------------------- in memory


class FencedInMemorySaver(InMemorySaver):
    """LangGraph's ``InMemorySaver`` that refuses stale fenced writes (one process; for tests and teaching).

    Raises:
        StaleCommit: from ``put``/``aput`` of a fenced write that is stale (see :mod:`chatkit.sessions.fencing`).

    Example:
        >>> from chatkit import StaleCommit
        >>> from chatkit.sessions.fencing import FencedInMemorySaver, fence
        >>> from langgraph.checkpoint.base import empty_checkpoint
        >>> saver = FencedInMemorySaver()
        >>> thread = {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}
        >>> first = saver.put(fence(thread, token=1), empty_checkpoint(), {}, {})
        >>> try:  # a second writer that also started from the empty thread
        ...     saver.put(fence(thread, token=2), empty_checkpoint(), {}, {})
        ... except StaleCommit as exc:
        ...     print(exc.reason, exc.expected, exc.head == first["configurable"]["checkpoint_id"])
        head None True
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fence_guard = threading.Lock()
        self._fences: dict[str, tuple[int | None, str]] = {}  # thread -> (newest token, last fenced writer)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        f = read_fence(config)
        if f is None:
            return super().put(config, checkpoint, metadata, new_versions)
        thread_id, ns, parent, new_id = _write_ids(config, checkpoint)
        raw_thread = config["configurable"]["thread_id"]  # InMemorySaver keys its storage by the id as given
        with self._fence_guard:
            saved = self.storage.get(raw_thread, {}).get(ns) or {}
            head = max(saved) if saved else None
            newest, writer = self._fences.get(thread_id, (None, None))
            refusal = judge(f, thread_id=thread_id, parent=parent, new_id=new_id, head=head, newest_token=newest, last_writer=writer)
            if refusal is not None:
                raise refusal
            result = super().put(config, checkpoint, metadata, new_versions)
            self._fences[thread_id] = (_newest(newest, f.token), f.writer)
            return result


# --------------------------------------------------------------------------------------------- SQLite and Postgres
# Built on first use: their base classes live in optional packages.

_SQLITE_FENCES = f"""
CREATE TABLE IF NOT EXISTS {FENCE_TABLE} (
    thread_id TEXT PRIMARY KEY,
    token INTEGER,
    writer TEXT NOT NULL DEFAULT ''
)"""

_POSTGRES_FENCES = f"""
CREATE TABLE IF NOT EXISTS {FENCE_TABLE} (
    thread_id TEXT PRIMARY KEY,
    token BIGINT,
    writer TEXT NOT NULL DEFAULT ''
)"""

_HEAD_SQL = "SELECT checkpoint_id FROM checkpoints WHERE thread_id = {p} AND checkpoint_ns = {p} ORDER BY checkpoint_id DESC LIMIT 1"


def _build_sqlite() -> type:
    import json

    from langgraph.checkpoint.base import get_checkpoint_metadata

    AsyncSqliteSaver = optional_import(
        "langgraph.checkpoint.sqlite.aio", extra="sqlite", feature="FencedSqliteSaver"
    ).AsyncSqliteSaver

    class FencedSqliteSaver(AsyncSqliteSaver):
        """LangGraph's ``AsyncSqliteSaver`` that refuses stale fenced writes; processes may share the file.

        A fenced ``aput`` runs in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock, shared by every
        process on the file): read the thread's fence row and head, check, insert the checkpoint, update
        the fence row, commit. Unfenced writes behave as in ``AsyncSqliteSaver``.

        Raises:
            StaleCommit: from ``aput`` of a fenced write that is stale (see :mod:`chatkit.sessions.fencing`).

        Example:
            >>> import asyncio, os, tempfile
            >>> from langgraph.checkpoint.base import empty_checkpoint
            >>> from chatkit.sessions.fencing import FencedSqliteSaver, fence
            >>> async def main(path):
            ...     async with FencedSqliteSaver.from_conn_string(path) as saver:
            ...         thread = {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}
            ...         head = await saver.aput(fence(thread, token=5), empty_checkpoint(), {}, {})
            ...         try:  # a writer whose lock is older than token 5 comes back late
            ...             await saver.aput(fence(head, token=4), empty_checkpoint(), {}, {})
            ...         except Exception as exc:
            ...             return type(exc).__name__, exc.reason
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     asyncio.run(main(os.path.join(tmp, "chat.sqlite")))
            ('StaleCommit', 'token')
        """

        _fences_ready = False

        async def setup(self) -> None:
            """Create LangGraph's tables and the ``chatkit_fences`` table (if missing)."""
            await super().setup()
            if self._fences_ready:
                return
            async with self.lock:
                if not self._fences_ready:
                    await self.conn.execute(_SQLITE_FENCES)
                    await self.conn.commit()
                    self._fences_ready = True

        async def aput(
            self,
            config: RunnableConfig,
            checkpoint: Checkpoint,
            metadata: CheckpointMetadata,
            new_versions: ChannelVersions,
        ) -> RunnableConfig:
            f = read_fence(config)
            if f is None:
                return await super().aput(config, checkpoint, metadata, new_versions)
            await self.setup()
            thread_id, ns, parent, new_id = _write_ids(config, checkpoint)
            # As AsyncSqliteSaver.aput (langgraph-checkpoint-sqlite 3.x), inside the fenced transaction.
            type_, serialized = self.serde.dumps_typed(checkpoint)
            serialized_metadata = json.dumps(get_checkpoint_metadata(config, metadata), ensure_ascii=False).encode(
                "utf-8", "ignore"
            )
            async with self.lock:
                await self.conn.execute("BEGIN IMMEDIATE")
                try:
                    async with self.conn.execute(
                        f"SELECT token, writer FROM {FENCE_TABLE} WHERE thread_id = ?", (thread_id,)
                    ) as cur:
                        row = await cur.fetchone()
                    async with self.conn.execute(_HEAD_SQL.format(p="?"), (thread_id, ns)) as cur:
                        found = await cur.fetchone()
                    newest, writer = (row[0], row[1]) if row else (None, None)
                    refusal = judge(
                        f,
                        thread_id=thread_id,
                        parent=parent,
                        new_id=new_id,
                        head=found[0] if found else None,
                        newest_token=newest,
                        last_writer=writer,
                    )
                    if refusal is not None:
                        raise refusal
                    await self.conn.execute(
                        "INSERT OR REPLACE INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, "
                        "parent_checkpoint_id, type, checkpoint, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (thread_id, ns, new_id, parent, type_, serialized, serialized_metadata),
                    )
                    await self.conn.execute(
                        f"INSERT INTO {FENCE_TABLE} (thread_id, token, writer) VALUES (?, ?, ?) "
                        "ON CONFLICT (thread_id) DO UPDATE SET token = excluded.token, writer = excluded.writer",
                        (thread_id, _newest(newest, f.token), f.writer),
                    )
                    await self.conn.commit()
                except BaseException:
                    await self.conn.rollback()
                    raise
            return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": new_id}}

    FencedSqliteSaver.__module__ = __name__
    return FencedSqliteSaver


# The cursor of the fenced transaction in progress, for the saver's own statements (see _cursor).
_FENCED_CURSOR: contextvars.ContextVar[tuple[object, Any] | None] = contextvars.ContextVar("chatkit_fenced_cursor", default=None)


def _build_postgres() -> type:
    AsyncPostgresSaver = optional_import(
        "langgraph.checkpoint.postgres.aio", extra="distributed", feature="FencedPostgresSaver"
    ).AsyncPostgresSaver

    class FencedPostgresSaver(AsyncPostgresSaver):
        """LangGraph's ``AsyncPostgresSaver`` that refuses stale fenced writes.

        A fenced ``aput`` runs in one transaction: lock the thread's fence row (``INSERT ... ON CONFLICT DO
        UPDATE ... RETURNING``, which serializes the thread's fenced writers), read the head, check, then
        store the checkpoint with ``AsyncPostgresSaver.aput``'s own statements on the same cursor, and
        update the fence row. The connection must be in autocommit mode, as ``AsyncPostgresSaver`` requires
        (``from_conn_string`` does this). Unfenced writes behave as in ``AsyncPostgresSaver``.

        Raises:
            StaleCommit: from ``aput`` of a fenced write that is stale (see :mod:`chatkit.sessions.fencing`).

        Example:
            >>> from chatkit.sessions.fencing import FencedPostgresSaver, fence
            >>> async def commit(dsn, thread, values, token):      # doctest: +SKIP
            ...     async with FencedPostgresSaver.from_conn_string(dsn) as saver:
            ...         await saver.setup()
            ...         ...  # graph.aupdate_state(fence(start, token=token), values, as_node=...)
        """

        async def setup(self) -> None:
            """Create LangGraph's tables (migrations) and the ``chatkit_fences`` table (if missing)."""
            await super().setup()
            async with self._cursor() as cur:
                await cur.execute(_POSTGRES_FENCES)

        @contextlib.asynccontextmanager
        async def _cursor(self, *, pipeline: bool = False) -> AsyncIterator[Any]:
            current = _FENCED_CURSOR.get()
            if current is not None and current[0] is self:
                yield current[1]  # inside this saver's fenced transaction: same cursor, same transaction
                return
            async with super()._cursor(pipeline=pipeline) as cur:
                yield cur

        async def aput(
            self,
            config: RunnableConfig,
            checkpoint: Checkpoint,
            metadata: CheckpointMetadata,
            new_versions: ChannelVersions,
        ) -> RunnableConfig:
            f = read_fence(config)
            if f is None:
                return await super().aput(config, checkpoint, metadata, new_versions)
            thread_id, ns, parent, new_id = _write_ids(config, checkpoint)
            async with self._cursor() as cur:
                if self.pipe:
                    await self.pipe.sync()  # the transaction must not take in what the pipeline queued
                async with cur.connection.transaction():
                    await cur.execute(
                        f"INSERT INTO {FENCE_TABLE} (thread_id) VALUES (%s) ON CONFLICT (thread_id) "
                        "DO UPDATE SET thread_id = EXCLUDED.thread_id RETURNING token, writer",
                        (thread_id,),
                    )
                    row = await cur.fetchone()
                    await cur.execute(_HEAD_SQL.format(p="%s"), (thread_id, ns))
                    found = await cur.fetchone()
                    refusal = judge(
                        f,
                        thread_id=thread_id,
                        parent=parent,
                        new_id=new_id,
                        head=found["checkpoint_id"] if found else None,
                        newest_token=row["token"],
                        last_writer=row["writer"] or None,
                    )
                    if refusal is not None:
                        raise refusal
                    entered = _FENCED_CURSOR.set((self, cur))
                    try:
                        result = await super().aput(config, checkpoint, metadata, new_versions)
                    finally:
                        _FENCED_CURSOR.reset(entered)
                    await cur.execute(
                        f"UPDATE {FENCE_TABLE} SET token = %s, writer = %s WHERE thread_id = %s",
                        (_newest(row["token"], f.token), f.writer, thread_id),
                    )
            return result

    FencedPostgresSaver.__module__ = __name__
    return FencedPostgresSaver


_BUILDERS = {"FencedSqliteSaver": _build_sqlite, "FencedPostgresSaver": _build_postgres}


def __getattr__(name: str) -> Any:
    builder = _BUILDERS.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = builder()
    globals()[name] = cls
    return cls
