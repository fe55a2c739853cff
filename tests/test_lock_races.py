"""KeyedLock: a waiter's timeout, its cancellation and a handoff arriving in one loop iteration, in every order.

A waiter's fate is decided three ways at once: its lock timeout (a timer on its loop), a cancellation from
outside (delivered to its future), and a handoff (a grant made under the lock's guard, on this thread or
another, whose wake-up follows). All three can land in one event-loop iteration, before the waiting task
resumes. Each test here puts them in one iteration in an explicit order: a fake loop clock makes every timer
due together, and ``loop.call_at`` with slightly different deadlines fixes their order. The outcome must be
one of the contract's: ``CancelledError`` (an outside cancellation always wins for the caller) or
``LockTimeout``, the waiter leaves every queue exactly once, and the key passes on.

Also here: releasing to hundreds of waiters whose loop was closed (iterative, no recursion), and ``max_hold``
against an outside cancellation (the outside cancellation wins, as with ``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
from collections.abc import Callable

import pytest

from chatkit import KeyedLock, LockEvent, LockTimeout
from tests.conftest import FakeClock, settle
from tests.test_lock import Sequencer

TIMEOUT = 5.0


class ThreadHolder:
    """A plain thread holding keys until told to release them (so a release comes from another thread)."""

    def __init__(self, lock: KeyedLock, *keys: str, label: str = "thread") -> None:
        self.release_now = threading.Event()
        self.holding = threading.Event()
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                with lock.sync(*keys, label=label):
                    self.holding.set()
                    self.release_now.wait(30)
            except BaseException as exc:  # pragma: no cover - reported by the test
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, name=label)
        self.thread.start()
        assert self.holding.wait(30), "the holder thread never got the key"

    def release(self) -> None:
        """Release from the holder thread and wait until it has (the grant is made under the guard there)."""
        self.release_now.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the holder thread is stuck"
        assert self.errors == []


def kinds(events: list[LockEvent], label: str) -> list[str]:
    return [e.kind for e in events if e.label == label]


# ----------------------------------------------------------------------------- one key, every order

ORDERS = list(itertools.permutations(["cancel", "release", "timeout"]))


@pytest.mark.parametrize("release_from", ["same thread", "other thread"])
@pytest.mark.parametrize("order", ORDERS, ids=["<".join(o) for o in ORDERS])
async def test_cancel_timeout_and_handoff_in_one_iteration(
    order: tuple[str, ...], release_from: str, loop_clock: FakeClock
) -> None:
    """W waits for a key with a timeout; its cancellation, its timeout and the holder's release all land in
    the same loop iteration, in ``order``. W ends cancelled (the cancellation wins), leaves the queue once,
    and the next waiter N gets the key."""
    events: list[LockEvent] = []
    lock = KeyedLock(clock=loop_clock, observer=events.append)
    loop = asyncio.get_running_loop()

    if release_from == "same thread":
        held = lock("k", label="holder")
        await held.__aenter__()
        release: Callable[[], object] = lambda: held.__aexit__(None, None, None)  # noqa: E731 (releases at once)
    else:
        holder = ThreadHolder(lock, "k", label="holder")
        release = holder.release

    w = asyncio.create_task(lock.run("k", lambda: "W ran", timeout=TIMEOUT, label="W"))
    n = asyncio.create_task(lock.run("k", lambda: "N ran", label="N"))
    await settle()
    assert lock.waiters("k") == 2
    deadline = loop.time() + TIMEOUT  # W's own timer
    at = {"timeout": deadline}
    # Steps before the timeout go just before its deadline, steps after it just after; all are due together.
    position = order.index("timeout")
    for i, step in enumerate(order[:position]):
        at[step] = deadline - 0.5 + 0.1 * i
    for i, step in enumerate(order[position + 1 :]):
        at[step] = deadline + 0.1 + 0.1 * i
    loop.call_at(at["cancel"], w.cancel)
    loop.call_at(at["release"], release)

    loop_clock.advance(TIMEOUT + 1)  # every step is due now: the next loop iteration runs them in order
    await settle()

    with pytest.raises(asyncio.CancelledError):
        await w
    assert await n == "N ran"
    assert len(lock) == 0
    w_kinds = kinds(events, "W")
    if order.index("release") < order.index("timeout"):
        # granted before its timer fired (the grant decides, under the guard): W owned the key when it saw
        # the cancellation, and passed it on
        assert w_kinds == ["requested", "acquired", "released"]
    elif order.index("cancel") < order.index("timeout"):
        assert w_kinds == ["requested", "cancelled"]  # the cancellation came first: it is what is counted
    else:
        assert w_kinds == ["requested", "timed_out"]  # the timeout came first; the cancellation still wins
    stats = lock.statistics()
    assert stats.timeouts + stats.cancellations + stats.acquisitions == 3  # holder, N, and W counted once
    assert stats.keys == stats.held == stats.waiters == 0


async def test_cancel_just_before_its_timeout_fires_multi_key(loop_clock: FakeClock) -> None:
    """The same race for a request of two keys, one of them free: leaving twice would touch a key that is gone."""
    lock = KeyedLock(clock=loop_clock)
    loop = asyncio.get_running_loop()
    async with lock("b"):
        w = asyncio.create_task(lock.run(["a", "b"], lambda: None, timeout=TIMEOUT))
        await settle()
        assert lock.waiters("a") == 1 and lock.waiters("b") == 1
        loop.call_at(loop.time() + TIMEOUT - 0.5, w.cancel)  # delivered first, in the iteration its timer fires
        loop_clock.advance(TIMEOUT + 1)
        await settle()
        with pytest.raises(asyncio.CancelledError):
            await w
        assert not lock.is_busy("a") and lock.waiters("b") == 0
    assert len(lock) == 0
    assert lock.statistics().cancellations == 1


async def test_cancel_then_timeout_while_its_task_waits_to_resume_is_counted_once(loop_clock: FakeClock) -> None:
    """Cancelled first (so its future is cancelled), then its timer fires before the task resumes: the waiter
    is withdrawn once, counted once (as cancelled), and raises CancelledError, never a KeyError."""
    lock = KeyedLock(clock=loop_clock)
    loop = asyncio.get_running_loop()
    async with lock("k"):
        w = asyncio.create_task(lock.run("k", lambda: None, timeout=TIMEOUT))
        await settle()
        loop.call_at(loop.time() + TIMEOUT - 0.5, w.cancel)
        loop_clock.advance(TIMEOUT)
        await settle()
        assert w.done()
        assert w.cancelled(), f"expected CancelledError, got {w.exception()!r}"
    stats = lock.statistics()
    assert (stats.cancellations, stats.timeouts, stats.keys) == (1, 0, 0)


async def test_timeout_then_cross_thread_grant_of_the_next_waiter(loop_clock: FakeClock) -> None:
    """W's timer withdraws it; in the same iteration a thread releases: the grant skips W and goes to N."""
    lock = KeyedLock(clock=loop_clock)
    loop = asyncio.get_running_loop()
    holder = ThreadHolder(lock, "k")
    w = asyncio.create_task(lock.run("k", lambda: None, timeout=TIMEOUT, label="W"))
    n = asyncio.create_task(lock.run("k", lambda: "N", label="N"))
    await settle()
    loop.call_at(loop.time() + TIMEOUT + 0.1, holder.release)
    loop_clock.advance(TIMEOUT + 1)
    await settle()
    with pytest.raises(LockTimeout):
        await w
    assert await n == "N"
    assert len(lock) == 0


