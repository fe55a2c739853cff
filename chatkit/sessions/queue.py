"""A session's queue: its turns and deletions in arrival order, and when each may join the lock's queue.

The lock serves its waiters in the order they joined its queue, so a session's turns keep their arrival
order if they join it in that order. A ``chat()`` turn joins in the step it arrives in; a ``stream()``
turn runs in a worker task of its own (so that it holds the lock, and commits, whatever its consumer's
pace), which starts a moment later. :class:`TurnQueue` makes every entry wait until each earlier entry of
its session holds the lock, or, for a :class:`~chatkit.KeyedLock` on the same event loop (which joins its
queue in the first step of the awaiting task), has started to join it.

Example:
    >>> import asyncio, threading
    >>> from chatkit.sessions.registry import InFlight
    >>> async def main():
    ...     queue, live = TurnQueue(threading.Lock(), early_join=True), InFlight()
    ...     loop = asyncio.get_running_loop()
    ...     first, second = (Entry("turn", "s", who, None, loop, 0.0, 0.0, live=live) for who in "AB")
    ...     live.entries += [first, second]
    ...     waiting = asyncio.create_task(queue.wait(second, deadline=None))
    ...     await asyncio.sleep(0)
    ...     before = waiting.done()
    ...     queue.progress(first, acquired=True)
    ...     await waiting
    ...     return before, waiting.done()
    >>> asyncio.run(main())
    (False, True)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig

from ..errors import LockTimeout
from .registry import WAITING, InFlight

__all__ = ["Entry", "ChunkBuffer", "TurnQueue", "RUNNING", "COMMITTING", "CLEANUP"]

# Entry states. A turn may be superseded (cancelled by a newer message) only while WAITING or RUNNING.
RUNNING, COMMITTING, CLEANUP = "running", "committing", "cleanup"  # and WAITING, DONE (registry)


class ChunkBuffer:
    """A stream's reply chunks, buffered between its worker (the turn) and its consumer (one event loop)."""

    __slots__ = ("chunks", "closed", "changed")

    def __init__(self) -> None:
        self.chunks: deque[str] = deque()
        self.closed = False
        self.changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<ChunkBuffer chunks={len(self.chunks)} closed={self.closed}>"

    def put(self, text: str) -> None:
        self.chunks.append(text)
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def get(self) -> str | None:
        """The next chunk; ``None`` once the turn has ended and every chunk was read."""
        while not self.chunks:
            if self.closed:
                return None
            self.changed.clear()
            await self.changed.wait()
        return self.chunks.popleft()


@dataclass(slots=True, eq=False)
class Entry:
    """One turn (or deletion) in flight: what it asks, who runs it, and how far it got."""

    kind: str  # "turn" or "delete"
    session_id: str
    who: str
    task: asyncio.Task[Any] | None  # the task to cancel to supersede it (a stream's worker)
    loop: asyncio.AbstractEventLoop
    t0: float  # perf_counter at arrival
    admitted: float  # the manager's clock at arrival
    text: str = ""
    create_if_missing: bool = False
    config: RunnableConfig | None = None
    buffer: ChunkBuffer | None = None
    live: InFlight | None = None
    state: str = WAITING
    joining: bool = False  # about to join the lock's queue
    acquired: bool = False
    wake: asyncio.Future[None] | None = None  # set while waiting for an earlier entry to join the lock
    superseded: str | None = None  # the policy that cancelled it
    kept_message: bool = False
    committed: bool = False
    waited: float = 0.0
    lock_timed_out: bool = False
    request: Any = None  # the lock request (a LockRequest) once made: its ticket names it to other workers
    at_once: bool = False  # policy "reject" on a cross-process lock: take the lock at once or be refused
    announce: str | None = None  # policy "interrupt"/"rollback" on a cross-process lock: tell the other workers


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class TurnQueue:
    """When each entry of a session may join the lock's queue (see the module docstring).

    Args:
        guard: the registry's lock, guarding every entry's fields and the ``InFlight`` lists.
        early_join: the lock joins its queue in the first step of the awaiting task (a ``KeyedLock``).
    """

    def __init__(self, guard: threading.Lock, *, early_join: bool) -> None:
        self._guard = guard
        self._early_join = early_join

    def __repr__(self) -> str:
        return f"<TurnQueue early_join={self._early_join}>"

    def may_join(self, entry: Entry) -> bool:
        """Guard held: whether every earlier entry of the session has joined the lock's queue."""
        assert entry.live is not None
        for other in entry.live.entries:
            if other is entry:
                return True
            if other.acquired or (other.joining and self._early_join and other.loop is entry.loop):
                continue
            return False
        return True

    async def wait(self, entry: Entry, deadline: float | None) -> None:
        """Wait until ``entry`` may join the lock's queue (until ``deadline``, on its loop's clock).

        Raises:
            LockTimeout: the deadline passed first.
        """
        loop = entry.loop
        while True:
            with self._guard:
                if self.may_join(entry):
                    return
                fut = entry.wake = loop.create_future()
            try:
                if deadline is None:
                    await fut
                else:
                    async with asyncio.timeout_at(deadline):
                        await fut
            except TimeoutError:
                waited = time.perf_counter() - entry.t0
                raise LockTimeout(
                    f"gave up waiting for {entry.session_id!r} after {waited:.3g} s", keys=(entry.session_id,), waited=waited
                ) from None
            finally:
                with self._guard:
                    entry.wake = None

    def progress(self, entry: Entry, *, joining: bool = False, acquired: bool = False) -> None:
        """``entry`` starts to join the lock's queue, or holds the lock: wake the session's waiting entries."""
        with self._guard:
            entry.joining = entry.joining or joining
            if acquired:
                entry.acquired = True
                entry.state = RUNNING
            live = entry.live
        if live is not None:
            self.wake(live)

    def wake(self, live: InFlight) -> None:
        """Tell every entry waiting in ``live`` to look again (guard NOT held), on its own event loop."""
        with self._guard:
            waiting = [e for e in live.entries if e.wake is not None]
        running = _running_loop()
        for entry in waiting:
            fut = entry.wake
            if fut is None:
                continue
            try:
                if entry.loop is running:
                    _set_result(fut)
                else:
                    entry.loop.call_soon_threadsafe(_set_result, fut)
            except RuntimeError:  # its event loop is closed: that caller is gone for good
                with self._guard:
                    if entry in live.entries:
                        live.entries.remove(entry)
                self.wake(live)
                return
