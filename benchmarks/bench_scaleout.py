"""Many processes: lock handoff latency, turns per second with 1, 2 and 4 workers, and what each guarantee costs.

    python benchmarks/bench_scaleout.py [--quick] [--part 1|2|3]

Starts a throwaway Redis server and PostgreSQL cluster (``chatkit.testing``) and prints three tables.

1. **Handoff latency across processes**, ``RedisKeyedLock`` vs redis-py's ``Lock`` (same server, same run).
   Two processes pass one key back and forth: the holder waits until the other process is waiting, notes
   the time and releases; the waiter notes the time it got the key (both read the same system-wide
   monotonic clock). Each hold ends at a random moment (0-100 ms after the other process started
   waiting), so a polling waiter is caught at a random point of its poll interval. redis-py's ``Lock``
   with its default ``sleep=0.1`` polls, ``RedisKeyedLock`` is woken.
2. **Turns per second with 1, 2 and 4 worker processes**, each a ``SessionManager`` on a ``RedisKeyedLock``
   and a ``FencedPostgresSaver`` (one connection each), at a fixed model latency of 50 ms. 64 users each
   send 8 messages one after another (each waits for its reply), and a round-robin load balancer sends
   each message to the next worker, so consecutive turns of a session run on different processes.
   Scaling ratio: turns per second against 1 worker. Afterwards every session's history is read: messages
   lost (or out of order) must be 0.
3. **What each guarantee costs**: one process, one session, turns one after another with a zero-latency
   model, median wall time per turn on PostgreSQL: ``KeyedLock`` + ``AsyncPostgresSaver`` (one process
   only), ``KeyedLock`` + ``FencedPostgresSaver`` (commits are a compare-and-set), ``RedisKeyedLock`` +
   ``FencedPostgresSaver`` (every guarantee across processes: lock round trips, the claim, fenced commit and
   prune).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import sys
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

SPAWN = multiprocessing.get_context("spawn")
HOLD = 0.1  # each hold lasts a random 0-100 ms once the other process waits (redis-py's poll interval)
LATENCY = 0.05  # part 2: the model's fixed latency


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


# ------------------------------------------------------------------------------------ part 2: throughput


def chat_worker(redis_url: str, namespace: str, dsn: str, requests: Connection, replies: Connection) -> None:
    """A worker process: a SessionManager on RedisKeyedLock + FencedPostgresSaver, answering ``(id, session,
    text)`` requests with ``(id, turn, error)``; ``None`` ends it."""
    asyncio.run(_chat_worker(redis_url, namespace, dsn, requests, replies))


async def _chat_worker(redis_url: str, namespace: str, dsn: str, requests: Connection, replies: Connection) -> None:
    from chatkit import ExtractiveChatModel, FencedPostgresSaver, RedisKeyedLock, SessionManager

    loop = asyncio.get_running_loop()
    async with FencedPostgresSaver.from_conn_string(dsn) as saver, RedisKeyedLock(redis_url, namespace=namespace) as lock:
        manager = SessionManager(model=ExtractiveChatModel(latency=LATENCY), checkpointer=saver, lock=lock)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(rid: int, sid: str, text: str) -> None:
            try:
                result = await manager.chat(sid, text, create_if_missing=True)
            except Exception as exc:
                replies.send((rid, None, f"{type(exc).__name__}: {exc}"))
            else:
                replies.send((rid, result.turn, None))

        replies.send("ready")
        while True:
            request = await asyncio.to_thread(requests.recv)
            if request is None:
                break
            task = loop.create_task(answer(*request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        await manager.aclose()
    replies.send(("bye", time.process_time()))


class Workers:
    """N worker processes and the futures of the requests sent to them (answered by one thread per worker)."""

    def __init__(self, context: Any, n: int, redis_url: str, namespace: str, dsn: str) -> None:
        self.pipes = []
        self.procs = []
        for _ in range(n):
            req_r, req_w = context.Pipe(duplex=False)
            rep_r, rep_w = context.Pipe(duplex=False)
            proc = context.Process(target=chat_worker, args=(redis_url, namespace, dsn, req_r, rep_w), daemon=True)
            proc.start()
            self.pipes.append((req_w, rep_r))
            self.procs.append(proc)
        for _, rep_r in self.pipes:
            assert rep_r.recv() == "ready"
        self.futures: dict[int, asyncio.Future[tuple[int | None, str | None]]] = {}
        self.cpu: list[float] = []  # each worker's CPU seconds, reported when it ends
        self.next_id = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.senders = [threading.Lock() for _ in self.pipes]

    def start_reading(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for _, rep_r in self.pipes:
            threading.Thread(target=self._read, args=(rep_r,), daemon=True).start()

    def _read(self, conn: Connection) -> None:
        while True:
            reply = conn.recv()
            if reply[0] == "bye":
                self.cpu.append(reply[1])
                return
            rid, turn, err = reply
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._resolve, rid, (turn, err))

    def _resolve(self, rid: int, value: tuple[int | None, str | None]) -> None:
        self.futures.pop(rid).set_result(value)

    async def chat(self, worker: int, sid: str, text: str) -> tuple[int | None, str | None]:
        assert self.loop is not None
        self.next_id += 1
        fut = self.loop.create_future()
        self.futures[self.next_id] = fut
        self.pipes[worker][0].send((self.next_id, sid, text))
        return await fut

    def close(self) -> None:
        for req_w, _ in self.pipes:
            req_w.send(None)
        for p in self.procs:
            p.join(60)
        deadline = time.monotonic() + 10
        while len(self.cpu) < len(self.procs) and time.monotonic() < deadline:  # the readers' last message
            time.sleep(0.01)


async def _users(workers: Workers, n_workers: int, users: int, messages: int, tag: str) -> tuple[float, list[str]]:
    """Every user sends its messages one after another, round-robin over the workers; (seconds, errors)."""
    errors: list[str] = []
    counter = iter(range(10**9))

    async def user(u: int) -> None:
        sid = f"{tag}-u{u}"
        for k in range(messages):
            turn, err = await workers.chat(next(counter) % n_workers, sid, f"message {k} of user {u}")
            if err is not None or turn != k + 1:
                errors.append(err or f"{sid}: message {k} was told turn {turn}")

    t0 = time.perf_counter()
    await asyncio.gather(*(user(u) for u in range(users)))
    return time.perf_counter() - t0, errors


async def _lost(dsn: str, tag: str, users: int, messages: int) -> int:
    """Messages missing from (or out of order in) the users' histories."""
    from chatkit import FencedPostgresSaver, SessionManager

    async with FencedPostgresSaver.from_conn_string(dsn) as saver:
        manager = SessionManager(checkpointer=saver)
        lost = 0
        for u in range(users):
            history = [m.content for m in await manager.get_history(f"{tag}-u{u}") if m.role == "user"]
            expected = [f"message {k} of user {u}" for k in range(messages)]
            lost += sum(1 for a, b in zip(history, expected) if a != b) + abs(len(expected) - len(history))
        return lost


