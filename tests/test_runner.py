"""chatkit.run: a coroutine from sync code, with or without a running event loop (asyncio or uvloop)."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import chatkit

try:
    import uvloop
except ModuleNotFoundError:  # a dev dependency (make test has it); without it only its cases are skipped
    uvloop = None

needs_uvloop = pytest.mark.skipif(uvloop is None, reason="uvloop is not installed: pip install -e '.[dev]'")


async def _answer(value: int) -> int:
    await asyncio.sleep(0)
    return value


async def _boom() -> None:
    await asyncio.sleep(0)
    raise KeyError("boom")


# A loop running in this thread, as in Jupyter: plain asyncio, or uvloop.
LOOPS = [pytest.param("asyncio"), pytest.param("uvloop", marks=needs_uvloop)]


def _in_running_loop(kind: str, cell: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``cell()`` the way a notebook kernel runs a cell: on a loop running in this thread."""
    factory = asyncio.new_event_loop if kind == "asyncio" else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(cell())


# ------------------------------------------------------------------------------------- no running loop
def test_runs_a_coroutine_without_a_loop() -> None:
    assert chatkit.run(_answer(42)) == 42


def test_propagates_the_exception_unchanged() -> None:
    with pytest.raises(KeyError, match="boom"):
        chatkit.run(_boom())


def test_runs_in_a_worker_thread_without_a_loop() -> None:
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(chatkit.run(_answer(7))))
    thread.start()
    thread.join()
    assert results == [7]


def test_accepts_any_awaitable() -> None:
    class Awaitable:
        def __await__(self):  # type: ignore[no-untyped-def]
            return _answer(3).__await__()

    assert chatkit.run(Awaitable()) == 3


@pytest.mark.parametrize("bad", [42, None, "coroutine", _answer])
def test_rejects_what_is_not_awaitable(bad: object) -> None:
    with pytest.raises(TypeError, match="awaitable"):
        chatkit.run(bad)  # type: ignore[arg-type]


def test_hints_at_an_uncalled_coroutine_function() -> None:
    with pytest.raises(TypeError, match="forget to call"):
        chatkit.run(_answer)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- a running loop
@pytest.mark.parametrize("kind", LOOPS)
def test_inside_a_running_loop(kind: str) -> None:
    """Jupyter's case (and a uvloop application's): a loop already runs in this thread."""
    request = contextvars.ContextVar("request", default="none")

    async def child() -> tuple[str, str, asyncio.AbstractEventLoop]:
        await asyncio.sleep(0)
        return request.get(), threading.current_thread().name, asyncio.get_running_loop()

    async def cell() -> None:
        outer = asyncio.get_running_loop()
        request.set("cell 1")
        seen, thread, loop = chatkit.run(child())  # asyncio.run() would raise here
        assert (seen, thread) == ("cell 1", "chatkit.run")
        assert loop is not outer and loop.is_closed()
        assert not hasattr(outer, "_nest_patched")  # the caller's loop is left alone

    _in_running_loop(kind, cell)


@pytest.mark.parametrize("kind", LOOPS)
def test_exceptions_propagate_unchanged_from_inside_a_loop(kind: str) -> None:
    raised: list[BaseException] = []

    async def failing() -> None:
        await asyncio.sleep(0)
        error = KeyError("boom")
        raised.append(error)
        raise error

    async def cell() -> None:
        with pytest.raises(KeyError, match="boom") as info:
            chatkit.run(failing())
        assert info.value is raised[0]

    _in_running_loop(kind, cell)


def test_a_coroutine_that_cancels_itself_propagates_cancelled_error() -> None:
    async def cancelled() -> None:
        raise asyncio.CancelledError

    async def cell() -> str:
        try:
            chatkit.run(cancelled())
        except asyncio.CancelledError:
            return "cancelled"
        return "returned"

    assert _in_running_loop("asyncio", cell) == "cancelled"


@pytest.mark.parametrize("kind", LOOPS)
def test_tasks_and_futures_are_refused(kind: str) -> None:
    """A task belongs to the caller's loop, which waits while run() blocks: refuse it instead of hanging."""

    async def cell() -> None:
        task = asyncio.ensure_future(_answer(1))
        with pytest.raises(TypeError, match="belongs to the loop"):
            chatkit.run(task)
        assert await task == 1
        with pytest.raises(TypeError, match="belongs to the loop"):
            chatkit.run(asyncio.get_running_loop().create_future())

    _in_running_loop(kind, cell)


