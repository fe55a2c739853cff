"""Delete a thread's old checkpoints, keeping its newest few: bounded storage per session.

Each checkpoint stores the whole ``messages`` list again (a saver shares a channel's stored value only
between checkpoints where it did not change), so keeping every checkpoint costs the square of a session's
length, and keeping the newest ``keep`` costs ``keep`` times its length. The installed savers differ in what
they can delete (langgraph-checkpoint 4.3, -sqlite 3.1, -postgres 3.2): ``InMemorySaver`` and
``AsyncSqliteSaver`` implement neither ``aprune`` nor ``adelete_for_runs``; ``AsyncPostgresSaver``
implements ``aprune(strategy="keep_latest")``, which keeps one. So :func:`prune_thread` keeps the newest
``keep`` checkpoints of the root namespace itself for those three (their pending writes and the stored
values no kept checkpoint refers to go too), and for any other saver calls its ``aprune`` (keep_latest)
if it has one.

The caller holds the session's lock: nobody writes the thread meanwhile.
"""

from __future__ import annotations

import logging
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

__all__ = ["prune_thread", "can_prune", "prune_memory_storage", "prune_sqlite_rows", "prune_postgres_rows"]

logger = logging.getLogger(__name__)


def _saver_kind(saver: BaseCheckpointSaver) -> str:
    if isinstance(saver, InMemorySaver):
        return "memory"
    for cls in type(saver).__mro__:  # by name: neither package needs to be installed
        if cls.__name__ == "AsyncSqliteSaver" and cls.__module__.startswith("langgraph.checkpoint.sqlite"):
            return "sqlite"
        if cls.__name__ == "AsyncPostgresSaver" and cls.__module__.startswith("langgraph.checkpoint.postgres"):
            return "postgres"
    if type(saver).aprune is not BaseCheckpointSaver.aprune:
        return "aprune"
    return "none"


def can_prune(saver: BaseCheckpointSaver) -> bool:
    """Whether :func:`prune_thread` can delete old checkpoints from ``saver``."""
    return _saver_kind(saver) != "none"


async def prune_thread(saver: BaseCheckpointSaver, thread_id: str, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints of ``thread_id``'s root namespace and delete the older ones."""
    kind = _saver_kind(saver)
    if kind == "memory":
        prune_memory_storage(saver, thread_id, keep)  # type: ignore[arg-type]
    elif kind == "sqlite":
        await _prune_sqlite(saver, thread_id, keep)
    elif kind == "postgres":
        await _prune_postgres(saver, thread_id, keep)
    elif kind == "aprune":
        await saver.aprune([thread_id], strategy="keep_latest")


def prune_memory_storage(saver: InMemorySaver, thread_id: str, keep: int) -> None:
    """Keep the newest ``keep`` root checkpoints of ``thread_id`` in an ``InMemorySaver`` (synchronous)."""
    # InMemorySaver's documented storage: storage[thread][ns][checkpoint id] = (checkpoint, metadata,
    # parent id), writes[(thread, ns, checkpoint id)], blobs[(thread, ns, channel, version)]. Synchronous:
    # nothing else runs on this loop meanwhile.
    namespaces = saver.storage.get(thread_id)
    checkpoints = namespaces.get("") if namespaces is not None else None
    if not checkpoints or len(checkpoints) <= keep:
        return
    ids = sorted(checkpoints)
    doomed, kept = ids[:-keep], ids[-keep:]
    loads = saver.serde.loads_typed

    def versions(checkpoint_id: str) -> set[tuple[str, Any]]:
        return set(loads(checkpoints[checkpoint_id][0])["channel_versions"].items())

    referenced: set[tuple[str, Any]] = set()
    for checkpoint_id in kept:
        referenced |= versions(checkpoint_id)
    freed: set[tuple[str, Any]] = set()
    for checkpoint_id in doomed:
        freed |= versions(checkpoint_id)
        del checkpoints[checkpoint_id]
        saver.writes.pop((thread_id, "", checkpoint_id), None)
    for channel, version in freed - referenced:
        saver.blobs.pop((thread_id, "", channel, version), None)


_SQLITE_OLDER = (
    "SELECT checkpoint_id FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = '' "
    "ORDER BY checkpoint_id DESC LIMIT -1 OFFSET ?"
)


async def prune_sqlite_rows(cur: Any, thread_id: str, keep: int) -> None:
    """The deletes of a SQLite prune, on ``cur`` (the caller holds ``saver.lock`` and commits)."""
    # AsyncSqliteSaver keeps each checkpoint (values included) in one row of `checkpoints`, and pending
    # writes in `writes`.
    await cur.execute(
        f"DELETE FROM writes WHERE thread_id = ? AND checkpoint_ns = '' AND checkpoint_id IN ({_SQLITE_OLDER})",
        (thread_id, thread_id, keep),
    )
    await cur.execute(
        f"DELETE FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = '' AND checkpoint_id IN ({_SQLITE_OLDER})",
        (thread_id, thread_id, keep),
    )


async def _prune_sqlite(saver: Any, thread_id: str, keep: int) -> None:
    # AsyncSqliteSaver serialises its own use of the connection with `saver.lock`.
    await saver.setup()
    async with saver.lock, saver.conn.cursor() as cur:
        await prune_sqlite_rows(cur, thread_id, keep)
        await saver.conn.commit()


_PG_DELETE_CHECKPOINTS = """
WITH kept AS (
    SELECT checkpoint_id FROM checkpoints WHERE thread_id = %(thread)s AND checkpoint_ns = ''
    ORDER BY checkpoint_id DESC LIMIT %(keep)s
), deleted AS (
    DELETE FROM checkpoints WHERE thread_id = %(thread)s AND checkpoint_ns = ''
    AND checkpoint_id NOT IN (SELECT checkpoint_id FROM kept)
    RETURNING checkpoint_id
)
DELETE FROM checkpoint_writes WHERE thread_id = %(thread)s AND checkpoint_ns = ''
AND checkpoint_id IN (SELECT checkpoint_id FROM deleted)
"""

# a stored channel value (blob) that no remaining checkpoint of the namespace refers to
_PG_DELETE_BLOBS = """
DELETE FROM checkpoint_blobs b WHERE b.thread_id = %(thread)s AND b.checkpoint_ns = ''
AND NOT EXISTS (
    SELECT 1 FROM checkpoints c WHERE c.thread_id = b.thread_id AND c.checkpoint_ns = b.checkpoint_ns
    AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version
)
"""


async def prune_postgres_rows(cur: Any, thread_id: str, keep: int) -> None:
    """The deletes of a PostgreSQL prune, on ``cur`` (the caller runs them in one transaction)."""
    params = {"thread": thread_id, "keep": keep}
    await cur.execute(_PG_DELETE_CHECKPOINTS, params)
    await cur.execute(_PG_DELETE_BLOBS, params)


async def _prune_postgres(saver: Any, thread_id: str, keep: int) -> None:
    # AsyncPostgresSaver: checkpoints, checkpoint_writes, checkpoint_blobs (one row per channel version);
    # its connection is an AsyncConnection (used under `saver.lock`) or an AsyncConnectionPool.
    async def run(conn: Any) -> None:
        async with conn.transaction(), conn.cursor() as cur:
            await prune_postgres_rows(cur, thread_id, keep)

    conn = saver.conn
    if hasattr(conn, "connection") and not hasattr(conn, "cursor"):  # a psycopg_pool.AsyncConnectionPool
        async with conn.connection() as pooled:
            await run(pooled)
        return
    async with saver.lock:
        if saver.pipe is not None:
            await saver.pipe.sync()
        await run(conn)
