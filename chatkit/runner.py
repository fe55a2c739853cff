"""Run a coroutine from synchronous code, whether or not an event loop is already running.

``asyncio.run`` refuses to start inside a running loop, which is exactly where a Jupyter cell, an
IPython shell or a Gradio callback lives. :func:`run` never patches that loop (``nest_asyncio`` cannot
patch uvloop, and patching changes asyncio for the whole process). Instead:

* no loop runs in this thread: ``asyncio.run``, as usual;
* a loop runs in this thread: the coroutine runs to completion on a **private event loop in a worker
  thread** (a copy of the caller's context variables goes with it), while the calling thread waits.

What that implies: the caller's loop is paused until :func:`run` returns (its other tasks wait, as they
would for any blocking call), and objects bound to the caller's loop (an ``asyncio.Lock``, ``Event``,
``Queue`` or task created in a notebook's loop, a client session opened there) cannot be used inside the
coroutine: they would raise or wait forever. chatkit's own :class:`~chatkit.KeyedLock` works across
loops and threads, so a lock or a ``SessionManager`` made in a notebook can be used from ``run``.
In a notebook, prefer top-level ``await``; :func:`run` is for code that must stay synchronous (a plain
function called from a cell, a script, a sync callback).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, Generic, TypeVar

__all__ = ["run"]

T = TypeVar("T")

# How often the waiting thread checks whether its own task was asked to cancel (asyncio.run's first
# Ctrl+C cancels the main task instead of raising KeyboardInterrupt). Not a sleep: the wait returns as soon
# as the worker finishes.
_POLL_SECONDS = 0.1


def run(awaitable: Awaitable[T], /) -> T:
    """Run ``awaitable`` to completion from synchronous code and return its result.

    * No event loop running in this thread (a script, a test, a worker thread): ``asyncio.run``, so a
      fresh loop is created and closed.
    * A loop is running in this thread (Jupyter, IPython, a uvloop application): the awaitable runs on
      a new event loop (from the current event-loop policy) in a worker thread, and this thread waits
      for it. The running loop is not touched, so this works whatever its type (asyncio, uvloop, ...).

    Either way the loop that runs ``awaitable`` is closed afterwards (its leftover tasks cancelled, its
    async generators and default executor shut down), and the caller's context variables are visible
    inside. An exception raised by ``awaitable`` propagates unchanged. ``KeyboardInterrupt`` (Ctrl+C,
    "interrupt the kernel") while waiting cancels the awaitable, waits for its clean-up, and propagates.

    Args:
        awaitable: a coroutine, or any object with ``__await__``. Not an ``asyncio`` task or future:
            those belong to the loop that made them; await them there.

    Returns:
        What the awaitable returns.

    Raises:
        TypeError: ``awaitable`` is not awaitable (for example a coroutine *function*, not called), or it
            is an ``asyncio`` task or future.

    Example:
        >>> import asyncio, chatkit
        >>> async def answer():
        ...     await asyncio.sleep(0)
        ...     return 42
        >>> chatkit.run(answer())
        42
    """
    if not inspect.isawaitable(awaitable):
        hint = " (did you forget to call it?)" if inspect.iscoroutinefunction(awaitable) else ""
        raise TypeError(f"chatkit.run() needs an awaitable such as a coroutine, got {awaitable!r}{hint}")
    if asyncio.isfuture(awaitable):
        raise TypeError(
            f"chatkit.run() runs a coroutine on an event loop of its own; {awaitable!r} belongs to the loop "
            "that created it: await it in that loop instead"
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(awaitable))
    return _Worker(awaitable).result()


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


class _Worker(Generic[T]):
    """One :func:`run` call inside a running loop: a worker thread running ``asyncio.run`` on the awaitable."""

    def __init__(self, awaitable: Awaitable[T]) -> None:
        self._awaitable = awaitable
        self._guard = threading.Lock()  # orders "the awaitable started" against "cancel it"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False
        self._outcome: tuple[bool, Any] | None = None  # (ok, result or exception)
        # Set when the worker ends. Not Thread.join(): on Python 3.11 a join interrupted by Ctrl+C marks the
        # thread as stopped while it still runs (bpo-45274), so a second join would not wait for the clean-up.
        self._done = threading.Event()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._target,), name="chatkit.run", daemon=True)

    def result(self) -> T:
        caller = asyncio.current_task()
        cancels = caller.cancelling() if caller is not None else 0
        try:
            self._thread.start()
        except RuntimeError:  # no thread could be started: the awaitable will never be awaited
            _close(self._awaitable)
            raise
        except BaseException:  # Ctrl+C while the thread starts (the awaitable may already be running)
            self._stop()
            raise
        try:
            while not self._done.wait(_POLL_SECONDS):  # returns at once when the worker ends
                if caller is not None and caller.cancelling() > cancels:
                    # the caller's task was cancelled meanwhile (asyncio.run's first Ctrl+C does that)
                    raise asyncio.CancelledError()
        except BaseException:  # KeyboardInterrupt, or that cancellation
            self._stop()
            raise
        outcome = self._outcome
        if outcome is None:  # pragma: no cover - _target always sets it before _done
            raise RuntimeError("chatkit.run(): the worker thread ended without an outcome")
        ok, value = outcome
        if ok:
            return value  # type: ignore[no-any-return]
        try:
            raise value
        finally:
            del value, outcome  # no reference cycle through the traceback

    def _stop(self) -> None:
        """Cancel the awaitable and wait for its clean-up (a second Ctrl+C leaves it behind)."""
        with self._guard:
            self._cancelled = True
            started = self._loop is not None and self._task is not None
            if started:
                try:
                    self._loop.call_soon_threadsafe(self._task.cancel)  # type: ignore[union-attr]
                except RuntimeError:  # the loop just closed: the awaitable has finished
                    pass
        if started:
            self._done.wait()
        # else: the worker has not reached the awaitable; it will see _cancelled and close it

    def _target(self) -> None:
        try:
            self._outcome = (True, asyncio.run(self._main()))
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which re-raises it
            self._outcome = (False, exc)
        finally:
            self._done.set()

    async def _main(self) -> T:
        with self._guard:
            if self._cancelled:
                _close(self._awaitable)
                raise asyncio.CancelledError()
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
        return await self._awaitable


def _close(awaitable: Awaitable[Any]) -> None:
    if isinstance(awaitable, Coroutine):
        awaitable.close()
