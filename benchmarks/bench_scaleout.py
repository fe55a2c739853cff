"""Many processes, part 1: lock handoff latency across processes, RedisKeyedLock vs redis-py's Lock.

    python benchmarks/bench_scaleout.py [--quick]

Starts a throwaway Redis server (``chatkit.testing.redis_server()``) and two processes that pass one key
back and forth: the holder waits until the other process is waiting, notes the time and releases; the
waiter notes the time it got the key. The handoff latency is the difference (both processes read the
same system-wide monotonic clock). Each hold ends at a random moment (0-100 ms after the other process
started waiting), so a polling waiter is caught at a random point of its poll interval. Both locks run against the same server in the same run;
redis-py's ``Lock`` with its default ``sleep=0.1`` polls, ``RedisKeyedLock`` is woken.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import sys
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

SPAWN = multiprocessing.get_context("spawn")
HOLD = 0.1  # each hold lasts a random 0-100 ms once the other process waits (redis-py's poll interval)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def player(kind: str, url: str, namespace: str, me: int, rounds: int, peer: Connection, out: Connection, start: Any) -> None:
    """One of the two processes: hold, hand over when the other waits, wait, take over, ..."""
    asyncio.run(_player(kind, url, namespace, me, rounds, peer, out, start))


async def _player(
    kind: str, url: str, namespace: str, me: int, rounds: int, peer: Connection, out: Connection, start: Any
) -> None:
    latencies: list[float] = []
    rng = random.Random(me)
    if kind == "chatkit":
        from chatkit import LockEvent, RedisKeyedLock

        announce = False

        def observe(event: LockEvent) -> None:
            if event.kind == "requested" and announce:
                peer.send("waiting")  # in the queue now: the holder may release

        lock = RedisKeyedLock(url, namespace=namespace, lease=10, observer=observe)
        request: Any = None

        async def acquire(first: bool) -> None:
            nonlocal request, announce
            announce = not first
            request = lock("k")
            await request.__aenter__()

        async def release() -> None:
            await request.__aexit__(None, None, None)

        async def close() -> None:
            await lock.aclose()
    else:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url)
        rlock = client.lock(f"{namespace}:k", timeout=10)  # default sleep=0.1: a waiter polls

        async def acquire(first: bool) -> None:
            if first:
                assert await rlock.acquire()
            elif not await rlock.acquire(blocking=False):
                peer.send("waiting")  # it failed once: it is in its polling loop now
                assert await rlock.acquire()
            else:
                raise RuntimeError("the other process should have held the lock")

        async def release() -> None:
            await rlock.release()

        async def close() -> None:
            await client.aclose()

    holding = me == 0
    if holding:
        await acquire(True)
    out.send("ready")
    await asyncio.to_thread(start.wait)  # process 0 holds the key before process 1 asks
    for _ in range(rounds):
        if holding:
            assert await asyncio.to_thread(peer.recv) == "waiting"
            await asyncio.sleep(rng.uniform(0, HOLD))  # the holder's "work": it ends at a random moment
            t0 = time.monotonic_ns()
            await release()
            peer.send(t0)
            assert await asyncio.to_thread(peer.recv) == "taken"  # (a polling lock would let us back in first)
        else:
            await acquire(False)
            t1 = time.monotonic_ns()
            peer.send("taken")
            t0 = await asyncio.to_thread(peer.recv)
            latencies.append((t1 - t0) / 1e6)
        holding = not holding
    if holding:
        await release()
    await close()
    out.send(latencies)


def handoffs(kind: str, url: str, rounds: int) -> list[float]:
    """Latencies (ms) of ``rounds`` handoffs between two processes."""
    a, b = SPAWN.Pipe()
    results = [SPAWN.Pipe(duplex=False) for _ in range(2)]
    namespace = f"bench:{uuid.uuid4().hex[:8]}"
    start = SPAWN.Event()
    procs = [
        SPAWN.Process(target=player, args=(kind, url, namespace, i, rounds, end, results[i][1], start))
        for i, end in enumerate((a, b))
    ]
    for p in procs:
        p.start()
    assert [r.recv() for r, _ in results] == ["ready", "ready"]
    start.set()
    latencies = [lat for r, _ in results for lat in r.recv()]
    for p in procs:
        p.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer handoffs, for a smoke run")
    args = parser.parse_args()
    from chatkit.testing import redis_server

    ours_n, theirs_n = (60, 30) if args.quick else (300, 150)
    with redis_server() as server:
        ours = handoffs("chatkit", server.url, ours_n)
        theirs = handoffs("redis-py", server.url, theirs_n)
    rows = []
    for name, lat in (("RedisKeyedLock (woken)", ours), ("redis-py Lock (polls, sleep=0.1)", theirs)):
        rows.append((name, f"{len(lat)}", f"{statistics.median(lat):.2f} ms", f"{_percentile(lat, 0.99):.2f} ms"))
    ratio50 = statistics.median(theirs) / statistics.median(ours)
    ratio99 = _percentile(theirs, 0.99) / _percentile(ours, 0.99)
    header = ("lock handoff across 2 processes", "handoffs", "p50", "p99")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    print(f"Scale-out benchmark, part 1 (python {sys.version.split()[0]}, loopback Redis)")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"redis-py Lock / RedisKeyedLock: p50 {ratio50:.0f}x, p99 {ratio99:.0f}x  (target: RedisKeyedLock p50 < 2 ms)")


if __name__ == "__main__":
    main()
