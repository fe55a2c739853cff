"""The fenced SQLite and PostgreSQL checkpoint savers (see :mod:`chatkit.sessions.fencing` for the rules).

Each class is built on first use (``build_sqlite()``, ``build_postgres()``), since its base class lives in
an optional package; import them as ``chatkit.FencedSqliteSaver`` / ``chatkit.FencedPostgresSaver`` (or
from :mod:`chatkit.sessions.fencing`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import ChannelVersions, Checkpoint, CheckpointMetadata

from .._optional import optional_import
from .fencing import DELETED, FENCE_TABLE, _newest, _write_ids, is_stale, judge, read_fence, stale_token
from .pruning import prune_postgres_rows, prune_sqlite_rows

__all__ = ["build_sqlite", "build_postgres"]

_FENCING_MODULE = "chatkit.sessions.fencing"

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
# A claim: raise the thread's newest token, unless it is newer already (then nothing changes).
_CLAIM_SQL = f"UPDATE {FENCE_TABLE} SET token = {{p}} WHERE thread_id = {{p}} AND (token IS NULL OR token <= {{p}})"


# --------------------------------------------------------------------------------------------- SQLite


def build_sqlite() -> type:
    """Build ``FencedSqliteSaver`` (needs ``langgraph-checkpoint-sqlite``).

    Raises:
        ImportError: the package is missing (the message says what to install).
    """
    import json

    from langgraph.checkpoint.base import get_checkpoint_metadata

    AsyncSqliteSaver = optional_import(
        "langgraph.checkpoint.sqlite.aio", extra="sqlite", feature="FencedSqliteSaver"
    ).AsyncSqliteSaver

    class FencedSqliteSaver(AsyncSqliteSaver):
        """LangGraph's ``AsyncSqliteSaver`` that refuses stale fenced writes; processes may share the file.

        A fenced ``aput`` runs in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock, shared by every
        process on the file): read the thread's fence row and head, check, insert the checkpoint, update
        the fence row, commit. So do the :class:`~chatkit.sessions.fencing.FencedSaver` steps (claim, delete,
        prune). Unfenced writes behave as in ``AsyncSqliteSaver``.

        Raises:
            StaleCommit: from ``aput`` of a fenced write that is stale, and from a claim, delete or prune
                with a stale token (see :mod:`chatkit.sessions.fencing`).

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

        async def _fence_row(self, thread_id: str) -> tuple[int | None, str | None]:
            async with self.conn.execute(f"SELECT token, writer FROM {FENCE_TABLE} WHERE thread_id = ?", (thread_id,)) as cur:
                row = await cur.fetchone()
            return (row[0], row[1]) if row else (None, None)

        @contextlib.asynccontextmanager
        async def _immediate(self) -> AsyncIterator[None]:
            """One write transaction (SQLite's write lock), committed at the end or rolled back on error."""
            await self.setup()
            async with self.lock:
                await self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    await self.conn.commit()
                except BaseException:
                    await self.conn.rollback()
                    raise

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
            # As AsyncSqliteSaver.aput (langgraph-checkpoint-sqlite 3.x), inside the fenced transaction.
            type_, serialized = self.serde.dumps_typed(checkpoint)
            serialized_metadata = json.dumps(get_checkpoint_metadata(config, metadata), ensure_ascii=False).encode(
                "utf-8", "ignore"
            )
            async with self._immediate():
                newest, writer = await self._fence_row(thread_id)
                async with self.conn.execute(_HEAD_SQL.format(p="?"), (thread_id, ns)) as cur:
                    found = await cur.fetchone()
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
                await self._set_fence(thread_id, _newest(newest, f.token), f.writer)
            return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": new_id}}

        async def _set_fence(self, thread_id: str, token: int | None, writer: str) -> None:
            await self.conn.execute(
                f"INSERT INTO {FENCE_TABLE} (thread_id, token, writer) VALUES (?, ?, ?) "
                "ON CONFLICT (thread_id) DO UPDATE SET token = excluded.token, writer = excluded.writer",
                (thread_id, token, writer),
            )

        async def aclaim_thread(self, thread_id: str, *, token: int) -> None:
            """Raise the thread's newest token to ``token`` (see :class:`~chatkit.sessions.fencing.FencedSaver`).

            Raises:
                StaleCommit: ``token`` is older than the thread's newest.
            """
            await self.setup()
            newest = None
            async with self.lock:
                try:
                    async with self.conn.execute(_CLAIM_SQL.format(p="?"), (token, thread_id, token)) as cur:
                        claimed = cur.rowcount > 0
                    if not claimed:
                        newest, _ = await self._fence_row(thread_id)
                    await self.conn.commit()
                except BaseException:
                    await self.conn.rollback()
                    raise
            if is_stale(token, newest):
                raise stale_token(thread_id, token=token, newest=newest, doing="claim")  # type: ignore[arg-type]

        async def adelete_thread_fenced(self, thread_id: str, *, token: int | None) -> None:
            """Delete the thread, keeping its newest token (see :class:`~chatkit.sessions.fencing.FencedSaver`).

            Raises:
                StaleCommit: ``token`` is older than the thread's newest.
            """
            async with self._immediate():
                newest, _ = await self._fence_row(thread_id)
                if is_stale(token, newest):
                    raise stale_token(thread_id, token=token, newest=newest, doing="delete")  # type: ignore[arg-type]
                await self.conn.execute("DELETE FROM checkpoints WHERE thread_id = ?", (thread_id,))
                await self.conn.execute("DELETE FROM writes WHERE thread_id = ?", (thread_id,))
                await self._set_fence(thread_id, _newest(newest, token), DELETED)

        async def aprune_thread_fenced(self, thread_id: str, *, keep: int, token: int | None) -> None:
            """Keep the newest ``keep`` root checkpoints (see :class:`~chatkit.sessions.fencing.FencedSaver`).

            Raises:
                StaleCommit: ``token`` is older than the thread's newest.
            """
            async with self._immediate():
                newest, _ = await self._fence_row(thread_id)
                if is_stale(token, newest):
                    raise stale_token(thread_id, token=token, newest=newest, doing="prune")  # type: ignore[arg-type]
                async with self.conn.cursor() as cur:
                    await prune_sqlite_rows(cur, thread_id, keep)

    FencedSqliteSaver.__module__ = _FENCING_MODULE
    return FencedSqliteSaver