async def test_cross_thread_wakeup_arriving_after_the_waiter_was_cancelled(loop_clock: FakeClock) -> None:
    """A thread grants the key to W (its wake-up is queued with call_soon_threadsafe); W is cancelled before
    the wake-up runs. W passes the key on to N; the late wake-up finds a cancelled future and does nothing."""
    lock = KeyedLock(clock=loop_clock)
    holder = ThreadHolder(lock, "k")
    w = asyncio.create_task(lock.run("k", lambda: None, label="W"))
    n = asyncio.create_task(lock.run("k", lambda: "N", label="N"))
    await settle()
    holder.release()  # granted to W under the guard, in the holder thread; W's wake-up is on its way
    assert lock.statistics("k").holder == "W"
    w.cancel()
    await settle()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert await n == "N"
    assert len(lock) == 0


# ----------------------------------------------------------------------------- closed loops


def _queue_doomed_waiters(lock: KeyedLock, count: int) -> None:
    """``count`` asyncio waiters on a loop in another thread; the loop is then closed under them."""

    def doomed() -> None:
        loop = asyncio.new_event_loop()
        tasks = [loop.create_task(lock.run("k", lambda: None, label=f"doomed-{i}")) for i in range(count)]
        loop.run_until_complete(asyncio.sleep(0))  # every task joins the queue
        for task in tasks:
            task._log_destroy_pending = False  # type: ignore[attr-defined]  # abandoned on purpose
        loop.close()

    t = threading.Thread(target=doomed)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the doomed thread is stuck"


