"""Run a coroutine from synchronous code, whether or not an event loop is already running.

``asyncio.run`` refuses to start inside a running loop, which is exactly where a Jupyter cell, an
IPython shell or a Gradio callback lives. :func:`run` uses ``asyncio.run`` when no loop runs in this
thread, and only when one does, makes that loop re-entrant with ``nest_asyncio`` (imported on first
need) and runs the awaitable on it. In a notebook, prefer top-level ``await``; :func:`run` is for code
that must stay synchronous (a plain function called from a cell, a script, a sync callback).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["run"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def run(awaitable: Awaitable[T], /) -> T:
    """Run ``awaitable`` to completion from synchronous code and return its result.

    * No event loop running in this thread (a script, a test, a worker thread): ``asyncio.run``, so a
      fresh loop is created and closed.
    * A loop is running in this thread (Jupyter, IPython): that loop is patched with ``nest_asyncio``
      (only then, and once) and the awaitable runs on it, so it may use objects bound to that loop.

    Args:
        awaitable: a coroutine, task or future. A task or future must belong to the running loop.

    Returns:
        What the awaitable returns; its exception, if it raises, propagates unchanged.

    Raises:
        TypeError: ``awaitable`` is not awaitable (for example a coroutine *function*, not called).

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
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        return asyncio.run(_await(awaitable))
    _make_reentrant(loop)
    return loop.run_until_complete(_await(awaitable))


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _make_reentrant(loop: asyncio.AbstractEventLoop) -> None:
    """Patch the running ``loop`` with nest_asyncio (idempotent)."""
    if getattr(loop, "_nest_patched", False):
        return
    import nest_asyncio

    logger.debug("event loop %r already running: applying nest_asyncio", loop)
    nest_asyncio.apply(loop)

