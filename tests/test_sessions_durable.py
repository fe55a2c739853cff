"""Sessions live in the checkpointer: a restart (a new manager on the same persistent checkpointer) sees
every old session; old checkpoints are pruned; a closed manager leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

import chatkit
from chatkit import SessionManager, SessionNotFound
from tests._session_helpers import Gates, conversation, pairs
from tests.conftest import FakeClock

SaverFactory = Callable[[], contextlib.AbstractAsyncContextManager[BaseCheckpointSaver]]


@pytest.fixture
def pg_database(postgres_dsn: str) -> Any:
    """A fresh database of this test's own on the session-wide cluster: its DSN."""
    import psycopg

    name = f"chatkit_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["InMemorySaver object", "AsyncSqliteSaver file", "AsyncPostgresSaver"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> SaverFactory:
    """Opens the same persistent checkpointer anew on each call (a process restart, for SQL savers)."""
    if request.param == "InMemorySaver object":
        saver = InMemorySaver()

        @contextlib.asynccontextmanager
        async def same() -> AsyncIterator[BaseCheckpointSaver]:
            yield saver

        return same
    if request.param == "AsyncSqliteSaver file":
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        path = str(tmp_path / "sessions.sqlite")
        return lambda: AsyncSqliteSaver.from_conn_string(path)
    dsn = request.getfixturevalue("pg_database")
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    @contextlib.asynccontextmanager
    async def postgres() -> AsyncIterator[BaseCheckpointSaver]:
        async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
            await saver.setup()
            yield saver

    return postgres


async def test_a_restart_sees_every_old_session(reopen: SaverFactory, fake_clock: FakeClock) -> None:
    async with reopen() as saver:
        async with SessionManager(checkpointer=saver, clock=fake_clock) as before:
            talked, empty = await before.create_session(), await before.create_session()
            fake_clock.advance(1)
            await before.chat(talked, "before the restart")
            await before.chat("my-own-id", "created by name", create_if_missing=True)
    fake_clock.advance(1)
    async with reopen() as saver:
        async with SessionManager(checkpointer=saver, clock=fake_clock) as after:
            assert await after.list_sessions() == [empty, talked, "my-own-id"]  # least recently used first
            assert pairs(await after.get_history(talked)) == conversation("before the restart")
            assert await after.get_history(empty) == []
            result = await after.chat(talked, "after the restart")
            assert result.turn == 2  # it saw the turn before the restart
            assert pairs(await after.get_history(talked)) == conversation("before the restart", "after the restart")
            assert (await after.chat("my-own-id", "again", create_if_missing=True)).turn == 2
            await after.delete_session(empty)
    async with reopen() as saver:
        async with SessionManager(checkpointer=saver, clock=fake_clock) as third:
            assert await third.list_sessions() == [talked, "my-own-id"]
            with pytest.raises(SessionNotFound):
                await third.get_history(empty)


async def test_idle_expiry_sees_sessions_from_before_a_restart(reopen: SaverFactory, fake_clock: FakeClock) -> None:
    async with reopen() as saver:
        async with SessionManager(checkpointer=saver, clock=fake_clock, session_ttl=60) as before:
            old = await before.create_session()
            await before.chat(old, "hello")
            fake_clock.advance(30)
            recent = await before.create_session()
    fake_clock.advance(31)  # old: idle 61 s, recent: idle 31 s
    async with reopen() as saver:
        async with SessionManager(checkpointer=saver, clock=fake_clock, session_ttl=60) as after:
            with pytest.raises(SessionNotFound):  # gone for readers at once, before any expire_idle()
                await after.get_history(old)
            assert await after.list_sessions() == [recent]
            assert await after.expire_idle() == []  # the reader found it expired already (and deletes it)
            assert await saver.aget_tuple({"configurable": {"thread_id": old}}) is None
            fake_clock.advance(30)
            assert await after.expire_idle() == [recent]
            assert await after.list_sessions() == []


async def test_max_sessions_counts_the_sessions_from_before_a_restart(reopen: SaverFactory, fake_clock: FakeClock) -> None:
    async with reopen() as saver:
        async with SessionManager(checkpointer=saver, clock=fake_clock) as before:
            first = await before.create_session()
            fake_clock.advance(1)
            second = await before.create_session()
    fake_clock.advance(1)
    async with reopen() as saver:
        async with SessionManager(checkpointer=saver, clock=fake_clock, max_sessions=2) as after:
            third = await after.create_session()
            await after.expire_idle()
            assert await after.list_sessions() == [second, third]
            assert await saver.aget_tuple({"configurable": {"thread_id": first}}) is None


async def test_two_managers_on_one_checkpointer_see_each_others_sessions() -> None:
    saver = InMemorySaver()
    one, two = SessionManager(checkpointer=saver), SessionManager(checkpointer=saver)
    sid = await one.create_session()
    await two.chat(sid, "written by the second manager")
    assert pairs(await one.get_history(sid)) == conversation("written by the second manager")
    assert await two.list_sessions() == [sid]


# ---------------------------------------------------------------- sync-only savers


def test_a_sync_only_sqlite_saver_is_refused_naming_the_async_one(tmp_path: Path) -> None:
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(tmp_path / "sync.sqlite", check_same_thread=False)
    try:
        with pytest.raises(TypeError, match=r"SqliteSaver is synchronous only.*use AsyncSqliteSaver \(langgraph\.checkpoint\.sqlite\.aio\)"):
            SessionManager(checkpointer=SqliteSaver(conn))
    finally:
        conn.close()