def test_release_to_hundreds_of_waiters_on_a_closed_loop() -> None:
    """500 waiters whose loop was closed, then a live thread: releasing hands the key on waiter by waiter
    without recursion, and the live thread holds it at once (no lost wakeup)."""
    seq = Sequencer()
    lock = KeyedLock(observer=seq)
    may_release = threading.Event()
    got: list[str] = []

    def live() -> None:
        with lock.sync("k", label="live", timeout=60):
            got.append("live")
            may_release.wait(30)

    with lock.sync("k", label="main"):
        _queue_doomed_waiters(lock, 500)
        assert lock.waiters("k") == 500
        t = threading.Thread(target=live, name="live")
        t.start()
        seq.wait_for("live", "requested")  # the live thread joined the queue, last
    # Released here: every doomed waiter is granted and released on its behalf, in order; then "live".
    assert lock.statistics("k").holder == "live"
    may_release.set()
    t.join(30)
    assert not t.is_alive()
    assert got == ["live"]
    gc.collect()
    assert len(lock) == 0
    assert lock.statistics().acquisitions == 502


# ----------------------------------------------------------------------------- max_hold vs an outside cancel


@pytest.mark.parametrize("first", ["max_hold", "outside"])
async def test_outside_cancel_wins_over_max_hold(first: str, loop_clock: FakeClock) -> None:
    """``max_hold`` fires and the task is cancelled from outside in the same iteration: the task ends
    cancelled (not LockTimeout), as with ``asyncio.timeout``, and the key passes on."""
    lock = KeyedLock(max_hold=30, clock=loop_clock)
    loop = asyncio.get_running_loop()

    async def holder() -> None:
        async with lock("k"):
            await asyncio.Event().wait()

    h = asyncio.create_task(holder())
    await settle()
    due = loop.time() + 30  # the max_hold timer
    loop.call_at(due + (0.5 if first == "max_hold" else -0.5), h.cancel)
    loop_clock.advance(31)
    await settle()
    assert h.done()
    assert h.cancelled(), f"the outside cancellation must win, got {h.exception()!r}"
    assert len(lock) == 0


async def test_outside_cancel_during_max_hold_cleanup_wins(loop_clock: FakeClock) -> None:
    lock = KeyedLock(max_hold=30, clock=loop_clock)
    in_cleanup = asyncio.Event()

    async def holder() -> None:
        async with lock("k"):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                in_cleanup.set()
                await asyncio.Event().wait()  # cleanup that only an outside cancellation ends
                raise

    h = asyncio.create_task(holder())
    await settle()
    await loop_clock.advance_and_settle(31)
    assert in_cleanup.is_set()
    h.cancel()
    await settle()
    assert h.cancelled()
    assert len(lock) == 0