def test_objects_bound_to_the_callers_loop_cannot_be_used_inside() -> None:
    """The documented limit: an asyncio.Event the notebook's loop waits on is bound to that loop."""

    async def cell() -> None:
        event = asyncio.Event()
        waiter = asyncio.create_task(event.wait())
        await asyncio.sleep(0)  # the waiter binds the event to this loop
        with pytest.raises(RuntimeError, match="bound to a different event loop"):
            chatkit.run(event.wait())
        event.set()
        await waiter

    _in_running_loop("asyncio", cell)


@pytest.mark.parametrize("kind", LOOPS)
def test_keyed_lock_and_session_manager_made_in_the_callers_loop_work_inside(kind: str) -> None:
    async def cell() -> list[str]:
        lock = chatkit.KeyedLock(timeout=5)
        async with lock("k"):  # used in the notebook's loop first
            pass
        manager = chatkit.SessionManager()
        sid = await manager.create_session()
        await manager.chat(sid, "first")

        async def in_run() -> None:
            async with lock("k"):
                await manager.chat(sid, "second")

        chatkit.run(in_run())
        await manager.chat(sid, "third")
        return [m.content for m in await manager.get_history(sid) if m.role == "user"]

    assert _in_running_loop(kind, cell) == ["first", "second", "third"]


# ------------------------------------------------------------------------------ fresh interpreters
def _python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with warnings as errors; return the finished process."""
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_uvloop
def test_nothing_is_patched_nor_warned_under_uvloop() -> None:
    """nest_asyncio could not patch uvloop (ValueError) and left a coroutine never awaited (RuntimeWarning)."""
    done = _python(
        """
        import asyncio, sys, uvloop, chatkit

        async def child():
            await asyncio.sleep(0)
            return "child done"

        async def cell():
            return chatkit.run(child())

        print(uvloop.run(cell()), "nest_asyncio" in sys.modules, asyncio.run.__module__)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "child done False asyncio.runners"
    assert done.stderr == ""  # no "coroutine ... was never awaited", no "Exception ignored"


@pytest.mark.parametrize("kind", LOOPS)
def test_keyboard_interrupt_cancels_the_coroutine_and_propagates(kind: str) -> None:
    """Ctrl+C (interrupt the kernel) while the cell waits: the coroutine is cancelled and cleans up, then
    KeyboardInterrupt reaches the caller. The signal is sent from inside the coroutine, so it always
    arrives while run() waits."""
    done = _python(
        f"""
        import asyncio, os, signal, chatkit

        async def child():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                await asyncio.Event().wait()  # until cancelled
            finally:
                print("child cleaned up", flush=True)

        async def cell():
            try:
                chatkit.run(child())
            except KeyboardInterrupt:
                print("KeyboardInterrupt reached the cell", flush=True)

        {"import uvloop" if kind == "uvloop" else ""}
        loop = {"uvloop.new_event_loop" if kind == "uvloop" else "asyncio.new_event_loop"}()
        loop.run_until_complete(cell())   # as a kernel does: SIGINT raises KeyboardInterrupt
        loop.close()
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["child cleaned up", "KeyboardInterrupt reached the cell"]
    assert done.stderr == ""


def test_ctrl_c_under_asyncio_run_cancels_the_coroutine() -> None:
    """asyncio.run's first Ctrl+C cancels the main task (no KeyboardInterrupt): run() notices, cancels
    the coroutine, and asyncio.run then ends with KeyboardInterrupt as usual."""
    done = _python(
        """
        import asyncio, os, signal, chatkit

        async def child():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                await asyncio.Event().wait()  # until cancelled
            finally:
                print("child cleaned up", flush=True)

        async def main():
            try:
                chatkit.run(child())
            except asyncio.CancelledError:
                print("the main task was cancelled", flush=True)
                raise

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["child cleaned up", "the main task was cancelled", "KeyboardInterrupt"]
    assert done.stderr == ""