# --------------------------------------------------------------------------------------------- PostgreSQL

# The cursor of the fenced transaction in progress, for the saver's own statements (see _cursor).
_FENCED_CURSOR: contextvars.ContextVar[tuple[object, Any] | None] = contextvars.ContextVar("chatkit_fenced_cursor", default=None)

_LOCK_FENCE_ROW = (
    f"INSERT INTO {FENCE_TABLE} (thread_id) VALUES (%s) ON CONFLICT (thread_id) "
    "DO UPDATE SET thread_id = EXCLUDED.thread_id RETURNING token, writer"
)


def build_postgres() -> type:
    """Build ``FencedPostgresSaver`` (needs ``chatkit[distributed]``).

    Raises:
        ImportError: the package is missing (the message names the extra).
    """
    AsyncPostgresSaver = optional_import(
        "langgraph.checkpoint.postgres.aio", extra="distributed", feature="FencedPostgresSaver"
    ).AsyncPostgresSaver

    class FencedPostgresSaver(AsyncPostgresSaver):
        """LangGraph's ``AsyncPostgresSaver`` that refuses stale fenced writes.

        A fenced ``aput`` runs in one transaction: lock the thread's fence row (``INSERT ... ON CONFLICT DO
        UPDATE ... RETURNING``, which serializes the thread's fenced writers), read the head, check, then
        store the checkpoint with ``AsyncPostgresSaver.aput``'s own statements on the same cursor, and
        update the fence row. A delete or prune (:class:`~chatkit.sessions.fencing.FencedSaver`) runs the
        same way; a claim is one ``UPDATE``. The connection must be in autocommit mode, as
        ``AsyncPostgresSaver`` requires (``from_conn_string`` does this). Unfenced writes behave as in
        ``AsyncPostgresSaver``.

        Raises:
            StaleCommit: from ``aput`` of a fenced write that is stale, and from a claim, delete or prune
                with a stale token (see :mod:`chatkit.sessions.fencing`).

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

        @contextlib.asynccontextmanager
        async def _fenced(self, thread_id: str) -> AsyncIterator[tuple[Any, Any]]:
            """A transaction holding the thread's fence row locked: yields (cursor, fence row)."""
            async with self._cursor() as cur:
                if self.pipe:
                    await self.pipe.sync()  # the transaction must not take in what the pipeline queued
                async with cur.connection.transaction():
                    await cur.execute(_LOCK_FENCE_ROW, (thread_id,))
                    row = await cur.fetchone()
                    entered = _FENCED_CURSOR.set((self, cur))
                    try:
                        yield cur, row
                    finally:
                        _FENCED_CURSOR.reset(entered)

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
            async with self._fenced(thread_id) as (cur, row):
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
                async with cur.connection.pipeline():  # the writes go out together: one round trip
                    result = await super().aput(config, checkpoint, metadata, new_versions)
                    await self._set_fence(cur, thread_id, _newest(row["token"], f.token), f.writer)
            return result

        @staticmethod
        async def _set_fence(cur: Any, thread_id: str, token: int | None, writer: str) -> None:
            await cur.execute(f"UPDATE {FENCE_TABLE} SET token = %s, writer = %s WHERE thread_id = %s", (token, writer, thread_id))

        async def aclaim_thread(self, thread_id: str, *, token: int) -> None:
            """Raise the thread's newest token to ``token`` (see :class:`~chatkit.sessions.fencing.FencedSaver`).

            Raises:
                StaleCommit: ``token`` is older than the thread's newest.
            """
            async with self._cursor() as cur:
                await cur.execute(_CLAIM_SQL.format(p="%s") + " RETURNING token", (token, thread_id, token))
                if await cur.fetchone() is not None:
                    return
                await cur.execute(f"SELECT token FROM {FENCE_TABLE} WHERE thread_id = %s", (thread_id,))
                row = await cur.fetchone()
            newest = None if row is None else row["token"]
            if is_stale(token, newest):
                raise stale_token(thread_id, token=token, newest=newest, doing="claim")

        async def adelete_thread_fenced(self, thread_id: str, *, token: int | None) -> None:
            """Delete the thread, keeping its newest token (see :class:`~chatkit.sessions.fencing.FencedSaver`).

            Raises:
                StaleCommit: ``token`` is older than the thread's newest.
            """
            async with self._fenced(thread_id) as (cur, row):
                if is_stale(token, row["token"]):
                    raise stale_token(thread_id, token=token, newest=row["token"], doing="delete")  # type: ignore[arg-type]
                await super().adelete_thread(thread_id)
                await self._set_fence(cur, thread_id, _newest(row["token"], token), DELETED)

        async def aprune_thread_fenced(self, thread_id: str, *, keep: int, token: int | None) -> None:
            """Keep the newest ``keep`` root checkpoints (see :class:`~chatkit.sessions.fencing.FencedSaver`).

            Raises:
                StaleCommit: ``token`` is older than the thread's newest.
            """
            async with self._fenced(thread_id) as (cur, row):
                if is_stale(token, row["token"]):
                    raise stale_token(thread_id, token=token, newest=row["token"], doing="prune")  # type: ignore[arg-type]
                async with cur.connection.pipeline():
                    await prune_postgres_rows(cur, thread_id, keep)

    FencedPostgresSaver.__module__ = _FENCING_MODULE
    return FencedPostgresSaver
