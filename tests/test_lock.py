"""KeyedLock: exclusion, FIFO handoff, timeouts, pending limit, max_hold, cancellation, re-entry, many keys.

Every test is deterministic: the order of events is forced with events and ``settle()`` (yielding to the
loop), time moves only on a fake clock, and threads are sequenced through the lock's observer hook.
"""

from __future__ import annotations

import asyncio
import gc
import math
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import pytest

from chatkit import KeyedLock, KeyStatistics, LockEvent, LockQueueFull, LockStatistics, LockTimeout
from tests.conftest import FakeClock, settle

# ----------------------------------------------------------------------------- the invariant suite
# One suite, three implementations: no lock at all, a dict of asyncio.Lock (the usual Python answer), and
# KeyedLock. The baselines are expected to fail exactly the invariants they break.


class NoLock:
    name = "no lock"

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        yield

    def live_keys(self) -> int:
        return 0


class DictOfLocks:
    """``locks.setdefault(key, asyncio.Lock())``: correct exclusion, but entries are never removed."""

    name = "dict of asyncio.Lock"

    def __init__(self) -> None:
        self.locks: dict[Hashable, asyncio.Lock] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        async with self.locks.setdefault(key, asyncio.Lock()):
            yield

    def live_keys(self) -> int:
        return len(self.locks)


class Keyed:
    name = "KeyedLock"

    def __init__(self) -> None:
        self.lock = KeyedLock()

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        async with self.lock(key):
            yield

    def live_keys(self) -> int:
        return len(self.lock)


def _impls(*broken_by: str) -> list[object]:
    params = []
    for cls in (NoLock, DictOfLocks, Keyed):
        marks = (
            [pytest.mark.xfail(strict=True, reason=f"{cls.name} breaks this invariant")] if cls.name in broken_by else []
        )
        params.append(pytest.param(cls, marks=marks, id=cls.name))
    return params


@pytest.mark.parametrize("impl_cls", _impls("no lock"))
async def test_invariant_mutual_exclusion_and_fifo(impl_cls: type) -> None:
    """Five requests for one key run one at a time, in the order they arrived."""
    impl = impl_cls()
    record: list[str] = []

    async def request(i: int) -> None:
        async with impl.hold("k"):
            record.append(f"enter {i}")
            await asyncio.sleep(0)  # the "model call": a chance for others to barge in
            await asyncio.sleep(0)
            record.append(f"exit {i}")

    await asyncio.gather(*(request(i) for i in range(5)))
    assert record == [s for i in range(5) for s in (f"enter {i}", f"exit {i}")]


@pytest.mark.parametrize("impl_cls", _impls("dict of asyncio.Lock"))
async def test_invariant_no_state_left_behind(impl_cls: type) -> None:
    """After 1,000 distinct keys were used, with contention, failures and cancellations, nothing remains."""
    impl = impl_cls()

    async def use(key: int, fail: bool) -> None:
        async with impl.hold(key):
            await asyncio.sleep(0)
            if fail:
                raise RuntimeError("boom")

    tasks = [asyncio.create_task(use(i % 500, fail=i % 7 == 0)) for i in range(1000)]
    await settle(3)
    for t in tasks[::11]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert impl.live_keys() == 0


@pytest.mark.parametrize("impl_cls", _impls())
async def test_invariant_other_keys_run_in_parallel(impl_cls: type) -> None:
    """A held key never delays another key."""
    impl = impl_cls()
    inside_a = asyncio.Event()
    release_a = asyncio.Event()

    async def hold_a() -> None:
        async with impl.hold("a"):
            inside_a.set()
            await release_a.wait()

    task = asyncio.create_task(hold_a())
    await inside_a.wait()
    async with impl.hold("b"):  # must not wait for "a"
        pass
    release_a.set()
    await task


# ----------------------------------------------------------------------------- FIFO and handoff


