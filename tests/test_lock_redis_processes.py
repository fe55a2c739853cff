"""RedisKeyedLock across real OS processes: exclusion, FIFO by ticket, a killed holder, a paused holder.

Processes are started with multiprocessing's "spawn" and sequenced with events and pipes; each step waits
for a signal with a generous bound, never for time to pass. Leases are short (0.5 s) where a test waits
for one to run out.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

import pytest

from tests import _lock_workers as workers
from tests._lock_helpers import WAIT, Watch

pytest.importorskip("redis")

from chatkit import RedisKeyedLock  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")
LEASE = 0.5


@contextmanager
def processes(*specs: tuple[Any, tuple[Any, ...]]) -> Iterator[list[Any]]:
    """Start one process per ``(target, args)``; kill and reap whatever is still running at the end."""
    procs = [SPAWN.Process(target=target, args=args, daemon=True) for target, args in specs]
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot die of SIGKILL until continued
                p.kill()
            p.join(WAIT)
            p.close()


def recv(conn: Connection) -> Any:
    if not conn.poll(WAIT):
        raise TimeoutError("a worker process did not answer")
    return conn.recv()


async def arecv(conn: Connection) -> Any:
    return await asyncio.to_thread(recv, conn)


def _namespace() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


def test_four_processes_never_overlap_and_tokens_follow_the_handoffs(redis_url: str) -> None:
    import redis

    ns = _namespace()
    rng = random.Random(11)
    keys = ["a", "b", "c", "d"]
    start = SPAWN.Event()
    pipes = [SPAWN.Pipe(duplex=False) for _ in range(4)]
    specs = []
    for i, (_, w) in enumerate(pipes):
        keysets = [rng.sample(keys, rng.choice([1, 1, 2, 3])) for _ in range(25)]
        specs.append((workers.contend, (redis_url, ns, f"p{i}", keysets, start, w)))
    with processes(*specs) as procs:
        assert [recv(r) for r, _ in pipes] == ["ready"] * 4
        start.set()
        results = [recv(r) for r, _ in pipes]
        for p in procs:
            p.join(WAIT)
    assert results == [("done", 0)] * 4  # no process ever found a key's "inside" marker taken
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        log = [line.split() for line in r.lrange(f"{ns}:log", 0, -1)]
    finally:
        r.close()
    assert len(log) == sum(len(ks) for _, args in specs for ks in args[3])
    for k in keys:
        tokens = [int(tok) for key, tok, _ in log if key == k]
        assert tokens == sorted(set(tokens)), f"tokens of {k} did not grow with each holder"
    assert {name for _, _, name in log} == {"p0", "p1", "p2", "p3"}


async def test_fifo_by_ticket_across_processes(redis_url: str) -> None:
    """Three processes ask, one after another, while this one holds the key: they get it in that order."""
    import redis.asyncio

    ns = _namespace()
    names = ["first", "second", "third"]
    gos = [SPAWN.Event() for _ in names]
    queued = [SPAWN.Event() for _ in names]
    pipes = [SPAWN.Pipe(duplex=False) for _ in names]
    specs = [(workers.queue_up, (redis_url, ns, n, g, q, w)) for n, g, q, (_, w) in zip(names, gos, queued, pipes)]
    async with RedisKeyedLock(redis_url, namespace=ns) as lock:
        with processes(*specs):
            assert [await arecv(r) for r, _ in pipes] == ["ready"] * 3
            async with lock("k"):
                for go, q in zip(gos, queued):
                    go.set()
                    assert await asyncio.to_thread(q.wait, WAIT)  # in the queue before the next one asks
            assert [await arecv(r) for r, _ in pipes] == ["done"] * 3
    r = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await r.lrange(f"{ns}:order", 0, -1) == names
    finally:
        await r.aclose()


async def test_killed_holder_passes_the_key_on_after_its_lease(redis_url: str) -> None:
    ns = _namespace()
    watch = Watch()
    reader, writer = SPAWN.Pipe(duplex=False)
    async with RedisKeyedLock(redis_url, namespace=ns, lease=LEASE, observer=watch) as lock:
        with processes((workers.hold_forever, (redis_url, ns, LEASE, writer))) as (proc,):
            pid, their_token = await arecv(reader)
            waiter = lock("k", label="waiter")
            acquired = asyncio.create_task(waiter.__aenter__())
            await watch.until("waiter", "requested")
            assert not acquired.done() and (await lock.status("k")).token == their_token
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(acquired, WAIT)  # one lease after the holder's last renewal
            assert waiter.token is not None and waiter.token > their_token
            await waiter.__aexit__(None, None, None)
            proc.join(WAIT)
            assert proc.exitcode == -signal.SIGKILL


async def test_waiter_that_dies_does_not_block_the_queue(redis_url: str) -> None:
    """A dead process's ticket, handed the key, is dropped once its lease runs out."""
    ns = _namespace()
    watch = Watch()
    reader, writer = SPAWN.Pipe(duplex=False)
    go, queued = SPAWN.Event(), SPAWN.Event()
    async with RedisKeyedLock(redis_url, namespace=ns, lease=LEASE, observer=watch) as lock:
        first = lock("k")
        await first.__aenter__()
        with processes((workers.queue_up, (redis_url, ns, "doomed", go, queued, writer))) as (proc,):
            assert await arecv(reader) == "ready"
            go.set()
            assert await asyncio.to_thread(queued.wait, WAIT)
            behind = asyncio.create_task(lock.run("k", lambda: "behind", label="behind"))
            await watch.until("behind", "requested")
            proc.kill()
            proc.join(WAIT)
            await first.__aexit__(None, None, None)  # the key goes to the dead ticket first
            assert await asyncio.wait_for(behind, WAIT) == "behind"


async def test_paused_holder_is_told_it_lost_the_key(redis_url: str) -> None:
    ns = _namespace()
    reader, writer = SPAWN.Pipe(duplex=False)
    async with RedisKeyedLock(redis_url, namespace=ns, lease=LEASE) as lock:
        with processes((workers.hold_forever, (redis_url, ns, LEASE, writer))) as (proc,):
            pid, their_token = await arecv(reader)
            os.kill(pid, signal.SIGSTOP)
            try:
                mine = lock("k", label="after the pause")
                async with mine:  # granted once the paused holder's lease ran out
                    assert mine.token is not None and mine.token > their_token
                    os.kill(pid, signal.SIGCONT)
                    kind, held, message = await arecv(reader)
                    assert (kind, held) == ("lost", True)
                    assert "lost the lock on key 'k'" in message and redis_url in message
            finally:
                os.kill(pid, signal.SIGCONT)
            proc.join(WAIT)
            assert proc.exitcode == 0
