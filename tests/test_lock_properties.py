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


# ----------------------------------------------------------------------------- one-iteration interleavings
# The schedules above act between loop iterations. Here every cancellation and release is a loop callback
# at a drawn fake-clock time, so it can land in the same iteration as a waiter's timeout timer, before or
# after it, and before the waiting task resumes. Keys may start held by a plain thread, whose release (from
# such a callback) grants the next waiter under the guard in that thread and wakes it with
# call_soon_threadsafe. Everything is replayed exactly: the clock is fake and a thread's release is joined.

from tests.test_lock_races import ThreadHolder  # noqa: E402

waiter_spec = st.tuples(
    st.lists(st.sampled_from(("a", "b")), min_size=1, max_size=2, unique=True),
    st.sampled_from([None, 1.0, 2.0, 3.0]),
)
# A time just before, at, or just after a whole or half second: the timeouts above are due at whole seconds.
action_time = st.tuples(st.sampled_from([0.5, 1.0, 1.5, 2.0, 2.5, 3.0]), st.sampled_from([-0.05, 0.0, 0.05])).map(sum)
action = st.tuples(action_time, st.sampled_from(["cancel", "release"]), st.integers(0, 7))
interleavings = st.fixed_dictionaries(
    {
        "initial": st.fixed_dictionaries({"a": st.sampled_from(["free", "task", "thread"]), "b": st.sampled_from(["free", "task", "thread"])}),
        "waiters": st.lists(waiter_spec, min_size=1, max_size=6),
        "actions": st.lists(action, max_size=10),
        "jumps": st.lists(st.sampled_from([0.5, 1.0, 10.0]), min_size=1, max_size=4),
        "observed": st.booleans(),
    }
)


@dataclass
class Holder:
    index: int
    keys: tuple[str, ...]
    label: str
    status: str = "waiting"  # waiting -> holding -> released | timed out | cancelled
    task: asyncio.Task[None] | None = None
    request: object = None
    thread: ThreadHolder | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)


class Interleaving:
    def __init__(self, clock: FakeClock, observed: bool) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = KeyedLock(clock=clock, observer=(lambda e: self.events.append((e.label, e.kind))) if observed else None)
        self.holders: list[Holder] = []
        self.owner: dict[str, int | None] = {"a": None, "b": None}
        self.acquired_order: dict[str, list[int]] = {"a": [], "b": []}
        self.violations: list[str] = []

    def took(self, h: Holder) -> None:
        for k in h.keys:
            if self.owner[k] is not None:
                self.violations.append(f"{k} held by {self.owner[k]} and {h.index}")
            self.owner[k] = h.index
            self.acquired_order[k].append(h.index)
        h.status = "holding"

    def gave_back(self, h: Holder) -> None:
        for k in h.keys:
            self.owner[k] = None
        h.status = "released"

    async def body(self, h: Holder, timeout: float | None) -> None:
        request = self.lock(*h.keys, timeout=timeout, label=h.label)
        h.request = request
        try:
            await request.__aenter__()
        except LockTimeout:
            h.status = "timed out"
            return
        except asyncio.CancelledError:
            h.status = "cancelled"
            raise
        self.took(h)
        try:
            await h.released.wait()  # the release itself happens in a loop callback (see release())
        except asyncio.CancelledError:
            if h.status == "holding":
                self.gave_back(h)
                await request.__aexit__(asyncio.CancelledError, None, None)  # type: ignore[attr-defined]
            raise

    def release(self, i: int) -> None:
        """A loop callback: release holder ``i`` right here, in this iteration, if it holds its keys."""
        h = self.holders[i % len(self.holders)]
        if h.status != "holding":
            return
        self.gave_back(h)
        if h.thread is not None:
            h.thread.release()  # in the holder thread, joined: the next waiter is granted there
        else:
            h.request.__aexit__(None, None, None)  # type: ignore[attr-defined]  # releases at once
            h.released.set()

    def cancel(self, i: int) -> None:
        h = self.holders[i % len(self.holders)]
        if h.task is not None:
            h.task.cancel()

    def check_quiescent(self) -> None:
        for k, order in self.acquired_order.items():
            if order != sorted(order):
                self.violations.append(f"{k} granted out of order: {order}")
        waiting = [h for h in self.holders if h.status == "waiting" and h.task is not None and not h.task.done()]
        for h in waiting:
            free = all(self.owner[k] is None for k in h.keys)
            first = all(next(w for w in waiting if k in w.keys) is h for k in h.keys)
            if free and first:
                self.violations.append(f"request {h.index} for {h.keys} could run but waits")


async def run_interleaving(spec: dict) -> Interleaving:
    clock = FakeClock()
    loop = asyncio.get_running_loop()
    loop.time = clock.time  # type: ignore[method-assign]
    world = Interleaving(clock, spec["observed"])
    for k in ("a", "b"):  # initial holders, in a fixed order: they arrive first
        kind = spec["initial"][k]
        if kind == "free":
            continue
        h = Holder(len(world.holders), (k,), f"initial-{k}")
        world.holders.append(h)
        if kind == "thread":
            h.thread = ThreadHolder(world.lock, k, label=h.label)
            world.took(h)
        else:
            h.task = asyncio.create_task(world.body(h, None))
            await settle()
    for keys, timeout in spec["waiters"]:
        h = Holder(len(world.holders), tuple(keys), f"w{len(world.holders)}")
        world.holders.append(h)
        h.task = asyncio.create_task(world.body(h, timeout))
        await settle()  # arrival order is creation order
    start = loop.time()
    for at, kind, target in spec["actions"]:
        loop.call_at(start + at, world.cancel if kind == "cancel" else world.release, target)
    for jump in spec["jumps"]:
        clock.advance(jump)
        await settle(30)
        world.check_quiescent()
    for _ in range(len(world.holders) + 1):  # finish: release every holder, let every timeout expire
        for i in range(len(world.holders)):
            world.release(i)
        clock.advance(10)
        await settle(30)
        world.check_quiescent()
    results = await asyncio.gather(*(h.task for h in world.holders if h.task), return_exceptions=True)
    for h, result in zip([h for h in world.holders if h.task], results):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            world.violations.append(f"request {h.index} ended with {result!r}")
    return world


@settings(max_examples=200, deadline=None)
@given(interleavings)
def test_timeouts_cancellations_and_handoffs_in_one_iteration(spec: dict) -> None:
    world = asyncio.run(run_interleaving(spec))
    assert world.violations == []
    assert all(h.status in ("released", "timed out", "cancelled") for h in world.holders)
    assert len(world.lock) == 0
    stats = world.lock.statistics()
    assert stats.keys == stats.held == stats.waiters == 0
    waiters = sum(1 for h in world.holders if h.task is not None)
    threads = len(world.holders) - waiters
    assert stats.acquisitions + stats.timeouts + stats.cancellations == waiters + threads
    if spec["observed"]:
        for h in world.holders:
            if h.thread is not None:
                continue
            kinds = [kind for label, kind in world.events if label == h.label]
            assert kinds[0] == "requested" and kinds[1:] in (["acquired", "released"], ["timed_out"], ["cancelled"]), (h, kinds)