async def test_fifo_handoff_newcomer_never_overtakes() -> None:
    lock = KeyedLock()
    record: list[str] = []
    gates = {n: asyncio.Event() for n in "ABCD"}

    async def req(name: str) -> None:
        async with lock("k", label=name):
            record.append(name)
            await gates[name].wait()

    a = asyncio.create_task(req("A"))
    await settle()
    b = asyncio.create_task(req("B"))
    c = asyncio.create_task(req("C"))
    await settle()
    assert lock.waiters("k") == 2
    gates["A"].set()
    await a
    # B owns the key now (direct handoff), even though it has not resumed yet; a newcomer queues behind C.
    d = asyncio.create_task(req("D"))
    await settle()
    assert lock.statistics("k").holder == "B"
    for n in "BCD":
        gates[n].set()
    await asyncio.gather(b, c, d)
    assert record == ["A", "B", "C", "D"]
    assert len(lock) == 0


async def test_run_returns_result_of_sync_and_async_functions() -> None:
    lock = KeyedLock()

    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    assert await lock.run("k", double, 21) == 42
    assert await lock.run("k", lambda x, y: x + y, 1, y=2) == 3
    assert await lock.run(["a", "b"], lambda: lock.locked("a") and lock.locked("b")) is True
    assert await lock.run(("a", "b"), lambda: lock.locked(("a", "b"))) is True  # a tuple is one key
    assert len(lock) == 0


async def test_failing_holder_releases() -> None:
    lock = KeyedLock()
    with pytest.raises(ZeroDivisionError):
        async with lock("k"):
            1 / 0
    assert len(lock) == 0
    async with lock("k"):
        assert lock.locked("k")


# ----------------------------------------------------------------------------- timeouts (fake clock)


async def test_timeout_raises_names_key_and_leaves_queue_at_once(loop_clock: FakeClock) -> None:
    lock = KeyedLock(timeout=60, clock=loop_clock)
    inside = asyncio.Event()
    release = asyncio.Event()
    ran: list[str] = []

    async def holder() -> None:
        async with lock("session-1"):
            inside.set()
            await release.wait()

    async def waiter() -> None:
        async with lock("session-1"):
            ran.append("waiter")  # must never run

    h = asyncio.create_task(holder())
    await inside.wait()
    w = asyncio.create_task(waiter())
    await settle()
    assert lock.waiters("session-1") == 1
    await loop_clock.advance_and_settle(59.9)
    assert not w.done()
    await loop_clock.advance_and_settle(0.2)
    assert w.done()
    with pytest.raises(LockTimeout, match=r"session-1.*60") as info:
        await w
    assert isinstance(info.value, TimeoutError)
    assert info.value.keys == ("session-1",)
    assert info.value.waited == pytest.approx(60.1)
    assert lock.waiters("session-1") == 0  # left the queue at once, before the holder released
    assert lock.statistics("session-1").timeouts == 1
    release.set()
    await h
    assert ran == []
    assert len(lock) == 0
    assert lock.statistics().timeouts == 1


async def test_per_call_timeout_overrides_default(loop_clock: FakeClock) -> None:
    lock = KeyedLock(timeout=60, clock=loop_clock)
    async with lock("k"):
        w = asyncio.create_task(lock.run("k", lambda: None, timeout=1))
        await settle()
        await loop_clock.advance_and_settle(1.5)
        with pytest.raises(LockTimeout):
            await w
    w2 = asyncio.create_task(lock.run("k", lambda: "ok", timeout=None))
    assert await w2 == "ok"


async def test_timeout_after_handoff_race_keeps_the_lock(loop_clock: FakeClock) -> None:
    """If the key was handed over in the same instant the timeout fires, ownership decides: no error."""
    lock = KeyedLock(timeout=10, clock=loop_clock)
    release = asyncio.Event()
    inside = asyncio.Event()

    async def holder() -> None:
        async with lock("k"):
            inside.set()
            await release.wait()

    h = asyncio.create_task(holder())
    await inside.wait()
    w = asyncio.create_task(lock.run("k", lambda: "got it"))
    await settle()
    release.set()
    loop_clock.advance(10)  # the handoff and the timer are both due in the same loop iteration
    assert await w == "got it"
    await h
    assert len(lock) == 0


# ----------------------------------------------------------------------------- max_pending


