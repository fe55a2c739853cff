"""One lock suite, every lock of the protocol: the in-process KeyedLock and the cross-process RedisKeyedLock.

The trio ``generic_lock_test`` pattern: exclusion, FIFO, timeouts, cancellation, several keys, the pending
limit, fencing tokens and observer events, through the public API only. Requests are sequenced through
the observer (a test waits until a request has joined the queue before making the next one); timeouts are
real but short, and a test only ever waits for an outcome, never for time to pass.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from chatkit import KeyedLock, KeyStatistics, LockQueueFull, LockStatistics, LockTimeout
from chatkit.locks import AsyncKeyLock
from tests._lock_helpers import WAIT, Holder, Watch


@pytest.fixture(params=["KeyedLock", "RedisKeyedLock"])
def lock_kind(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    if request.param == "RedisKeyedLock":
        return request.param, request.getfixturevalue("redis_url")
    return request.param, None


@pytest.fixture
async def make_lock(lock_kind: tuple[str, str | None]) -> AsyncIterator[Callable[..., Any]]:
    """``make_lock(**settings)``: a fresh lock of the kind under test (Redis: keys under a per-test namespace)."""
    kind, url = lock_kind
    made: list[Any] = []
    namespace = f"test:{uuid.uuid4().hex[:12]}"

    def make(**settings: Any) -> Any:
        if kind == "KeyedLock":
            return KeyedLock(**settings)
        from chatkit import RedisKeyedLock

        lock = RedisKeyedLock(url, namespace=namespace, **settings)  # type: ignore[arg-type]
        made.append(lock)
        return lock

    yield make
    for lock in made:
        await lock.aclose()


async def test_implements_the_protocol(make_lock: Callable[..., Any]) -> None:
    assert isinstance(make_lock(), AsyncKeyLock)


async def test_exclusion_and_fifo(make_lock: Callable[..., Any]) -> None:
    """Waiters run one at a time, in the order they joined the queue."""
    watch = Watch()
    lock = make_lock(observer=watch)
    record: list[str] = []
    inside = 0
    most = 0

    async def turn(label: str) -> None:
        nonlocal inside, most
        async with lock("k", label=label):
            inside += 1
            most = max(most, inside)
            record.append(label)
            await asyncio.sleep(0)  # a chance for anyone else to barge in
            inside -= 1

    first = Holder(lock, "k", label="first", record=record)
    await first.entered()
    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(turn(f"w{i}")))
        await watch.until(f"w{i}", "requested")
    await first.done()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert record == ["first", "w0", "w1", "w2", "w3"]
    assert most == 1
    assert not lock.is_busy("k")


async def test_other_keys_run_in_parallel(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    a = Holder(lock, "a", label="a")
    await a.entered()
    async with lock("b"):  # must not wait for "a"
        assert lock.is_busy("a") and lock.is_busy("b")
    await a.done()


async def test_run_returns_results_of_sync_and_async_functions(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()

    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    assert await lock.run("k", lambda: 1) == 1
    assert await lock.run(["k", "j"], double, 21) == 42
    with pytest.raises(TypeError, match="callable"):
        await lock.run("k", 3)


async def test_failing_holder_releases(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    with pytest.raises(RuntimeError, match="boom"):
        async with lock("k"):
            raise RuntimeError("boom")
    async with lock("k"):
        pass
    assert not lock.is_busy()


async def test_timeout_raises_and_leaves_the_queue(make_lock: Callable[..., Any]) -> None:
    watch = Watch()
    lock = make_lock(observer=watch)
    first = Holder(lock, "k", label="first")
    await first.entered()
    behind = asyncio.create_task(lock.run("k", lambda: "behind", label="behind"))
    await watch.until("behind", "requested")
    with pytest.raises(LockTimeout, match="gave up waiting for key 'k'") as caught:
        await lock.run("k", lambda: None, label="impatient", timeout=0.05)
    assert caught.value.keys == ("k",)
    assert caught.value.waited >= 0.05
    assert lock.waiters("k") == 1  # only "behind" waits now
    await first.done()
    assert await asyncio.wait_for(behind, WAIT) == "behind"
    assert lock.statistics().timeouts == 1
    assert watch.kinds("impatient") == ["requested", "timed_out"]


async def test_default_timeout_and_per_call_override(make_lock: Callable[..., Any]) -> None:
    lock = make_lock(timeout=0.05)
    first = Holder(lock, "k", label="first")
    await first.entered()
    with pytest.raises(LockTimeout):
        await lock.run("k", lambda: None)
    late = asyncio.create_task(lock.run("k", lambda: "late", timeout=None))
    await first.done()
    assert await asyncio.wait_for(late, WAIT) == "late"


async def test_cancelled_waiter_leaves_the_queue(make_lock: Callable[..., Any]) -> None:
    watch = Watch()
    lock = make_lock(observer=watch)
    first = Holder(lock, "k", label="first")
    await first.entered()
    gone = asyncio.create_task(lock.run("k", lambda: "never", label="gone"))
    await watch.until("gone", "requested")
    behind = asyncio.create_task(lock.run("k", lambda: "behind", label="behind"))
    await watch.until("behind", "requested")
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert lock.waiters("k") == 1
    await first.done()
    assert await asyncio.wait_for(behind, WAIT) == "behind"
    assert lock.statistics().cancellations == 1
    assert watch.kinds("gone") == ["requested", "cancelled"]
    assert not lock.is_busy()


async def test_cancelled_holder_releases(make_lock: Callable[..., Any]) -> None:
    watch = Watch()
    lock = make_lock(observer=watch)
    first = Holder(lock, "k", label="first")
    await first.entered()
    behind = asyncio.create_task(lock.run("k", lambda: "behind", label="behind"))
    await watch.until("behind", "requested")
    first.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first.task
    assert await asyncio.wait_for(behind, WAIT) == "behind"
    assert watch.kinds("first") == ["requested", "acquired", "released"]


async def test_several_keys_in_opposite_orders_never_deadlock(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    inside: dict[str, int] = {"a": 0, "b": 0, "c": 0}
    overlaps = 0

    async def use(*keys: str) -> None:
        nonlocal overlaps
        async with lock(*keys):
            for k in keys:
                inside[k] += 1
                overlaps += inside[k] > 1
            await asyncio.sleep(0)
            for k in keys:
                inside[k] -= 1

    shapes = [("a", "b"), ("b", "a"), ("b", "c"), ("c", "a"), ("a",), ("c", "b", "a")]
    await asyncio.wait_for(asyncio.gather(*(use(*shapes[i % len(shapes)]) for i in range(30))), WAIT)
    assert overlaps == 0
    assert not lock.is_busy()


async def test_several_keys_are_taken_together_and_in_turn(make_lock: Callable[..., Any]) -> None:
    """A request for (a, b) waits for b without letting a later request for a overtake it."""
    watch = Watch()
    lock = make_lock(observer=watch)
    record: list[str] = []
    b = Holder(lock, "b", label="b", record=record)
    await b.entered()
    both = asyncio.create_task(lock.run(["a", "b", "a"], record.append, "a+b", label="a+b"))
    await watch.until("a+b", "requested")
    only_a = asyncio.create_task(lock.run("a", record.append, "a", label="a"))
    await watch.until("a", "requested")
    assert not lock.locked("a")  # a is free, but its queue is in order: "a+b" first
    await b.done()
    await asyncio.wait_for(asyncio.gather(both, only_a), WAIT)
    assert record == ["b", "a+b", "a"]
    acquired = next(e for e in watch.events if e.label == "a+b" and e.kind == "acquired")
    assert acquired.keys == ("a", "b")


async def test_several_keys_timeout_holds_none(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    b = Holder(lock, "b", label="b")
    await b.entered()
    with pytest.raises(LockTimeout, match=r"keys \['a', 'b'\]"):
        await lock.run(["a", "b"], lambda: None, timeout=0.05)
    async with lock("a"):  # not left held by the timed-out request
        pass
    await b.done()


async def test_max_pending_rejects_at_once_and_frees_places(make_lock: Callable[..., Any]) -> None:
    watch = Watch()
    lock = make_lock(max_pending=1, observer=watch)
    first = Holder(lock, "k", label="first")
    await first.entered()
    second = asyncio.create_task(lock.run("k", lambda: "second", label="second"))
    await watch.until("second", "requested")
    with pytest.raises(LockQueueFull, match="max_pending=1") as caught:
        await lock.run("k", lambda: None, label="third")
    assert (caught.value.key, caught.value.max_pending) == ("k", 1)
    assert watch.kinds("third") == ["rejected"]
    await first.done()
    assert await asyncio.wait_for(second, WAIT) == "second"
    assert await lock.run("k", lambda: "fourth") == "fourth"  # the place is free again
    assert lock.statistics().rejections == 1


async def test_tokens_grow_with_every_acquisition_of_a_key(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    tokens: list[int] = []
    for keys in (("k",), ("k",), ("j",), ("k", "j"), ("j",), ("k",)):
        request = lock(*keys)
        async with request:
            assert isinstance(request.token, int)
            tokens.append(request.token)
    k = [tokens[i] for i in (0, 1, 3, 5)]
    j = [tokens[i] for i in (2, 3, 4)]
    assert k == sorted(set(k)) and j == sorted(set(j))  # strictly increasing per key


async def test_tokens_follow_the_handoff_order(make_lock: Callable[..., Any]) -> None:
    watch = Watch()
    lock = make_lock(observer=watch)
    first = Holder(lock, "k", label="first")
    await first.entered()
    later = [Holder(lock, "k", label=f"w{i}") for i in range(3)]
    for h in later:
        await watch.until(h.label, "requested")
    await first.done()
    for h in later:
        await h.entered()
        await h.done()
    tokens = [first.token, *(h.token for h in later)]
    assert tokens == sorted(set(tokens))  # type: ignore[type-var]


async def test_observer_sees_each_request_in_order(make_lock: Callable[..., Any]) -> None:
    watch = Watch()
    lock = make_lock(observer=watch)
    first = Holder(lock, "k", label="A")
    await first.entered()
    b = asyncio.create_task(lock.run("k", lambda: None, label="B"))
    await watch.until("B", "requested")
    await first.done()
    await asyncio.wait_for(b, WAIT)
    assert watch.kinds("A") == ["requested", "acquired", "released"]
    assert watch.kinds("B") == ["requested", "acquired", "released"]
    acquired = next(e for e in watch.events if e.label == "B" and e.kind == "acquired")
    released = next(e for e in watch.events if e.label == "A" and e.kind == "released")
    assert acquired.key == "k" and acquired.waited is not None and acquired.waited >= 0
    assert released.held is not None and released.held >= 0
    lock.remove_observer(watch)
    async with lock("k", label="C"):
        pass
    assert watch.kinds("C") == []
    with pytest.raises(ValueError, match="not an observer"):
        lock.remove_observer(watch)


async def test_failing_observer_is_logged_not_raised(make_lock: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: object) -> None:
        raise ValueError("observer bug")

    lock = make_lock(observer=broken)
    async with lock("k"):
        pass
    assert "observer bug" in caplog.text


async def test_is_busy_and_statistics_of_this_lock(make_lock: Callable[..., Any]) -> None:
    watch = Watch()
    lock = make_lock(observer=watch)
    first = Holder(lock, "k", label="first")
    await first.entered()
    second = asyncio.create_task(lock.run("k", lambda: None, label="second"))
    await watch.until("second", "requested")
    assert lock.is_busy() and lock.is_busy("k") and not lock.is_busy("other")
    assert lock.locked("k") and lock.waiters("k") == 1 and len(lock) == 1
    stats = lock.statistics("k")
    assert isinstance(stats, KeyStatistics)
    assert (stats.held, stats.holder, stats.waiters) == (True, "first", 1)
    assert "held=1 waiting=1" in repr(lock)
    await first.done()
    await asyncio.wait_for(second, WAIT)
    total = lock.statistics()
    assert isinstance(total, LockStatistics)
    assert (total.acquisitions, total.keys, total.held, total.waiters) == (2, 0, 0, 0)
    assert total.max_wait > 0 and total.total_hold > 0
    assert lock.statistics("k") == KeyStatistics("k", False, None, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)
    assert not lock.is_busy()


async def test_reentry_by_the_same_task_raises_at_once(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    async with lock("k"):
        with pytest.raises(RuntimeError, match="deadlock"):
            async with lock("k"):
                pass
    assert not lock.is_busy()


async def test_request_object_is_single_use(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    request = lock("k")
    async with request:
        pass
    with pytest.raises(RuntimeError, match="already used"):
        async with request:
            pass


async def test_bad_input_is_refused(make_lock: Callable[..., Any]) -> None:
    lock = make_lock()
    with pytest.raises(TypeError, match="at least one key"):
        lock()
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            lock("k", timeout=bad)
    with pytest.raises(TypeError, match="label"):
        lock("k", label=3)
    with pytest.raises(ValueError, match="max_pending"):
        make_lock(max_pending=0)
    with pytest.raises(ValueError, match="timeout"):
        make_lock(timeout=-1)
    with pytest.raises(TypeError, match="observer"):
        lock.add_observer(3)
