"""A store's own bounded thread pools, so readers never queue behind embedding or merging work.

* the *write pool* embeds (and splits and validates) what writers add, and runs the merges writers owe
  (the hard segment cap, or ``compaction="inline"``);
* the *read pool* runs the async searches (the query embedding and the faiss search).

Neither is the event loop's default executor, which the application keeps for itself. Threads start on
first use and stop in :meth:`WorkerPool.close`. A job cancelled because the pool closed reports a
``RuntimeError`` naming the store as closed, never a bare ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["WorkerPool", "closed_error"]

T = TypeVar("T")


def closed_error(what: str) -> RuntimeError:
    """The error for work refused (or dropped) because the store was closed."""
    return RuntimeError(f"the CowVectorStore is closed: {what} was refused (reads still work on its last snapshot)")


def _transfer(job: Future[Any], waiter: asyncio.Future[Any], what: str) -> None:
    if waiter.done():
        return
    if job.cancelled():
        waiter.set_exception(closed_error(what))
        return
    exc = job.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(job.result())


class WorkerPool:
    """A lazily started ``ThreadPoolExecutor`` of at most ``workers`` threads named ``name-N``.

    Example:
        >>> pool = WorkerPool("demo", workers=2)
        >>> pool.run(sum, [1, 2, 3], what="a sum")
        6
        >>> pool.close(); pool
        <WorkerPool demo workers=2 closed>
    """

    def __init__(self, name: str, *, workers: int) -> None:
        self._name = name
        self._workers = workers
        self._guard = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._executor is not None else "idle"
        return f"<WorkerPool {self._name} workers={self._workers} {state}>"

    @property
    def workers(self) -> int:
        """The most threads this pool runs at once."""
        return self._workers

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def submit(self, fn: Callable[..., T], /, *args: Any, what: str = "the job", **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)`` (in a copy of the caller's context).

        Raises:
            RuntimeError: the pool is closed.
        """
        ctx = contextvars.copy_context()
        with self._guard:
            if self._closed:
                raise closed_error(what)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix=self._name)
            return self._executor.submit(ctx.run, fn, *args, **kwargs)

    def run(self, fn: Callable[..., T], /, *args: Any, what: str = "the job", **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the pool; this thread blocks until it is done."""
        return self.result(self.submit(fn, *args, what=what, **kwargs), what)

    async def arun(self, fn: Callable[..., T], /, *args: Any, what: str = "the job", **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the pool, awaited; cancelling the caller cancels the job if it has
        not started (a started job runs to its end and its result is dropped)."""
        return await self.wait(self.submit(fn, *args, what=what, **kwargs), what, cancel_job=True)

    @staticmethod
    def result(job: Future[T], what: str) -> T:
        """``job.result()``, with a job dropped by :meth:`close` reported as the store being closed."""
        try:
            return job.result()
        except FutureCancelled:
            raise closed_error(what) from None

    @staticmethod
    async def wait(job: Future[T], what: str, *, cancel_job: bool) -> T:
        """Await a job of this pool from any event loop.

        ``cancel_job``: whether cancelling the awaiting task also cancels the job (if it has not started).
        A merge job is never cancelled that way: it has segments marked busy, and must run (or be dropped
        by :meth:`close`, whose done-callback releases them).
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()

        def done(finished: Future[T]) -> None:  # runs in whichever thread finished (or cancelled) the job
            try:  # (``finished``, not ``job``: a closure over the job would be a cycle keeping its result)
                loop.call_soon_threadsafe(_transfer, finished, waiter, what)
            except RuntimeError:  # the waiter's loop is closed: nobody is left to tell
                pass

        job.add_done_callback(done)
        try:
            return await waiter
        except asyncio.CancelledError:
            if cancel_job:
                job.cancel()
            raise

    async def arun_read(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """:meth:`arun` for a search; once the pool is closed, ``asyncio.to_thread`` (a closed store still
        serves reads)."""
        try:
            job = self.submit(fn, *args, what="a search", **kwargs)
        except RuntimeError:
            if not self._closed:
                raise  # pragma: no cover - submit raises only when closed
            return await asyncio.to_thread(fn, *args, **kwargs)
        return await self.wait(job, "a search", cancel_job=True)

    def close(self, *, cancel_queued: bool = True) -> None:
        """Refuse new jobs, drop queued ones (unless ``cancel_queued`` is false: then they run), wait for
        running ones; every thread of the pool has ended when this returns. Idempotent."""
        with self._guard:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=cancel_queued)
