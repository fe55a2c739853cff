"""Bodies of the OS processes in the cross-process lock and fencing tests (multiprocessing, spawn).

Each runs its own event loop and its own RedisKeyedLock, and talks to the test through multiprocessing
events and pipes only: no sleeping, every step waits for an event (with a generous bound).
"""

from __future__ import annotations

import asyncio
import os
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

WAIT = 60.0


async def _wait(event: Event) -> None:
    if not await asyncio.to_thread(event.wait, WAIT):
        raise TimeoutError("the test never gave the signal")


def contend(url: str, namespace: str, name: str, keysets: list[list[str]], start: Event, out: Connection) -> None:
    """Take each key set in turn; inside, claim a Redis-side "inside" marker per key and log the token."""
    asyncio.run(_contend(url, namespace, name, keysets, start, out))


async def _contend(url: str, namespace: str, name: str, keysets: list[list[str]], start: Event, out: Connection) -> None:
    import redis.asyncio

    from chatkit import RedisKeyedLock

    r = redis.asyncio.Redis.from_url(url, decode_responses=True)
    overlaps = 0
    async with RedisKeyedLock(url, namespace=namespace, lease=5) as lock:
        out.send("ready")
        await _wait(start)
        for keys in keysets:
            request = lock(*keys, label=name)
            async with request:
                for k in keys:
                    if not await r.set(f"{namespace}:inside:{k}", name, nx=True):
                        overlaps += 1
                await r.rpush(f"{namespace}:log", *(f"{k} {request.token} {name}" for k in keys))
                for k in keys:
                    await r.delete(f"{namespace}:inside:{k}")
    await r.aclose()
    out.send(("done", overlaps))


def queue_up(url: str, namespace: str, name: str, go: Event, queued: Event, out: Connection) -> None:
    """On ``go``, ask for key "k"; set ``queued`` once in the queue; inside, append ``name`` to a Redis list."""
    asyncio.run(_queue_up(url, namespace, name, go, queued, out))


async def _queue_up(url: str, namespace: str, name: str, go: Event, queued: Event, out: Connection) -> None:
    import redis.asyncio

    from chatkit import LockEvent, RedisKeyedLock

    def observe(event: LockEvent) -> None:
        if event.kind == "requested":
            queued.set()

    r = redis.asyncio.Redis.from_url(url, decode_responses=True)
    async with RedisKeyedLock(url, namespace=namespace, observer=observe) as lock:
        out.send("ready")
        await _wait(go)
        async with lock("k", label=name):
            await r.rpush(f"{namespace}:order", name)
    await r.aclose()
    out.send("done")


def hold_forever(url: str, namespace: str, lease: float, out: Connection) -> None:
    """Take key "k", report ``(pid, token)``, then hold it until killed (or until told it lost it)."""
    asyncio.run(_hold_forever(url, namespace, lease, out))


async def _hold_forever(url: str, namespace: str, lease: float, out: Connection) -> None:
    from chatkit import LockLost, RedisKeyedLock

    async with RedisKeyedLock(url, namespace=namespace, lease=lease) as lock:
        request = lock("k", label=f"pid {os.getpid()}")
        try:
            async with request:
                out.send((os.getpid(), request.token))
                await asyncio.Event().wait()
        except LockLost as exc:
            out.send(("lost", exc.held, str(exc)))


def paused_writer(url: str, namespace: str, path: str, thread_id: str, lease: float, out: Connection, go: Event) -> None:
    """Hold the thread's lock, read its head, report; after being paused past the lease and resumed, it is
    told it lost the lock; it then tries to commit anyway with its old token and reports the refusal."""
    asyncio.run(_paused_writer(url, namespace, path, thread_id, lease, out, go))


async def _paused_writer(url: str, namespace: str, path: str, thread_id: str, lease: float, out: Connection, go: Event) -> None:
    from chatkit import LockLost, RedisKeyedLock, StaleCommit
    from chatkit.sessions.fencing import FencedSqliteSaver, fence
    from tests._fencing_helpers import append_message

    async with FencedSqliteSaver.from_conn_string(path) as saver, RedisKeyedLock(url, namespace=namespace, lease=lease) as lock:
        thread = {"configurable": {"thread_id": thread_id}}
        request = lock(thread_id, label="paused")
        start: Any = None
        try:
            async with request:
                read = await saver.aget_tuple(thread)
                start = read.config if read is not None else thread
                out.send(("holding", request.token))
                await asyncio.Event().wait()  # paused (SIGSTOP) here; resumed, it is cancelled
        except LockLost as exc:
            out.send(("lost", exc.held))
        await _wait(go)
        try:
            await append_message(saver, fence(start, token=request.token), "late write from the paused holder")
        except StaleCommit as exc:
            out.send(("refused", exc.reason))
        else:
            out.send(("stored", None))


def write_turns(dsn_or_path: str, kind: str, url: str, namespace: str, thread_id: str, name: str, turns: int, start: Event, out: Connection) -> None:
    """Write ``turns`` turns on one thread, each under the thread's RedisKeyedLock and fenced by its token."""
    asyncio.run(_write_turns(dsn_or_path, kind, url, namespace, thread_id, name, turns, start, out))


async def _write_turns(dsn_or_path: str, kind: str, url: str, namespace: str, thread_id: str, name: str, turns: int, start: Event, out: Connection) -> None:
    from chatkit import RedisKeyedLock
    from chatkit.sessions.fencing import FencedPostgresSaver, FencedSqliteSaver, fence
    from tests._fencing_helpers import append_message

    saver_cls = FencedSqliteSaver if kind == "sqlite" else FencedPostgresSaver
    thread = {"configurable": {"thread_id": thread_id}}
    async with saver_cls.from_conn_string(dsn_or_path) as saver, RedisKeyedLock(url, namespace=namespace, lease=5) as lock:
        out.send("ready")
        await _wait(start)
        for i in range(turns):
            request = lock(thread_id, label=name)
            async with request:
                read = await saver.aget_tuple(thread)
                base = read.config if read is not None else thread
                await append_message(saver, fence(base, token=request.token), f"{name} {i}")
    out.send("done")


def session_turn(path: str, session_id: str, text: str, barrier: Any, out: Connection) -> None:
    """The issue's reproduction: one SessionManager on a shared AsyncSqliteSaver sends one message."""
    asyncio.run(_session_turn(path, session_id, text, barrier, out))


async def _session_turn(path: str, session_id: str, text: str, barrier: Any, out: Connection) -> None:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from chatkit import ExtractiveChatModel, SessionManager

    async def both_started(_: str) -> None:
        # both processes have read the history before either model call returns (they send "at once")
        await asyncio.to_thread(barrier.wait, WAIT)

    async with AsyncSqliteSaver.from_conn_string(path) as saver:
        manager = SessionManager(checkpointer=saver, model=ExtractiveChatModel(latency=both_started))
        result = await manager.chat(session_id, text, create_if_missing=True)
        out.send(result.turn)