async def test_max_pending_rejects_at_once_and_frees_places() -> None:
    lock = KeyedLock(max_pending=2)
    release = asyncio.Event()

    async def holder() -> None:
        async with lock("k"):
            await release.wait()

    h = asyncio.create_task(holder())
    await settle()
    w1 = asyncio.create_task(lock.run("k", lambda: 1))
    w2 = asyncio.create_task(lock.run("k", lambda: 2))
    await settle()
    with pytest.raises(LockQueueFull, match=r"'k'.*max_pending=2"):
        await lock.run("k", lambda: 3)
    w1.cancel()  # a cancelled waiter frees its place immediately
    await settle()
    w3 = asyncio.create_task(lock.run("k", lambda: 3))
    await settle()
    assert lock.waiters("k") == 2
    assert lock.statistics("k").rejections == 1
    release.set()
    await h
    assert [await w2, await w3] == [2, 3]
    assert w1.cancelled()
    assert len(lock) == 0


async def test_timed_out_waiters_free_their_place(loop_clock: FakeClock) -> None:
    lock = KeyedLock(max_pending=1, clock=loop_clock)
    async with lock("k"):
        w = asyncio.create_task(lock.run("k", lambda: None, timeout=5))
        await settle()
        with pytest.raises(LockQueueFull):
            await asyncio.create_task(lock.run("k", lambda: None))  # another task: not a re-entry
        await loop_clock.advance_and_settle(6)
        with pytest.raises(LockTimeout):
            await w
        w2 = asyncio.create_task(lock.run("k", lambda: "second"))
        await settle()
    assert await w2 == "second"


# ----------------------------------------------------------------------------- max_hold


async def test_max_hold_cancels_holder_and_passes_on_only_after_it_finished(loop_clock: FakeClock) -> None:
    lock = KeyedLock(max_hold=30, clock=loop_clock)
    record: list[str] = []
    cleanup_may_finish = asyncio.Event()

    async def slow() -> None:
        async with lock("k"):
            record.append("slow start")
            try:
                await asyncio.Event().wait()  # never finishes by itself
            except asyncio.CancelledError:
                record.append("slow cancelled")
                await cleanup_may_finish.wait()  # cleanup still runs under the lock
                record.append("slow cleaned up")
                raise

    async def next_one() -> None:
        async with lock("k"):
            record.append("next start")

    s = asyncio.create_task(slow())
    await settle()
    n = asyncio.create_task(next_one())
    await settle()
    await loop_clock.advance_and_settle(31)
    assert record == ["slow start", "slow cancelled"]  # next has not started: slow still runs
    assert lock.locked("k")
    cleanup_may_finish.set()
    with pytest.raises(LockTimeout, match="max_hold=30"):
        await s
    await n
    assert record == ["slow start", "slow cancelled", "slow cleaned up", "next start"]
    assert len(lock) == 0


async def test_max_hold_does_not_touch_fast_holders(loop_clock: FakeClock) -> None:
    lock = KeyedLock(max_hold=30, clock=loop_clock)
    for _ in range(3):
        async with lock("k"):
            await loop_clock.advance_and_settle(29)
    await loop_clock.advance_and_settle(100)  # timers of released holders were cancelled
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- cancellation


async def test_cancelled_waiter_leaves_queue() -> None:
    lock = KeyedLock()
    async with lock("k"):
        w = asyncio.create_task(lock.run("k", lambda: None))
        await settle()
        assert lock.waiters("k") == 1
        w.cancel()
        await settle()
        assert lock.waiters("k") == 0
        assert lock.statistics("k").cancellations == 1
    assert w.cancelled()
    assert len(lock) == 0


async def test_cancelled_after_handoff_before_resuming_passes_lock_on() -> None:
    """No lost wakeup: B is granted the key and cancelled before it runs; C must get the key."""
    lock = KeyedLock()
    record: list[str] = []
    release_a = asyncio.Event()

    async def req(name: str, gate: asyncio.Event | None = None) -> None:
        async with lock("k", label=name):
            record.append(name)
            if gate is not None:
                await gate.wait()

    a = asyncio.create_task(req("A", release_a))
    await settle()
    b = asyncio.create_task(req("B"))
    c = asyncio.create_task(req("C"))
    await settle()

    async def release_then_cancel_b() -> None:
        release_a.set()
        await settle(1)  # A resumes and releases: B is granted, its wake-up is scheduled
        b.cancel()  # ... and B is cancelled before it ever ran

    await release_then_cancel_b()
    await asyncio.gather(a, c)
    assert b.cancelled()
    assert record == ["A", "C"]
    assert len(lock) == 0