def test_a_saver_without_async_methods_is_refused() -> None:
    class SyncOnly(BaseCheckpointSaver):
        pass

    with pytest.raises(TypeError, match="SyncOnly does not implement aget_tuple, aput, alist"):
        SessionManager(checkpointer=SyncOnly())


# ---------------------------------------------------------------- bounded storage


async def _checkpoint_ids(saver: BaseCheckpointSaver, sid: str) -> list[str]:
    return [t.config["configurable"]["checkpoint_id"] async for t in saver.alist({"configurable": {"thread_id": sid}})]


@pytest.mark.parametrize("keep", [1, 3, None])
async def test_old_checkpoints_are_pruned(reopen: SaverFactory, keep: int | None) -> None:
    async with reopen() as saver:
        manager = SessionManager(checkpointer=saver, keep_checkpoints=keep)
        sid = await manager.create_session()
        texts = [f"message {i}" for i in range(8)]
        for text in texts:
            await manager.chat(sid, text)
        ids = await _checkpoint_ids(saver, sid)
        assert len(ids) == (9 if keep is None else keep)  # one per turn, and the session's first
        assert pairs(await manager.get_history(sid)) == conversation(*texts)
        state = await manager.graph.aget_state({"configurable": {"thread_id": sid}})
        assert state.next == () and len(state.values["messages"]) == 16
        if isinstance(saver, InMemorySaver):  # stored values: only those the kept checkpoints refer to
            blobs = [k for k in saver.blobs if k[0] == sid and k[2] == "messages"]
            assert len(blobs) == (8 if keep is None else keep)  # the session's first checkpoint has no messages
        if type(saver).__name__ == "AsyncPostgresSaver":
            async with saver.conn.cursor() as cur:
                await cur.execute(
                    "SELECT count(*) AS n FROM checkpoint_blobs WHERE thread_id = %s AND channel = 'messages'", (sid,)
                )
                row = await cur.fetchone()
            assert row["n"] == (8 if keep is None else keep)


async def test_pruning_keeps_a_revert_possible() -> None:
    """A commit whose caller went away is reverted after it was written, before the old checkpoints go."""
    from tests._session_helpers import GatedSaver

    saver = GatedSaver()
    manager = SessionManager(checkpointer=saver, keep_checkpoints=1)
    sid = await manager.create_session()
    await manager.chat(sid, "kept")
    entered, release = saver.hold("write")
    task = asyncio.create_task(manager.chat(sid, "reverted"))
    await entered.wait()
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pairs(await manager.get_history(sid)) == conversation("kept")
    await manager.chat(sid, "next")
    assert len(await _checkpoint_ids(saver, sid)) == 1
    assert pairs(await manager.get_history(sid)) == conversation("kept", "next")


# ---------------------------------------------------------------- lifecycle


def test_async_with_finishes_background_purges_before_the_loop_ends(reopen: SaverFactory, fake_clock: FakeClock) -> None:
    threads_before = set(threading.enumerate())
    managers: list[SessionManager] = []

    async def main() -> None:
        async with reopen() as saver:
            async with SessionManager(checkpointer=saver, session_ttl=60, clock=fake_clock) as manager:
                managers.append(manager)
                expired = [await manager.create_session() for _ in range(3)]
                fake_clock.advance(61)
                await manager.create_session()  # notices the expired ones: deletes their threads in the background
                assert "chatkit session expiry" in {t.get_name() for t in asyncio.all_tasks()}
            assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
            for sid in expired:
                assert await saver.aget_tuple({"configurable": {"thread_id": sid}}) is None

    asyncio.run(main())
    # No saver thread left behind. aiosqlite's worker resolves its last future and only then returns, so
    # the loop may end a moment before the thread does: join the new threads (a thread nobody stopped
    # never ends, and the assertion fails), never sleep.
    new_threads = set(threading.enumerate()) - threads_before
    for thread in new_threads:
        thread.join(timeout=30)
    assert [t for t in new_threads if t.is_alive()] == []
    assert managers[0].closed and repr(managers[0]).endswith(" closed>")


def test_sync_with_and_close_finish_purges_whose_loop_ended(fake_clock: FakeClock) -> None:
    saver = InMemorySaver()
    with SessionManager(checkpointer=saver, session_ttl=60, clock=fake_clock) as manager:
        old = chatkit.run(manager.create_session())
        fake_clock.advance(61)
        chatkit.run(manager.create_session())  # starts a background purge; its loop ends with this run
    assert chatkit.run(saver.aget_tuple({"configurable": {"thread_id": old}})) is None


async def test_a_closed_manager_refuses_writes_and_serves_reads() -> None:
    gates = Gates(open_all=True)
    manager = SessionManager(model=chatkit.ExtractiveChatModel(latency=gates))
    sid = await manager.create_session()
    await manager.chat(sid, "before closing")
    await manager.aclose()
    await manager.aclose()  # idempotent
    for call in (
        manager.create_session(),
        manager.chat(sid, "after"),
        manager.delete_session(sid),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            await call
    with pytest.raises(RuntimeError, match="closed"):
        async for _ in manager.stream(sid, "after"):
            pass
    assert pairs(await manager.get_history(sid)) == conversation("before closing")
    assert await manager.list_sessions() == [sid]


async def test_close_refuses_to_block_a_running_loop() -> None:
    manager = SessionManager()
    with pytest.raises(RuntimeError, match=r"await manager.aclose\(\)"):
        manager.close()
    assert not manager.closed
