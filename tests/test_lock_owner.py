"""KeyedLock's owner model: a request is owned by the task (or thread) that entered it, as in anyio and trio.

Re-entry means the owner asking again, wherever in its code it asks: a key taken inside a helper
(an ``@asynccontextmanager``, a coroutine that returns holding it) and asked for again by the same task is
re-entry. Any other task asking is not, whoever started it and whatever loop stepped it: a child task, a
task stepped by a nested event loop (``chatkit.run`` in a notebook), a task on another thread's loop.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from chatkit import KeyedLock, LockTimeout
from chatkit.locks import LockRequest
from tests.conftest import FakeClock, settle
from tests.test_lock import Sequencer

# ----------------------------------------------------------------------------- re-entry by the owning task


async def _outcome_at_once(body: asyncio.Task[str], clock: FakeClock, timeout: float) -> tuple[bool, str]:
    """Whether ``body`` finished without time passing, and how it ended (time is then let run out)."""
    await settle()
    at_once = body.done()
    if not at_once:
        await clock.advance_and_settle(timeout + 1)  # the old behaviour: it waited for itself until its timeout
    try:
        result = await body
    except (RuntimeError, LockTimeout) as exc:
        result = f"{type(exc).__name__}: {exc}"
    return at_once, result


@pytest.mark.parametrize("reentrant", [False, True], ids=["reentrant=False", "reentrant=True"])
async def test_key_taken_in_an_asynccontextmanager_helper_is_reentry(reentrant: bool, loop_clock: FakeClock) -> None:
    lock = KeyedLock(reentrant=reentrant, timeout=10, clock=loop_clock)

    @asynccontextmanager
    async def session(key: str) -> AsyncIterator[None]:
        async with lock(key):
            yield

    async def turn() -> str:
        async with session("k"):
            async with lock("k"):  # the same task asks again
                return "nested"

    at_once, result = await _outcome_at_once(asyncio.create_task(turn()), loop_clock, 10)
    assert at_once, f"the task waited for a key it holds itself ({result})"
    if reentrant:
        assert result == "nested"
    else:
        assert result.startswith("RuntimeError") and "already holds key 'k'" in result
    assert len(lock) == 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["reentrant=False", "reentrant=True"])
async def test_key_taken_by_a_helper_coroutine_that_returned_is_reentry(reentrant: bool, loop_clock: FakeClock) -> None:
    """A helper enters the request and returns it (as a session manager's acquire step does)."""
    lock = KeyedLock(reentrant=reentrant, timeout=10, clock=loop_clock)

    async def take(key: str) -> LockRequest:
        request = lock(key)
        await request.__aenter__()
        return request

    async def turn() -> str:
        request = await take("k")
        try:
            async with lock("k"):
                return "nested"
        finally:
            await request.__aexit__(None, None, None)

    at_once, result = await _outcome_at_once(asyncio.create_task(turn()), loop_clock, 10)
    assert at_once, f"the task waited for a key it holds itself ({result})"
    assert result == "nested" if reentrant else "already holds" in result
    assert len(lock) == 0


async def test_reentry_is_seen_under_asyncio_timeout_which_stays_in_the_task(loop_clock: FakeClock) -> None:
    lock = KeyedLock(timeout=10, clock=loop_clock)
    async with lock("k"):
        with pytest.raises(RuntimeError, match="already holds"):
            async with asyncio.timeout(5):
                async with lock("k"):
                    pass
    assert len(lock) == 0


async def test_a_child_task_of_the_holder_waits_like_any_other_task() -> None:
    """A task started by the holder is another task: it waits (it is not the owner), even with reentrant=True."""
    lock = KeyedLock(reentrant=True)
    record: list[str] = []

    async def child() -> None:
        async with lock("k"):
            record.append("child")

    async with lock("k"):
        t = asyncio.create_task(child())
        await settle()
        assert not t.done() and lock.waiters("k") == 1
        record.append("holder")
    await t
    assert record == ["holder", "child"]


async def test_reentrant_acquisitions_share_the_outer_token() -> None:
    lock = KeyedLock(reentrant=True)
    outer = lock("k")
    async with outer:
        inner = lock("k")
        async with inner:
            assert inner.token == outer.token
    later = lock("k")
    async with later:
        assert later.token is not None and outer.token is not None and later.token > outer.token


def test_thread_reentry_raises_at_once_and_another_thread_waits() -> None:
    seq = Sequencer()
    lock = KeyedLock(observer=seq)
    record: list[str] = []

    def other() -> None:
        with lock.sync("k", label="other"):
            record.append("other")

    with lock.sync("k", label="main"):
        with pytest.raises(RuntimeError, match="'MainThread' already holds key 'k'"):
            with lock.sync("k"):
                pass
        t = threading.Thread(target=other)
        t.start()
        seq.wait_for("other", "requested")  # another thread: it queues
        assert lock.waiters("k") == 1
        record.append("main")
    t.join(30)
    assert not t.is_alive()
    assert record == ["main", "other"]
    assert len(lock) == 0


# ----------------------------------------------------------------------------- the protocol


async def test_a_request_is_a_lock_request_with_a_fencing_token() -> None:
    lock = KeyedLock()
    request = lock("k")
    assert isinstance(request, LockRequest)
    assert isinstance(lock("a", "b"), LockRequest)
    assert request.token is None  # not entered yet
    async with request:
        first = request.token
        assert isinstance(first, int)
    assert request.token == first  # still readable after the block
    again = lock("k")
    async with again:
        assert again.token is not None and again.token > first


async def test_holder_is_named_after_the_owning_task() -> None:
    lock = KeyedLock()
    inside = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with lock("k"):
            inside.set()
            await release.wait()

    t = asyncio.create_task(hold(), name="turn-7")
    await inside.wait()
    assert lock.statistics("k").holder == "turn-7"
    assert "turn-7" in repr(lock._table["k"])  # the request's repr names its owner too
    release.set()
    await t


# ----------------------------------------------------------------------------- loops and threads


def test_owner_is_right_after_a_loop_moved_to_another_thread() -> None:
    """Thread A runs loop L1, then L1 runs in thread B (a task there is mid-step) while A runs loop L2:
    a task on L2 taking the key is its owner, not B's running task."""
    lock = KeyedLock()
    l1 = asyncio.new_event_loop()

    async def touch() -> None:  # use the lock on L1 from thread A first
        async with lock("warm-up"):
            pass

    l1.run_until_complete(touch())
    b_in_step = threading.Event()
    b_may_go = threading.Event()
    names: list[str | None] = []

    async def blocked_in_a_step() -> None:
        b_in_step.set()
        b_may_go.wait(30)  # blocks thread B inside this task's step, so it is L1's current task

    b = threading.Thread(target=lambda: l1.run_until_complete(l1.create_task(blocked_in_a_step(), name="B")))
    b.start()
    assert b_in_step.wait(30)

    async def on_l2() -> None:
        async with lock("k"):
            names.append(lock.statistics("k").holder)

    try:
        _run_named(on_l2(), "W")
    finally:
        b_may_go.set()
        b.join(30)
        l1.close()
    assert names == ["W"]
    assert len(lock) == 0


def _run_named(coro: object, name: str) -> None:
    async def main() -> None:
        await asyncio.create_task(coro, name=name)  # type: ignore[arg-type]

    asyncio.run(main())


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter: the notebook runner may patch asyncio process-wide."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("reentrant", [False, True], ids=["reentrant=False", "reentrant=True"])
def test_tasks_stepped_by_a_nested_run_are_not_the_holder(reentrant: bool) -> None:
    """In a notebook, sync helper code calls ``chatkit.run`` while a task holds a key; another task that asks
    for the key meanwhile (stepped by the nested run, with a re-entrant loop) is not the holder: it waits
    its turn, whichever way ``chatkit.run`` runs the coroutine."""
    out = _python(
        f"""
        import asyncio, chatkit
        from chatkit import KeyedLock

        async def main():
            lock = KeyedLock(reentrant={reentrant})
            record = []

            async def other():
                try:
                    async with lock("k", label="other"):
                        record.append(("other holds", lock.statistics("k").holder))
                except RuntimeError as exc:
                    record.append(("other refused", str(exc)))

            async def child():
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                return "child done"

            async with lock("k", label="holder"):
                t = asyncio.create_task(other())
                record.append(chatkit.run(child()))  # sync helper code, as called from a notebook cell
            record.append("holder released")
            await t
            print(record)

        asyncio.run(main())
        """
    )
    assert out == "['child done', 'holder released', ('other holds', 'other')]"