async def test_cancelled_while_holding_releases() -> None:
    lock = KeyedLock()
    inside = asyncio.Event()

    async def holder() -> None:
        async with lock("k"):
            inside.set()
            await asyncio.Event().wait()

    h = asyncio.create_task(holder())
    await inside.wait()
    h.cancel()
    with pytest.raises(asyncio.CancelledError):
        await h
    assert len(lock) == 0


# ----------------------------------------------------------------------------- several keys


async def test_several_keys_in_opposite_orders_never_deadlock() -> None:
    lock = KeyedLock()
    record: list[str] = []

    async def req(name: str, *keys: str) -> None:
        async with lock(*keys):
            record.append(name)
            await asyncio.sleep(0)

    await asyncio.gather(*(req(f"{i}", *(("a", "b") if i % 2 else ("b", "a"))) for i in range(20)))
    assert sorted(record) == sorted(str(i) for i in range(20))
    assert len(lock) == 0


async def test_several_keys_atomic_and_deduplicated() -> None:
    lock = KeyedLock()
    release = asyncio.Event()

    async def hold_b() -> None:
        async with lock("b"):
            await release.wait()

    h = asyncio.create_task(hold_b())
    await settle()
    w = asyncio.create_task(lock.run(["a", "b", "a"], lambda: (lock.locked("a"), lock.locked("b"))))
    await settle()
    # The waiter for [a, b] holds nothing while it waits, but "a" is reserved for it in FIFO order.
    assert lock.statistics("a").held is False
    assert lock.waiters("a") == 1 and lock.waiters("b") == 1
    release.set()
    assert await w == (True, True)
    await h
    assert len(lock) == 0


async def test_several_keys_timeout_holds_none(loop_clock: FakeClock) -> None:
    lock = KeyedLock(clock=loop_clock)
    async with lock("b"):
        w = asyncio.create_task(lock.run(["a", "b"], lambda: None, timeout=1))
        await settle()
        await loop_clock.advance_and_settle(2)
        with pytest.raises(LockTimeout, match=r"keys \['a', 'b'\]"):
            await w
        assert not lock.is_busy("a")
    assert len(lock) == 0


async def test_multi_key_waiter_does_not_block_unrelated_fifo() -> None:
    """A waiter for [a, b] reserves a; later requests for a queue behind it; c is unaffected."""
    lock = KeyedLock()
    record: list[str] = []
    release_b = asyncio.Event()

    async def hold_b() -> None:
        async with lock("b"):
            await release_b.wait()
        record.append("b released")

    async def req(name: str, *keys: str) -> None:
        async with lock(*keys):
            record.append(name)

    hb = asyncio.create_task(hold_b())
    await settle()
    ab = asyncio.create_task(req("ab", "a", "b"))
    await settle()
    a = asyncio.create_task(req("a", "a"))
    c = asyncio.create_task(req("c", "c"))
    await settle()
    assert record == ["c"]
    release_b.set()
    await asyncio.gather(hb, ab, a, c)
    assert record == ["c", "b released", "ab", "a"]


# ----------------------------------------------------------------------------- re-entry


async def test_reentry_by_same_task_raises_at_once() -> None:
    lock = KeyedLock()

    async def inner() -> None:
        async with lock("k"):
            pass

    async with lock("k"):
        with pytest.raises(RuntimeError, match="already holds key 'k'.*reentrant=True"):
            await inner()
        with pytest.raises(RuntimeError, match="already holds"):
            async with lock("k", "other"):
                pass
    assert len(lock) == 0
    assert lock.statistics().rejections == 2


async def test_reentrant_lock_allows_nesting_and_other_tasks_still_wait() -> None:
    lock = KeyedLock(reentrant=True)
    record: list[str] = []

    async def other() -> None:
        async with lock("k"):
            record.append("other")

    async with lock("k"):
        o = asyncio.create_task(other())
        await settle()
        async with lock("k"):
            async with lock("k"):
                record.append("nested")
        assert lock.locked("k")
        assert record == ["nested"]
    await o
    assert record == ["nested", "other"]
    assert len(lock) == 0


async def test_same_key_from_another_task_is_not_reentry() -> None:
    lock = KeyedLock()
    async with lock("k"):
        t = asyncio.create_task(lock.run("k", lambda: "waited"))
        await settle()
        assert not t.done()
    assert await t == "waited"