async def test_max_hold_alone_still_raises_lock_timeout_and_leaves_no_cancel_pending(loop_clock: FakeClock) -> None:
    lock = KeyedLock(max_hold=30, clock=loop_clock)

    async def holder() -> int:
        with pytest.raises(LockTimeout, match="max_hold=30"):
            async with lock("k"):
                await asyncio.Event().wait()
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    h = asyncio.create_task(holder())
    await settle()
    await loop_clock.advance_and_settle(31)
    assert await h == 0


# ----------------------------------------------------------------------------- releasing without the guard
# An uncontended holder releases without the lock's guard: it marks itself exiting, then checks that no
# waiter marked it contended. A waiter marks first and checks second; these tests put a waiter from another
# thread on each side of that exchange.


class PausingTable(dict):  # type: ignore[type-arg]
    """The lock's table, able to stop a release half-way: deleting a key from ``armed_for``'s thread blocks
    until resumed (the holder has checked that the entry is its own and not marked, and not yet deleted it)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed_for: threading.Thread | None = None
        self.entered = threading.Event()
        self.resume = threading.Event()
        self.interrupt: BaseException | None = None

    def __delitem__(self, key: object) -> None:
        if self.armed_for is threading.current_thread():
            self.armed_for = None
            self.entered.set()
            assert self.resume.wait(30), "never resumed"
            if self.interrupt is not None:
                raise self.interrupt
        super().__delitem__(key)


async def test_a_waiter_arriving_during_a_release_without_the_guard_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder (this loop) is stopped inside its guard-free release; a thread asks for the key then. It
    must not touch the entry being deleted: it backs off, retries once the release is done, and gets the key."""
    lock = KeyedLock()
    table = PausingTable()
    lock._table = table  # type: ignore[assignment]
    retrying = threading.Event()
    real_sleep = time.sleep

    def spying_sleep(seconds: float) -> None:
        if threading.current_thread().name == "waiter":
            retrying.set()  # the waiter saw the holder exiting and backed off
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", spying_sleep)
    got: list[str] = []

    def waiter() -> None:
        with lock.sync("k", label="waiter"):
            got.append(lock.statistics("k").holder or "?")

    w = threading.Thread(target=waiter, name="waiter")

    def conductor() -> None:
        assert table.entered.wait(30), "the release never started"
        w.start()  # the holder is now stopped inside its release, marked exiting
        assert retrying.wait(30), "the waiter never backed off"
        table.resume.set()

    helper = threading.Thread(target=conductor)
    helper.start()
    async with lock("k"):
        assert table.get("k") is not None  # held on the fast path: the table holds the request itself
        table.armed_for = threading.current_thread()
    # (the release above stopped just before deleting its entry until the waiter had backed off once)
    helper.join(30)
    w.join(30)
    assert not w.is_alive() and not helper.is_alive()
    assert got == ["waiter"]
    assert len(lock) == 0


async def test_a_waiter_that_marked_the_holder_first_gets_a_handoff() -> None:
    """A thread waits for a key held on the fast path: the holder, marked contended, releases through the
    guard and hands the key straight over."""
    seq = Sequencer()
    lock = KeyedLock()
    got: list[str] = []
    async with lock("k"):
        lock.add_observer(seq)  # (after entering: this holder took the fast path)
        t = threading.Thread(target=_take, args=(lock, got))
        t.start()
        seq.wait_for("waiter", "requested")
        assert lock.waiters("k") == 1
    t.join(30)
    assert not t.is_alive()
    assert got == ["waiter"]
    assert len(lock) == 0


def _take(lock: KeyedLock, got: list[str]) -> None:
    with lock.sync("k", label="waiter"):
        got.append("waiter")


async def test_a_release_interrupted_half_way_still_frees_the_key() -> None:
    lock = KeyedLock()
    table = PausingTable()
    lock._table = table  # type: ignore[assignment]

    class Interrupted(BaseException):
        pass

    table.interrupt = Interrupted()
    table.resume.set()
    with pytest.raises(Interrupted):
        async with lock("k"):
            table.armed_for = threading.current_thread()
    assert len(lock) == 0
    async with lock("k"):
        assert lock.locked("k")
    assert len(lock) == 0
