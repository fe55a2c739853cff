"""Who is asking for a lock: the asyncio task running the caller (or, for ``lock.sync()``, its thread).

A lock request is owned by the task that entered it, as in anyio and trio; re-entry means that task asking
again, whatever helper or nested event loop it asks from. Finding the current task must be cheap, since the
uncontended path of :class:`~chatkit.KeyedLock` does it on every acquisition, and ``asyncio.current_task()``
is not on Python 3.11: it is a Python function calling ``get_running_loop()``, which makes a ``getpid()``
system call each time (about 370 ns on the benchmark machine, two thirds of a whole uncontended
``asyncio.Lock`` acquire and release).

So each thread remembers the event loop it last saw running (:data:`cache`, a ``threading.local``), and the
lock reads that loop's current task from asyncio's own table of running tasks
(``asyncio.tasks._current_tasks``, loop -> the task being stepped). The answer is trusted only when it must
be the caller's task:

* the remembered loop runs in *this* thread right now (``loop._thread_id``): a loop that stopped, or now
  runs in another thread, fails the check (a task stepped there is not the caller);
* no other loop can be running nested inside it: stock asyncio refuses to run a loop inside another, and
  a patched asyncio that allows it (nest_asyncio replaces ``asyncio.Task``) turns the shortcut off;
* a task is being stepped at all (code run from a plain callback has no task).

Otherwise :func:`current_owner` answers the accurate way and refreshes the thread's memory.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

__all__ = ["cache", "current_owner", "current_tasks", "plain_task_type", "owner_name"]

#: Per thread: ``loop_ident = (loop, loop._thread_id)``, the loop last seen running in this thread.
cache = threading.local()

#: asyncio's table loop -> task being stepped (``None`` if this Python has none: always the accurate path).
current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = getattr(asyncio.tasks, "_current_tasks", None)

try:  # the C task type; while ``asyncio.Task`` is still it, asyncio is unpatched (no nested loops)
    from _asyncio import Task as plain_task_type
except ImportError:  # pragma: no cover - a Python without the C accelerator: the shortcut stays off
    plain_task_type = None  # type: ignore[assignment, misc]

_get_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident


def current_owner(fallback: object) -> object:
    """The task running the caller, found the accurate way, or ``fallback`` outside any task.

    When the shortcut described in the module docstring would have been right, remember the loop for it.
    """
    loop = _get_running_loop()
    if loop is None:
        return fallback
    task = asyncio.current_task(loop)
    if task is None:
        return fallback
    if current_tasks is not None and isinstance(loop, asyncio.BaseEventLoop):
        # The loop's own thread-id object, so the check is an identity test ("is"): it fails safely when the
        # loop stops, runs in another thread, or is restarted (a new id object: one more miss, no harm).
        thread_id = loop._thread_id  # type: ignore[attr-defined]
        if thread_id == _get_ident():
            cache.loop_ident = (loop, thread_id)
    return task


def owner_name(owner: object) -> str:
    """A task's or thread's name, for labels and error messages."""
    if isinstance(owner, asyncio.Task):
        return owner.get_name()
    if isinstance(owner, threading.Thread):
        return owner.name
    return "a caller outside any task"