async def test_request_object_is_single_use() -> None:
    lock = KeyedLock()
    req = lock("k")
    async with req:
        pass
    with pytest.raises(RuntimeError, match="already used"):
        async with req:
            pass


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [0, -1, math.nan])
def test_bad_timeouts_are_value_errors(bad: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        KeyedLock(timeout=bad)
    with pytest.raises(ValueError, match="max_hold"):
        KeyedLock(max_hold=bad)
    with pytest.raises(ValueError, match="timeout"):
        KeyedLock()("k", timeout=bad)


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="max_pending must be at least 1, got 0"):
        KeyedLock(max_pending=0)
    with pytest.raises(TypeError, match="max_pending"):
        KeyedLock(max_pending=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout"):
        KeyedLock(timeout="60")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="observer must be callable"):
        KeyedLock(observer=42)  # type: ignore[arg-type]


def test_unhashable_key_is_type_error() -> None:
    lock = KeyedLock()
    with pytest.raises(TypeError, match=r"hashable, got list \['a'\]"):
        lock(["a"])
    with pytest.raises(TypeError, match="hashable"):
        lock("a", {"b": 1})
    with pytest.raises(TypeError, match="at least one key"):
        lock()
    assert len(lock) == 0


def test_infinite_timeout_means_no_timeout() -> None:
    assert "timeout=None" in repr(KeyedLock(timeout=math.inf))


# ----------------------------------------------------------------------------- introspection


async def test_statistics_repr_and_is_busy(loop_clock: FakeClock) -> None:
    lock = KeyedLock(clock=loop_clock)
    assert repr(lock).startswith("<KeyedLock keys=0 held=0 waiting=0")
    release = asyncio.Event()

    async def holder() -> None:
        async with lock("k", label="first"):
            await release.wait()

    h = asyncio.create_task(holder())
    await settle()
    w = asyncio.create_task(lock.run("k", lambda: None, label="second"))
    await settle()
    assert lock.is_busy() and lock.is_busy("k") and not lock.is_busy("other")
    assert "keys=1 held=1 waiting=1" in repr(lock)
    stats = lock.statistics("k")
    assert isinstance(stats, KeyStatistics)
    assert (stats.held, stats.holder, stats.waiters) == (True, "first", 1)
    loop_clock.advance(2.5)
    release.set()
    await asyncio.gather(h, w)
    total = lock.statistics()
    assert isinstance(total, LockStatistics)
    assert total.acquisitions == 2
    assert total.max_wait == pytest.approx(2.5)
    assert total.total_hold == pytest.approx(2.5)
    assert total.mean_wait == pytest.approx(1.25)
    assert lock.statistics("k") == KeyStatistics("k", False, None, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)
    with pytest.raises(Exception, match="frozen|cannot assign"):
        total.acquisitions = 0  # type: ignore[misc]


async def test_hold_times_are_measured_once_statistics_are_asked_for(loop_clock: FakeClock) -> None:
    """Until someone asks for statistics the uncontended path reads no clock; from the first statistics()
    call on, every hold counts in total_hold. A hold someone waited for counts from that moment on."""
    lock = KeyedLock(clock=loop_clock)
    async with lock("k"):
        loop_clock.advance(5)  # not measured: nobody has asked yet
    assert lock.statistics().total_hold == 0.0  # (this call turns measuring on)
    async with lock("k"):
        loop_clock.advance(2)
    assert lock.statistics().total_hold == pytest.approx(2.0)
    async with lock("k"):
        loop_clock.advance(1)
        w = asyncio.create_task(lock.run("k", lambda: None))
        await settle()
        loop_clock.advance(3)
    await w
    assert lock.statistics().total_hold == pytest.approx(2.0 + 4.0)
    fresh = KeyedLock(clock=loop_clock)
    async with fresh("k"):
        loop_clock.advance(1)  # not measured ...
        w = asyncio.create_task(fresh.run("k", lambda: None))
        await settle()
        loop_clock.advance(3)  # ... but this is: someone waited
    await w
    assert fresh.statistics().total_hold == pytest.approx(3.0)


