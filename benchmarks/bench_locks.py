"""KeyedLock benchmark: ratios against asyncio.Lock, measured in one run.

    python benchmarks/bench_locks.py [--quick]

Prints one table. Each figure is the best of several repetitions (the machine is shared and noisy), and
every speed figure is a ratio against a baseline measured in the same run, so the table travels between
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable

from chatkit import KeyedLock


def best_of(reps: int, fn: Callable[[], Awaitable[float]]) -> float:
    async def go() -> float:
        return min([await fn() for _ in range(reps)])

    return asyncio.run(go())


# ----------------------------------------------------------------------------- uncontended


def uncontended(n: int, reps: int, variant: str = "str key") -> tuple[float, float]:
    """Per acquire+release: ``asyncio.Lock`` and ``KeyedLock``, interleaved so both see the same machine.

    ``variant``: ``"str key"`` is the lock as used by default (a str key, nobody has asked for statistics);
    ``"timed"`` measures hold times (``statistics()`` was called once); ``"tuple key"`` uses a key that is
    neither a str nor an int, which takes the general request path.
    """
    alock = asyncio.Lock()
    klock = KeyedLock()
    if variant == "timed":
        klock.statistics()  # from now on its uncontended path reads the clock twice per acquisition
    key: object = ("user", 7) if variant == "tuple key" else "k"

    async def with_asyncio() -> float:
        t = time.perf_counter()
        for _ in range(n):
            async with alock:
                pass
        return (time.perf_counter() - t) / n

    async def with_keyed() -> float:
        t = time.perf_counter()
        for _ in range(n):
            async with klock(key):
                pass
        return (time.perf_counter() - t) / n

    async def both() -> tuple[float, float]:
        a, k = [], []
        for _ in range(reps):  # interleaved, so both see the same machine
            a.append(await with_asyncio())
            k.append(await with_keyed())
        return min(a), min(k)

    return asyncio.run(both())


# ----------------------------------------------------------------------------- handoff


async def handoff_keyed(waiters: int) -> float:
    lock = KeyedLock()
    done = 0

    async def worker() -> None:
        nonlocal done
        async with lock("k"):
            done += 1

    gate = lock("k")
    await gate.__aenter__()
    tasks = [asyncio.create_task(worker()) for _ in range(waiters)]
    while lock.waiters("k") < waiters:
        await asyncio.sleep(0)
    t = time.perf_counter()
    await gate.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t
    assert done == waiters and len(lock) == 0
    return elapsed / waiters


async def handoff_asyncio(waiters: int) -> float:
    lock = asyncio.Lock()
    done = 0

    async def worker() -> None:
        nonlocal done
        async with lock:
            done += 1

    await lock.acquire()
    tasks = [asyncio.create_task(worker()) for _ in range(waiters)]
    for _ in range(3):
        await asyncio.sleep(0)
    while len(lock._waiters or ()) < waiters:  # type: ignore[attr-defined]
        await asyncio.sleep(0)
    t = time.perf_counter()
    lock.release()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t
    assert done == waiters
    return elapsed / waiters


# ----------------------------------------------------------------------------- many keys


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def million_keys(n: int) -> tuple[int, float, int]:
    lock = KeyedLock()
    gc.collect()
    before = rss_mb()

    async def go() -> None:
        for i in range(n):
            async with lock(i):
                pass

    asyncio.run(go())
    gc.collect()
    return len(lock), rss_mb() - before, n


def dict_of_locks_keys(n: int) -> int:
    locks: dict[int, asyncio.Lock] = {}

    async def go() -> None:
        for i in range(n):
            async with locks.setdefault(i, asyncio.Lock()):
                pass

    asyncio.run(go())
    return len(locks)


# ----------------------------------------------------------------------------- cross-thread


def cross_thread_latency(rounds: int) -> tuple[float, float]:
    """A plain thread holds the key while an asyncio task on another thread's loop waits for it.

    Each round: the thread takes the key, the task queues (seen through the observer hook), the thread
    releases; the figure is the time from that release until the task runs under the lock.
    """
    lock = KeyedLock()
    latencies: list[float] = []
    queued = threading.Event()
    thread_holds = threading.Event()
    round_done = threading.Event()
    released_at = [0.0]

    def observer(event: object) -> None:
        if getattr(event, "kind", None) == "requested" and getattr(event, "label", None) == "loop":
            queued.set()

    lock.add_observer(observer)

    async def loop_side() -> None:
        for _ in range(rounds):
            await asyncio.to_thread(thread_holds.wait)
            thread_holds.clear()
            async with lock("k", label="loop"):
                latencies.append(time.perf_counter() - released_at[0])
            round_done.set()

    t = threading.Thread(target=asyncio.run, args=(loop_side(),))
    t.start()
    for _ in range(rounds):
        with lock.sync("k", label="thread"):
            thread_holds.set()
            queued.wait()
            queued.clear()
            released_at[0] = time.perf_counter()
        round_done.wait()
        round_done.clear()
    t.join()
    latencies.sort()
    return statistics.median(latencies), latencies[max(0, int(len(latencies) * 0.99) - 1)]


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    q = args.quick
    sizes = [1_000, 10_000] if q else [1_000, 10_000, 100_000]
    rows: list[tuple[str, str, str, str]] = []

    # First, while peak RSS is still the interpreter's own: the many-keys cases.
    n_keys = 100_000 if q else 1_000_000
    live, growth, n = million_keys(n_keys)
    key_rows = [(f"{n:,} distinct keys", f"len(lock) after = {live}", f"peak RSS +{growth:.1f} MB", "0 keys, <= 50 MB")]
    before = rss_mb()
    left = dict_of_locks_keys(n)
    key_rows.append(
        (f"{n:,} keys, dict of asyncio.Lock", f"len(dict) after = {left:,}", f"peak RSS +{rss_mb() - before:.1f} MB", "-")
    )

    n_unc, reps_unc = (20_000, 5) if q else (50_000, 15)
    a, k = uncontended(n_unc, reps_unc)
    rows.append(
        ("uncontended acquire+release", f"{k * 1e9:.0f} ns vs asyncio.Lock {a * 1e9:.0f} ns", f"{k / a:.2f}x", "<= 2.0x")
    )
    a, k = uncontended(n_unc, reps_unc, "timed")
    rows.append(("  ... hold times measured (after statistics())", f"{k * 1e9:.0f} ns vs {a * 1e9:.0f} ns", f"{k / a:.2f}x", "-"))
    a, k = uncontended(n_unc, reps_unc, "tuple key")
    rows.append(("  ... a tuple key (general request path)", f"{k * 1e9:.0f} ns vs {a * 1e9:.0f} ns", f"{k / a:.2f}x", "-"))

    per_k: dict[int, float] = {}
    per_a_by_n: dict[int, float] = {}
    for n in sizes:
        reps = 3 if n <= 10_000 else 2
        per_k[n] = best_of(reps, lambda n=n: handoff_keyed(n))
        per_a = per_a_by_n[n] = best_of(reps, lambda n=n: handoff_asyncio(n))
        rows.append(
            (
                f"handoff, {n:,} waiters",
                f"{1 / per_k[n]:,.0f}/s vs asyncio.Lock {1 / per_a:,.0f}/s",
                f"{per_a / per_k[n]:.2f}x of asyncio",
                ">= 0.5x",
            )
        )
    flat = per_k[sizes[-1]] / per_k[sizes[0]]
    flat_a = per_a_by_n[sizes[-1]] / per_a_by_n[sizes[0]]
    rows.append(
        (
            f"handoff flatness {sizes[-1]:,} vs {sizes[0]:,}",
            f"time per handoff (asyncio.Lock: {flat_a:.2f}x)",
            f"{flat:.2f}x",
            "<= 1.5x",
        )
    )


    rows.extend(key_rows)
    med, p99 = cross_thread_latency(300 if q else 2_000)
    rows.append(("cross-thread handoff (sync thread -> loop)", f"median {med * 1e6:.0f} us", f"p99 {p99 * 1e6:.0f} us", "-"))

    widths = [max(len(r[i]) for r in rows + [("case", "measured", "ratio", "target")]) for i in range(4)]
    header = ("case", "measured", "ratio", "target")
    print(f"KeyedLock benchmark (python {sys.version.split()[0]})")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
