"""RedisKeyedLock on its own: leases, wake-ups, lost locks, Redis failures, the exact view, bad input.

Several lock objects in one event loop stand for several processes (each has its own connections,
subscription and lease renewal); tests/test_lock_redis_processes.py uses real OS processes. A test only
waits for outcomes (with a generous bound), never for time to pass.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from chatkit import LockLost, LockServerUnavailable, LockTimeout
from tests._lock_helpers import WAIT, Holder, Watch

pytest.importorskip("redis")

from chatkit import RedisKeyedLock  # noqa: E402


@pytest.fixture
async def locks(redis_url: str) -> AsyncIterator[Callable[..., RedisKeyedLock]]:
    """``locks(**settings)``: lock objects sharing one per-test namespace (as separate processes would)."""
    namespace = f"test:{uuid.uuid4().hex[:12]}"
    made: list[RedisKeyedLock] = []

    def make(url: str = redis_url, **settings: Any) -> RedisKeyedLock:
        settings.setdefault("namespace", namespace)
        lock = RedisKeyedLock(url, **settings)
        made.append(lock)
        return lock

    yield make
    for lock in made:
        await lock.aclose()


def stall_past_lease(url: str, namespace: str) -> None:
    """Block this thread, and with it the event loop running here (no lease renewal, no await), until Redis
    has expired a ticket of ``namespace``: a stand-in for a process paused past its lease. It waits for
    the expiry itself (Redis's keyspace notification), never for a guessed span of time."""
    import redis

    client = redis.Redis.from_url(url)
    previous = client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
    client.config_set("notify-keyspace-events", "Ex")
    pubsub = client.pubsub()
    try:
        pubsub.psubscribe("__keyevent@*__:expired")
        prefix = f"{namespace}:t:"
        if not any(True for _ in client.scan_iter(f"{prefix}*")):
            return  # already expired before we listened
        deadline = time.monotonic() + WAIT
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no ticket of {namespace} expired within {WAIT:g} s"
            message = pubsub.get_message(timeout=remaining)  # blocks until a notification comes
            if message and message["type"] == "pmessage" and message["data"].decode().startswith(prefix):
                return
    finally:
        pubsub.close()
        client.config_set("notify-keyspace-events", previous)
        client.close()


async def _redis(url: str) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, decode_responses=True)


# ----------------------------------------------------------------------------- across lock objects


async def test_fifo_and_tokens_across_lock_objects(locks: Callable[..., RedisKeyedLock]) -> None:
    """Requests from different 'processes' queue in one FIFO per key; tokens follow the handoffs."""
    watches = [Watch() for _ in range(3)]
    a, b, c = (locks(observer=w) for w in watches)
    record: list[str] = []
    first = Holder(a, "k", label="a", record=record)
    await first.entered()
    hb = Holder(b, "k", label="b", record=record)
    await watches[1].until("b", "requested")
    hc = Holder(c, "k", label="c", record=record)
    await watches[2].until("c", "requested")
    await first.done()
    await hb.entered()
    await hb.done()
    await hc.entered()
    await hc.done()
    assert record == ["a", "b", "c"]
    assert first.token is not None and hb.token is not None and hc.token is not None
    assert first.token < hb.token < hc.token


async def test_waiters_are_woken_not_polled(locks: Callable[..., RedisKeyedLock]) -> None:
    """With a one-hour lease a waiter would look again only after an hour: the handoff wakes it."""
    watch = Watch()
    a, b = locks(lease=3600), locks(lease=3600, observer=watch)
    first = Holder(a, "k", label="first")
    await first.entered()
    second = Holder(b, "k", label="second")
    await watch.until("second", "requested")
    await first.done()
    await second.entered()  # within WAIT seconds, i.e. long before any re-check
    await second.done()


async def test_one_process_joins_in_call_order(locks: Callable[..., RedisKeyedLock]) -> None:
    """Requests made in one go by one lock object queue in the order they were made."""
    lock = locks()
    first = Holder(lock, "k", label="first")
    await first.entered()
    record: list[int] = []
    tasks = [asyncio.create_task(lock.run("k", record.append, i)) for i in range(20)]
    await asyncio.sleep(0)  # every task has made its request (none awaits before it is sent)
    await first.done()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert record == list(range(20))


async def test_status_is_the_view_of_every_process(locks: Callable[..., RedisKeyedLock]) -> None:
    watch = Watch()
    a, b = locks(), locks(observer=watch)
    assert not await b.ais_busy("k")
    first = Holder(a, "k", label="holder-a")
    await first.entered()
    waiting = asyncio.create_task(b.run("k", lambda: None, label="waiter-b"))
    await watch.until("waiter-b", "requested")
    status = await b.status("k")
    assert (status.held, status.holder, status.token, status.queued) == (True, "holder-a", first.token, 2)
    assert status.lease_left is not None and 0 < status.lease_left <= a.lease
    assert not b.is_busy("other") and b.is_busy("k") and not b.locked("k")  # b's local view: it waits
    await first.done()
    await asyncio.wait_for(waiting, WAIT)
    assert not await a.ais_busy("k")