async def test_observer_receives_every_event_in_order(loop_clock: FakeClock) -> None:
    events: list[LockEvent] = []
    lock = KeyedLock(clock=loop_clock, observer=events.append, max_pending=1)
    release = asyncio.Event()

    async def holder() -> None:
        async with lock("k", label="A"):
            await release.wait()

    h = asyncio.create_task(holder())
    await settle()
    b = asyncio.create_task(lock.run("k", lambda: None, label="B"))
    await settle()
    with pytest.raises(LockQueueFull):
        await lock.run("k", lambda: None, label="C")
    loop_clock.advance(1)
    release.set()
    await asyncio.gather(h, b)
    c = asyncio.create_task(lock.run("k", lambda: None, label="D", timeout=1))
    await c
    kinds = [(e.label, e.kind) for e in events]
    assert kinds == [
        ("A", "requested"),
        ("A", "acquired"),
        ("B", "requested"),
        ("C", "rejected"),
        ("A", "released"),
        ("B", "acquired"),
        ("B", "released"),
        ("D", "requested"),
        ("D", "acquired"),
        ("D", "released"),
    ]
    b_acquired = next(e for e in events if e.label == "B" and e.kind == "acquired")
    assert b_acquired.waited == pytest.approx(1.0)
    assert b_acquired.key == "k"


async def test_failing_observer_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: LockEvent) -> None:
        raise ValueError("observer bug")

    lock = KeyedLock(observer=broken)
    async with lock("k"):
        pass
    assert "observer" in caplog.text and "observer bug" in caplog.text
    lock.remove_observer(broken)
    with pytest.raises(ValueError, match="not an observer"):
        lock.remove_observer(broken)


# ----------------------------------------------------------------------------- threads and event loops


