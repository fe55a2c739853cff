"""Demonstrations of :class:`~chatkit.KeyedLock`: FIFO handoff per key, multi-key deadlock, one lock across threads."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..locks import KeyedLock
from ..timeline import Timeline
from ._common import InFlight

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "LockDemoResult",
    "lock_fifo",
    "multi_key_deadlock",
    "shared_across_threads",
]


@dataclass(frozen=True, slots=True)
class LockDemoResult:
    """What a :class:`~chatkit.KeyedLock` demonstration did.

    Attributes:
        name: the demonstration.
        timeline: wait and hold spans per caller, plus their work.
        order: per key, the callers in the order they got it, as ``"key: a -> b -> c"`` lines.
        overlaps: how many times two callers held one key at the same time (always 0 for ``KeyedLock``).
        deadlocked: whether the callers were still stuck when the demonstration gave up on them.
    """

    name: str
    timeline: Timeline = field(repr=False)
    order: tuple[str, ...]
    overlaps: int
    deadlocked: bool = False

    def summary(self) -> str:
        """Deterministic lines: the acquisition order per key, overlaps, deadlock."""
        lines = [f"{self.name}:", *(f"  {line}" for line in self.order), f"  overlapping holders: {self.overlaps}"]
        if self.deadlocked:
            lines.append("  DEADLOCK: every caller waits for a key another caller holds")
        return "\n".join(lines)

    def plot(self, *, width: float = 10.0) -> Figure:
        """The demonstration's timeline."""
        return self.timeline.plot(title=self.name, width=width)

    def _repr_html_(self) -> str:
        from .._timeline_plot import figure_html

        return figure_html(self.plot(), alt=self.name)


class _Exclusion:
    """Counts holders per key (thread-safe) to detect two holders at once, and records acquisition order."""

    def __init__(self) -> None:
        import threading

        self._guard = threading.Lock()
        self._holders: dict[str, int] = {}
        self.overlaps = 0
        self.order: dict[str, list[str]] = {}

    def enter(self, key: str, who: str) -> None:
        with self._guard:
            self._holders[key] = self._holders.get(key, 0) + 1
            if self._holders[key] > 1:
                self.overlaps += 1
            self.order.setdefault(key, []).append(who)

    def leave(self, key: str) -> None:
        with self._guard:
            self._holders[key] -= 1

    def lines(self) -> tuple[str, ...]:
        return tuple(f"{key}: {' -> '.join(names)}" for key, names in self.order.items())


async def lock_fifo(*, requests: Sequence[tuple[str, str]] | None = None, hold: float = 0.01) -> LockDemoResult:
    """Several requests on two keys at once: one key's requests run one at a time, in arrival order,
    with direct handoff; the other key's run in parallel with them.

    Args:
        requests: ``(name, key)`` pairs in arrival order; default four on ``"s1"`` and two on ``"s2"``.
        hold: seconds each request holds its key (its simulated work).

    Raises:
        ValueError: a negative ``hold`` or duplicated request names.
    """
    if requests is None:
        requests = [("A", "s1"), ("B", "s1"), ("C", "s2"), ("D", "s1"), ("E", "s2"), ("F", "s1")]
    names = [n for n, _ in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"request names must be distinct, got {names!r}")
    if hold < 0:
        raise ValueError(f"hold must be >= 0 seconds, got {hold!r}")
    timeline = Timeline()
    lock = KeyedLock(observer=timeline.observe_lock)
    seen = _Exclusion()

    async def one(name: str, key: str) -> None:
        async with lock(key, label=name):
            seen.enter(key, name)
            with timeline.span("work", who=name, key=key):
                await asyncio.sleep(hold)
            seen.leave(key)

    await asyncio.gather(*(one(n, k) for n, k in requests))
    return LockDemoResult("FIFO handoff per key", timeline, seen.lines(), seen.overlaps)