async def test_max_pending_counts_waiters_of_every_process(locks: Callable[..., RedisKeyedLock]) -> None:
    from chatkit import LockQueueFull

    watch = Watch()
    a, b, c = locks(), locks(observer=watch), locks(max_pending=1)
    first = Holder(a, "k", label="a")
    await first.entered()
    waiting = asyncio.create_task(b.run("k", lambda: None, label="b"))
    await watch.until("b", "requested")
    with pytest.raises(LockQueueFull):
        await c.run("k", lambda: None)
    await first.done()
    await asyncio.wait_for(waiting, WAIT)


# ----------------------------------------------------------------------------- leases


class _CountingLock(RedisKeyedLock):
    """Lets a test wait until the lock has renewed its leases a number of times."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds = 0
        self.renewed = asyncio.Event()

    def _renewed(self, count: int) -> None:
        self.rounds += 1
        self.renewed.set()


async def test_a_renewed_lease_outlives_its_length(redis_url: str) -> None:
    """A holder keeps its key over many lease lengths: a waiter sees it held throughout."""
    ns = f"test:{uuid.uuid4().hex[:12]}"
    holder_lock = _CountingLock(redis_url, namespace=ns, lease=0.3)
    other = RedisKeyedLock(redis_url, namespace=ns, lease=0.3)
    try:
        first = Holder(holder_lock, "k", label="first")
        await first.entered()
        while holder_lock.rounds < 6:  # two lease lengths' worth of renewals (lease/3 apart)
            holder_lock.renewed.clear()
            await asyncio.wait_for(holder_lock.renewed.wait(), WAIT)
        status = await other.status("k")
        assert (status.held, status.token) == (True, first.token)
        with pytest.raises(LockTimeout):
            await other.run("k", lambda: None, timeout=0.1)
        await first.done()
    finally:
        await holder_lock.aclose()
        await other.aclose()


async def test_holder_whose_ticket_vanished_is_cancelled_and_told(
    locks: Callable[..., RedisKeyedLock], redis_url: str
) -> None:
    """The server lost the holder's ticket (flushed, expired): its next renewal finds out; the block is cancelled."""
    lock = locks(lease=0.3)
    reached_end = False

    async def holder() -> None:
        nonlocal reached_end
        async with lock("k", label="holder"):
            r = await _redis(redis_url)
            try:
                await r.delete(*[key async for key in r.scan_iter(f"{lock.namespace}:t:*")])
            finally:
                await r.aclose()
            await asyncio.Event().wait()  # would run forever if not told
            reached_end = True

    with pytest.raises(LockLost, match="lost the lock on key 'k'") as caught:
        await asyncio.wait_for(holder(), WAIT)
    assert caught.value.held and caught.value.keys == ("k",) and caught.value.url == redis_url
    assert not reached_end
    assert not lock.is_busy()
    async with lock("k"):  # the key is free again
        pass


async def test_holder_that_cannot_renew_in_time_is_told(locks: Callable[..., RedisKeyedLock], redis_url: str) -> None:
    """A holder that blocks its own event loop past its lease is told once it runs again."""
    lock = locks(lease=0.2)

    with pytest.raises(LockLost, match="lost the lock on key 'k'") as caught:
        async with lock("k"):
            stall_past_lease(redis_url, lock.namespace)  # the event loop (and the renewal) is stuck
            await asyncio.Event().wait()  # would run forever if not told
    assert caught.value.held


async def test_holder_that_finishes_after_its_lease_ran_out_is_told_at_the_end(
    locks: Callable[..., RedisKeyedLock], redis_url: str
) -> None:
    lock = locks(lease=0.2)

    with pytest.raises(LockLost, match="before its block ended"):
        async with lock("k"):
            stall_past_lease(redis_url, lock.namespace)  # stuck past the lease, then done without awaiting


async def test_lost_holder_cancelled_by_someone_else_too_stays_cancelled(
    locks: Callable[..., RedisKeyedLock], redis_url: str
) -> None:
    lock = locks(lease=0.2)

    async def holder() -> None:
        async with lock("k"):
            stall_past_lease(redis_url, lock.namespace)
            asyncio.current_task().cancel()  # type: ignore[union-attr]  # an outside cancellation as well
            await asyncio.sleep(0)

    with pytest.raises(asyncio.CancelledError):
        await holder()


