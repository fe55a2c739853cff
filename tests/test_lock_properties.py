"""Property-based schedules for KeyedLock: random requests, releases, cancellations and timeouts.

Hypothesis draws a schedule; it runs on one event loop whose clock is fake, so each schedule is replayed
exactly. After every step the test checks: no key has two holders; per key, holders come in arrival order;
no waiter that could run is left waiting (no lost wakeup); at the end nothing is left behind.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from chatkit import KeyedLock, LockTimeout
from tests.conftest import FakeClock, settle

KEYS = ("a", "b", "c")

request_op = st.tuples(
    st.just("request"),
    st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True),
    st.sampled_from([None, 1.0, 3.0]),
)
release_op = st.tuples(st.just("release"), st.integers(0, 5))
cancel_op = st.tuples(st.just("cancel"), st.integers(0, 5))
advance_op = st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.0]))
# After each step the loop runs for a drawn number of rounds: 30 lets everything settle; 0-2 stop half-way,
# e.g. after a key was handed to a waiter but before that waiter resumed.
schedules = st.lists(
    st.tuples(st.one_of(request_op, release_op, cancel_op, advance_op), st.sampled_from([0, 1, 2, 30, 30])),
    max_size=30,
)


@dataclass
class Req:
    index: int
    keys: tuple[str, ...]
    release: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = "waiting"  # waiting -> holding -> released | timed out | cancelled
    task: asyncio.Task[None] | None = None


class World:
    def __init__(self, clock: FakeClock) -> None:
        self.lock = KeyedLock(clock=clock)
        self.reqs: list[Req] = []
        self.owner: dict[str, int | None] = dict.fromkeys(KEYS)
        self.acquired_order: dict[str, list[int]] = {k: [] for k in KEYS}
        self.violations: list[str] = []

    async def body(self, r: Req, timeout: float | None) -> None:
        try:
            async with self.lock(*r.keys, timeout=timeout):
                for k in r.keys:
                    if self.owner[k] is not None:
                        self.violations.append(f"{k} held by {self.owner[k]} and {r.index}")
                    self.owner[k] = r.index
                    self.acquired_order[k].append(r.index)
                r.status = "holding"
                try:
                    await r.release.wait()
                finally:
                    for k in r.keys:
                        self.owner[k] = None
            r.status = "released"
        except LockTimeout:
            r.status = "timed out"
        except asyncio.CancelledError:
            r.status = "cancelled"
            raise

    def check_quiescent(self) -> None:
        for r in self.reqs:  # a task cancelled before it ever ran never reached the lock
            if r.status == "waiting" and r.task is not None and r.task.done():
                r.status = "cancelled"
        # Per key, holders came in arrival order.
        for k, order in self.acquired_order.items():
            if order != sorted(order):
                self.violations.append(f"{k} granted out of order: {order}")
        # No lost wakeup: in the ideal FIFO lock, would any waiting request be able to run now?
        waiting = [r for r in self.reqs if r.status == "waiting"]
        for r in waiting:
            free = all(self.owner[k] is None for k in r.keys)
            first = all(
                next(w for w in waiting if k in w.keys) is r for k in r.keys
            )
            if free and first:
                self.violations.append(f"request {r.index} for {r.keys} could run but waits")


async def run_schedule(ops: list[tuple]) -> World:
    clock = FakeClock()
    asyncio.get_running_loop().time = clock.time  # type: ignore[method-assign]
    world = World(clock)
    for op, rounds in ops:
        kind = op[0]
        if kind == "request":
            r = Req(len(world.reqs), tuple(op[1]))
            world.reqs.append(r)
            r.task = asyncio.create_task(world.body(r, op[2]))
        elif kind == "release":
            holding = [r for r in world.reqs if r.status == "holding"]
            if holding:
                holding[op[1] % len(holding)].release.set()
        elif kind == "cancel":
            live = [r for r in world.reqs if r.status in ("waiting", "holding")]
            if live:
                target = live[op[1] % len(live)]
                assert target.task is not None
                target.task.cancel()
        else:
            clock.advance(op[1])
        await settle(rounds)
        if rounds == 30:
            world.check_quiescent()
    # Finish: release everything still held, let every timeout expire.
    for _ in range(len(world.reqs) + 1):
        for r in world.reqs:
            r.release.set()
        clock.advance(10)
        await settle(30)
    await asyncio.gather(*(r.task for r in world.reqs if r.task), return_exceptions=True)
    world.check_quiescent()
    return world


@settings(max_examples=300, deadline=None)
@given(schedules)
def test_random_schedules_keep_exclusion_fifo_and_leave_nothing(ops: list[tuple]) -> None:
    world = asyncio.run(run_schedule(ops))
    assert world.violations == []
    assert all(r.status in ("released", "timed out", "cancelled") for r in world.reqs)
    assert len(world.lock) == 0
    released = sum(1 for r in world.reqs if r.status == "released")
    assert released <= world.lock.statistics().acquisitions <= len(world.reqs)