async def multi_key_deadlock(*, keyed: bool, patience: float = 0.2) -> LockDemoResult:
    """Two callers each need keys ``a`` and ``b``, asking in opposite orders.

    Naive (``keyed=False``): a dict of ``asyncio.Lock`` taken one key at a time in the caller's order. A
    gate makes sure both hold their first key before asking for the second, so they deadlock on every run.
    The timeline shows each caller holding its first key (lanes say ``holds a · waits for b``) and its
    cancelled wait for the second, and marks the deadlock with who holds the key each one waits for.
    ``KeyedLock`` (``keyed=True``) takes ``lock("a", "b")`` and ``lock("b", "a")`` atomically: no deadlock.

    Args:
        keyed: use ``KeyedLock`` instead of the naive dict of locks.
        patience: seconds to let a deadlock prove itself before the stuck callers are cancelled.
    """
    timeline = Timeline()
    gate = InFlight(["caller 1", "caller 2"])
    seen = _Exclusion()
    lock = KeyedLock(observer=timeline.observe_lock)
    lock.add_observer(gate.observe_lock)
    naive = {"a": asyncio.Lock(), "b": asyncio.Lock()}

    async def keyed_caller(name: str, first: str, second: str) -> None:
        async with lock(first, second, label=name):
            seen.enter("a+b", name)
            with timeline.span("work", who=name, key=(first, second)):
                await gate.arrive(name)
                await asyncio.sleep(0.01)
            seen.leave("a+b")

    async def naive_caller(name: str, first: str, second: str) -> None:
        with timeline.span("wait", who=name, key=first):
            await naive[first].acquire()
        try:
            with timeline.span("hold", who=name, key=first):
                await gate.arrive(name)  # both now hold their first key
                with timeline.span("wait", who=name, key=second):  # ... and wait for the other's
                    await naive[second].acquire()
                try:
                    seen.enter("a+b", name)
                    with timeline.span("work", who=name, key=(first, second)):
                        await asyncio.sleep(0.01)
                    seen.leave("a+b")
                finally:
                    naive[second].release()
        finally:
            naive[first].release()

    caller = keyed_caller if keyed else naive_caller
    tasks = [
        asyncio.create_task(caller("caller 1", "a", "b"), name="caller 1"),
        asyncio.create_task(caller("caller 2", "b", "a"), name="caller 2"),
    ]
    _, pending = await asyncio.wait(tasks, timeout=patience)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if pending:
        wants = {"caller 1": ("b", "caller 2"), "caller 2": ("a", "caller 1")}
        for name, (key, holder) in wants.items():
            timeline.mark("deadlock", who=name, key=key, detail=f"waits for {key}, held by {holder}")
    title = "KeyedLock: lock(a, b) and lock(b, a)" if keyed else "dict of asyncio.Lock, one key at a time"
    return LockDemoResult(title, timeline, seen.lines(), seen.overlaps, deadlocked=bool(pending))


async def shared_across_threads(*, rounds: int = 3, hold: float = 0.005) -> LockDemoResult:
    """One ``KeyedLock`` shared by this event loop, another thread's event loop and a plain thread.

    Each caller takes the key ``"shared"`` ``rounds`` times; every acquisition is checked for overlap.
    The other loop and the plain thread are started and joined here, without blocking this loop.

    Raises:
        ValueError: ``rounds < 1`` or a negative ``hold``.
    """
    import threading
    import time

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    if hold < 0:
        raise ValueError(f"hold must be >= 0 seconds, got {hold!r}")
    timeline = Timeline()
    lock = KeyedLock(observer=timeline.observe_lock)
    seen = _Exclusion()

    async def loop_caller(name: str) -> None:
        for _ in range(rounds):
            async with lock("shared", label=name):
                seen.enter("shared", name)
                with timeline.span("work", who=name, key="shared"):
                    await asyncio.sleep(hold)
                seen.leave("shared")
            await asyncio.sleep(0)

    def thread_caller(name: str) -> None:
        for _ in range(rounds):
            with lock.sync("shared", label=name):
                seen.enter("shared", name)
                with timeline.span("work", who=name, key="shared"):
                    time.sleep(hold)  # simulated blocking work in a plain thread
                seen.leave("shared")

    other_loop = threading.Thread(target=lambda: asyncio.run(loop_caller("another event loop")), name="other-loop")
    plain = threading.Thread(target=thread_caller, args=("plain thread",), name="plain-thread")
    other_loop.start()
    plain.start()
    await loop_caller("this event loop")
    await asyncio.to_thread(other_loop.join)
    await asyncio.to_thread(plain.join)
    counts = {name: seen.order["shared"].count(name) for name in dict.fromkeys(seen.order["shared"])}
    order = tuple(f"{name}: {n} acquisitions" for name, n in sorted(counts.items()))
    return LockDemoResult("one lock, three kinds of caller", timeline, order, seen.overlaps)