def throughput(redis_url: str, dsn: str, counts: list[int], users: int, messages: int) -> list[tuple[int, float, float, int, int]]:
    """(workers, turns per second, workers' CPU ms per turn, errors, messages lost) for each worker count."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["chatkit", "chatkit.sessions", "chatkit.sessions._fenced_sql", "chatkit.locks.redis", "langgraph.checkpoint.postgres.aio", "redis.asyncio"])
    rows = []
    for n in counts:
        namespace, tag = f"bench:{uuid.uuid4().hex[:8]}", f"s{n}-{uuid.uuid4().hex[:6]}"
        workers = Workers(context, n, redis_url, namespace, dsn)

        async def run() -> tuple[float, list[str]]:
            workers.start_reading(asyncio.get_running_loop())
            return await _users(workers, n, users, messages, tag)

        try:
            seconds, errors = asyncio.run(run())
        finally:
            workers.close()
        lost = asyncio.run(_lost(dsn, tag, users, messages))
        rows.append((n, users * messages / seconds, sum(workers.cpu) * 1000 / (users * messages), len(errors), lost))
    return rows


# ------------------------------------------------------------------------------------ part 3: cost


async def _turn_costs(redis_url: str, dsn: str, turns: int) -> list[tuple[str, float]]:
    """Median wall ms per sequential turn (zero-latency model, one session) for each configuration."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    from chatkit import ExtractiveChatModel, FencedPostgresSaver, KeyedLock, RedisKeyedLock, SessionManager

    configs: list[tuple[str, Any, bool]] = [
        ("KeyedLock + AsyncPostgresSaver (one process only)", AsyncPostgresSaver, False),
        ("KeyedLock + FencedPostgresSaver (compare-and-set)", FencedPostgresSaver, False),
        ("RedisKeyedLock + FencedPostgresSaver (across processes)", FencedPostgresSaver, True),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for block in range(4):  # alternate the configurations in blocks: drift on the shared machine hits all alike
        for name, saver_cls, distributed in configs[block % 3 :] + configs[: block % 3]:
            async with saver_cls.from_conn_string(dsn) as saver:
                lock: Any = RedisKeyedLock(redis_url, namespace=f"bench:{uuid.uuid4().hex[:8]}") if distributed else KeyedLock()
                manager = SessionManager(model=ExtractiveChatModel(), checkpointer=saver, lock=lock)
                sid = await manager.create_session()
                await manager.chat(sid, "warm up")
                for i in range(turns):
                    t0 = time.perf_counter()
                    await manager.chat(sid, f"question {i}")
                    samples[name].append((time.perf_counter() - t0) * 1000)
                await manager.aclose()
                if distributed:
                    await lock.aclose()
    return [(name, statistics.median(samples[name])) for name, _, _ in configs]


# ------------------------------------------------------------------------------------ output


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


def part1(url: str, quick: bool) -> None:
    ours_n, theirs_n = (60, 30) if quick else (300, 150)
    ours = handoffs("chatkit", url, ours_n)
    theirs = handoffs("redis-py", url, theirs_n)
    rows = []
    for name, lat in (("RedisKeyedLock (woken)", ours), ("redis-py Lock (polls, sleep=0.1)", theirs)):
        rows.append((name, f"{len(lat)}", f"{statistics.median(lat):.2f} ms", f"{_percentile(lat, 0.99):.2f} ms"))
    ratio50 = statistics.median(theirs) / statistics.median(ours)
    ratio99 = _percentile(theirs, 0.99) / _percentile(ours, 0.99)
    print("\nPart 1: lock handoff latency across 2 processes, loopback Redis")
    _table(("lock handoff across 2 processes", "handoffs", "p50", "p99"), rows)
    print(f"redis-py Lock / RedisKeyedLock: p50 {ratio50:.0f}x, p99 {ratio99:.0f}x  (target: RedisKeyedLock p50 < 2 ms)")


def part2(url: str, dsn: str, quick: bool) -> None:
    users, messages = (16, 4) if quick else (64, 8)
    rows = throughput(url, dsn, [1, 2, 4], users, messages)
    base = rows[0][1]
    print(f"\nPart 2: turns per second, {users} users x {messages} messages one after another, round-robin over the "
          f"workers, {LATENCY * 1000:.0f} ms model latency, RedisKeyedLock + FencedPostgresSaver")
    _table(
        ("worker processes", "turns", "turns/s", "vs 1 worker", "worker CPU per turn", "errors", "messages lost"),
        [
            (str(n), str(users * messages), f"{tps:.0f}", f"{tps / base:.2f}x", f"{cpu:.1f} ms", str(err), str(lost))
            for n, tps, cpu, err, lost in rows
        ],
    )
    import os

    print(f"(this machine has {os.cpu_count()} cores; the workers, Redis and PostgreSQL share them)")


def part3(url: str, dsn: str, quick: bool) -> None:
    rows = asyncio.run(_turn_costs(url, dsn, 25 if quick else 100))
    base = rows[0][1]
    print("\nPart 3: what each guarantee costs: one session, sequential turns, zero-latency model, PostgreSQL")
    _table(("configuration", "ms per turn (median)", "vs one-process"), [(n, f"{ms:.2f}", f"{ms / base:.2f}x") for n, ms in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer handoffs and turns, for a smoke run")
    parser.add_argument("--part", type=int, choices=(1, 2, 3), help="run one part only")
    args = parser.parse_args()
    from chatkit.testing import postgres_server, redis_server

    print(f"Scale-out benchmark (python {sys.version.split()[0]})")
    with redis_server() as server:
        if args.part in (None, 1):
            part1(server.url, args.quick)
        if args.part in (None, 2, 3):
            with postgres_server() as pg:
                asyncio.run(_setup(pg.dsn))
                if args.part in (None, 2):
                    part2(server.url, pg.dsn, args.quick)
                if args.part in (None, 3):
                    part3(server.url, pg.dsn, args.quick)


async def _setup(dsn: str) -> None:
    from chatkit import FencedPostgresSaver

    async with FencedPostgresSaver.from_conn_string(dsn) as saver:
        await saver.setup()


if __name__ == "__main__":
    main()