# ----------------------------------------------------------------------------- Redis restarted or down


async def test_redis_restart_tells_holders_and_waiters_and_tokens_keep_growing(own_redis: Any) -> None:
    ns = "test:restart"
    watch = Watch()
    a = RedisKeyedLock(own_redis.url, namespace=ns, lease=2)
    b = RedisKeyedLock(own_redis.url, namespace=ns, lease=2, observer=watch)
    try:
        first = Holder(a, "k", label="holder")
        await first.entered()
        waiter = asyncio.create_task(b.run("k", lambda: None, label="waiter"))
        await watch.until("waiter", "requested")
        await asyncio.to_thread(own_redis.restart)  # empty dataset: every ticket is gone
        with pytest.raises(LockLost, match=own_redis.url) as held:
            await asyncio.wait_for(first.task, WAIT)
        assert held.value.held
        with pytest.raises(LockLost, match="queue") as queued:
            await asyncio.wait_for(waiter, WAIT)
        assert not queued.value.held
        request = b("k")
        async with request:  # the restarted server serves new requests, with newer tokens
            assert request.token is not None and first.token is not None and request.token > first.token
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_down_is_a_clear_error_naming_the_url(own_redis: Any) -> None:
    lock = RedisKeyedLock(own_redis.url, namespace="test:down", lease=0.3, socket_timeout=2)
    try:
        first = Holder(lock, "k", label="holder")
        await first.entered()
        await asyncio.to_thread(own_redis.stop)
        with pytest.raises(LockLost, match="unreachable") as caught:
            await asyncio.wait_for(first.task, WAIT)  # it cannot renew: told at its lease deadline
        assert own_redis.url in str(caught.value)
        with pytest.raises(LockServerUnavailable, match=f"could not reach the lock's Redis server at {own_redis.url}"):
            await lock.run("other", lambda: None)
    finally:
        await lock.aclose()


async def test_closing_the_lock_under_a_holder_tells_the_holder(redis_url: str) -> None:
    """aclose() cancels a block still holding: its ``async with`` raises LockLost (it used to fail an
    internal assertion, the closed lock having no event loop any more)."""
    lock = RedisKeyedLock(redis_url, namespace=f"test:{uuid.uuid4().hex[:8]}")
    holder = Holder(lock, "k", label="holder")
    await holder.entered()
    await lock.aclose()
    with pytest.raises(LockLost, match="the lock was closed"):
        await asyncio.wait_for(holder.task, WAIT)


async def test_unreachable_server_at_first_use(locks: Callable[..., RedisKeyedLock]) -> None:
    from chatkit.testing import free_port

    lock = locks(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=2)
    with pytest.raises(LockServerUnavailable, match="could not reach") as caught:
        await lock.run("k", lambda: None)
    assert caught.value.url.startswith("redis://127.0.0.1:")
    assert not lock.is_busy()


def test_password_never_shown() -> None:
    lock = RedisKeyedLock("redis://user:secret@127.0.0.1:6379/0")
    assert "secret" not in repr(lock) and lock.url == "redis://user:***@127.0.0.1:6379/0"


# ----------------------------------------------------------------------------- bad input and packaging


def test_keys_must_be_str_or_int(redis_url: str) -> None:
    lock = RedisKeyedLock(redis_url)
    with pytest.raises(TypeError, match=r"str or int .* got tuple \('a', 1\)"):
        lock(("a", 1))
    assert lock(1, "1").keys == (1,)  # the same Redis key


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"lease": 0.05}, ValueError, "lease must be at least 0.1"),
        ({"lease": float("inf")}, ValueError, "lease"),
        ({"namespace": ""}, ValueError, "namespace"),
        ({"max_pending": 1.5}, TypeError, "max_pending"),
        ({"clock": 3}, TypeError, "clock"),
    ],
)
def test_bad_settings(settings: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RedisKeyedLock("redis://127.0.0.1:6379/0", **settings)


def test_bad_url() -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisKeyedLock("http://example.org")
    with pytest.raises(TypeError, match="url"):
        RedisKeyedLock(6379)  # type: ignore[arg-type]


async def test_one_event_loop_per_lock(locks: Callable[..., RedisKeyedLock]) -> None:
    lock = locks()
    async with lock("k"):
        pass

    def other_loop() -> None:
        async def use() -> None:
            async with lock("k"):
                pass

        asyncio.run(use())

    with pytest.raises(RuntimeError, match="one lock per event loop"):
        await asyncio.to_thread(other_loop)


def test_without_redis_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ImportError, match=r'pip install "chatkit\[distributed\]"'):
        RedisKeyedLock("redis://127.0.0.1:6379/0")