class Sequencer:
    """Records lock events from every thread and lets a test wait, without sleeping, until one happened."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[LockEvent] = []

    def __call__(self, event: LockEvent) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait_for(self, label: str, kind: str) -> None:
        with self.cond:
            ok = self.cond.wait_for(
                lambda: any(e.label == label and e.kind == kind for e in self.events), timeout=30
            )
        assert ok, f"{label} never reached {kind}"


def test_two_event_loops_and_a_thread_share_one_lock_fifo() -> None:
    seq = Sequencer()
    lock = KeyedLock(observer=seq)
    record: list[str] = []
    inside = 0
    max_inside = 0
    counter_guard = threading.Lock()

    def critical(name: str) -> None:
        nonlocal inside, max_inside
        with counter_guard:
            inside += 1
            max_inside = max(max_inside, inside)
        record.append(name)
        with counter_guard:
            inside -= 1

    async def loop_worker(name: str) -> None:
        async with lock("k", label=name):
            critical(name)
            await asyncio.sleep(0)

    def loop_thread(name: str) -> None:
        asyncio.run(loop_worker(name))

    def sync_thread(name: str) -> None:
        with lock.sync("k", label=name):
            critical(name)

    with lock.sync("k", label="main"):
        threads = []
        for name, target in (("loop-1", loop_thread), ("loop-2", loop_thread), ("sync", sync_thread)):
            t = threading.Thread(target=target, args=(name,), name=name)
            t.start()
            seq.wait_for(name, "requested")  # arrival order is fixed before the next one starts
            threads.append(t)
        assert lock.waiters("k") == 3
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a thread is stuck (deadlock?)"
    assert record == ["loop-1", "loop-2", "sync"]
    assert max_inside == 1
    assert len(lock) == 0


def test_many_threads_and_loops_exclusion_stress() -> None:
    lock = KeyedLock()
    counts: dict[str, int] = defaultdict(int)
    inside: dict[str, int] = defaultdict(int)
    violations: list[str] = []
    guard = threading.Lock()

    def enter(key: str) -> None:
        with guard:
            inside[key] += 1
            if inside[key] > 1:
                violations.append(key)
            counts[key] += 1

    def leave(key: str) -> None:
        with guard:
            inside[key] -= 1

    async def async_worker(n: int) -> None:
        for i in range(200):
            key = f"k{(i + n) % 3}"
            async with lock(key):
                enter(key)
                await asyncio.sleep(0)
                leave(key)

    def sync_worker(n: int) -> None:
        for i in range(200):
            key = f"k{(i + n) % 3}"
            with lock.sync(key):
                enter(key)
                leave(key)

    threads = [threading.Thread(target=asyncio.run, args=(async_worker(n),)) for n in range(3)]
    threads += [threading.Thread(target=sync_worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread is stuck (deadlock?)"
    assert violations == []
    assert sum(counts.values()) == 5 * 200
    assert len(lock) == 0


def test_successive_asyncio_run_calls_share_one_lock() -> None:
    lock = KeyedLock()

    async def contend() -> list[int]:
        order: list[int] = []

        async def one(i: int) -> None:
            async with lock("k"):
                order.append(i)
                await asyncio.sleep(0)

        await asyncio.gather(*(one(i) for i in range(5)))
        return order

    assert asyncio.run(contend()) == [0, 1, 2, 3, 4]
    assert asyncio.run(contend()) == [0, 1, 2, 3, 4]
    assert len(lock) == 0


def test_sync_timeout_in_thread() -> None:
    lock = KeyedLock()
    result: list[BaseException] = []
    with lock.sync("k"):

        def waiter() -> None:
            try:
                with lock.sync("k", timeout=0.01):  # the holder never releases while this waits
                    pass
            except LockTimeout as exc:
                result.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        t.join(30)
        assert not t.is_alive(), "a thread is stuck (deadlock?)"
    assert len(result) == 1 and "timeout=0.01" in str(result[0])
    assert len(lock) == 0


async def test_sync_from_running_loop_is_refused() -> None:
    lock = KeyedLock()
    with pytest.raises(RuntimeError, match="runs an event loop"):
        with lock.sync("k"):
            pass
    assert len(lock) == 0


def test_waiter_on_a_closed_loop_does_not_block_others() -> None:
    """A waiter whose loop was closed (its thread ended) is skipped at handoff."""
    seq = Sequencer()
    lock = KeyedLock(observer=seq)

    def doomed_thread() -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(lock.run("k", lambda: None, label="doomed"))
        loop.run_until_complete(asyncio.sleep(0))  # the task joins the queue, then its loop is closed
        task._log_destroy_pending = False  # type: ignore[attr-defined]  # we abandon it on purpose
        loop.close()

    with lock.sync("k", label="main"):
        t = threading.Thread(target=doomed_thread)
        t.start()
        t.join(30)
        assert not t.is_alive(), "a thread is stuck (deadlock?)"
        seq.wait_for("doomed", "requested")
    gc.collect()
    with lock.sync("k", timeout=5):
        pass
    assert len(lock) == 0



async def test_cancelled_in_the_same_instant_its_timeout_fired(loop_clock: FakeClock) -> None:
    """Timeout and cancellation due together (an outer timeout with the same deadline): CancelledError wins,
    the waiter is withdrawn exactly once, and nothing is left behind."""
    lock = KeyedLock(clock=loop_clock)
    async with lock("k"):
        waiter = asyncio.create_task(lock.run("k", lambda: None, timeout=5))
        await settle()
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + 5, waiter.cancel)  # scheduled after the lock's own timer, same instant
        await loop_clock.advance_and_settle(5)
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert lock.waiters("k") == 0
    assert len(lock) == 0


def test_thread_interrupted_while_waiting_leaves_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt (or any error) out of a thread's wait must not leave a dead waiter in line."""
    lock = KeyedLock()
    seq = Sequencer()
    lock.add_observer(seq)
    errors: list[BaseException] = []

    class Interrupted(Exception):
        pass

    real_wait = threading.Event.wait

    def interrupted_wait(self: threading.Event, timeout: float | None = None) -> bool:
        if threading.current_thread().name == "victim":
            raise Interrupted("Ctrl+C")
        return real_wait(self, timeout)

    monkeypatch.setattr(threading.Event, "wait", interrupted_wait)

    def victim() -> None:
        try:
            with lock.sync("k", label="victim"):
                pass
        except Interrupted as exc:
            errors.append(exc)

    with lock.sync("k", label="main"):
        t = threading.Thread(target=victim, name="victim")
        t.start()
        t.join(30)
        assert not t.is_alive()
        assert lock.waiters("k") == 0
    assert len(errors) == 1
    assert len(lock) == 0
    with lock.sync("k", timeout=5):
        assert lock.statistics("k").holder == "MainThread"
