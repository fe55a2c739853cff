"""What :class:`~chatkit.SessionManager` needs from its lock besides exclusion: busy checks, supersede requests.

A manager's turns and policies are decided in memory (its registry) as long as the lock is in-process. With a
lock shared by several processes, a turn running on one worker must be seen (policy ``reject``, ``ais_busy``)
and cancellable (``interrupt``, ``rollback``) from every other. A :class:`Coordinator`, chosen from the lock's
type by :func:`coordinator_for`, answers those questions:

* :class:`LocalCoordinator` (``KeyedLock``, any other lock of the protocol): nothing beyond the registry;
  every method is a no-op, so the in-process path costs what it did.
* :class:`RedisCoordinator` (``RedisKeyedLock``): the lock's queue in Redis is the session's queue across
  processes. A ``reject`` message asks the lock for the session *at once* (a request with a timeout of a
  microsecond: granted by its join, or withdrawn). An ``interrupt``/``rollback`` message, once its own
  ticket is in the session's queue, lists the tickets ahead of it and publishes them on the namespace's
  supersede channel; every worker's coordinator cancels the turns it runs or queues whose tickets are
  listed (so a turn that arrived after the message is never cancelled by it). Delivery is pub/sub: a
  worker cut off from Redis when the request is published misses it, and its turn runs to its end (as with
  ``enqueue``); the new message then runs after it.

The lock's fencing tokens are comparable across every writer of a session only for a cross-process lock
(``RedisKeyedLock``): :attr:`Coordinator.shared_tokens` says so, and the manager then fences its writes with
them (see :mod:`chatkit.sessions.fencing`); with an in-process lock its writes are fenced by compare-and-set
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import LockServerUnavailable
from ..locks import AsyncKeyLock, KeyedLock, LockRequest

__all__ = ["Coordinator", "LocalCoordinator", "RedisCoordinator", "coordinator_for", "AT_ONCE"]

logger = logging.getLogger(__name__)

AT_ONCE = 1e-6  # the lock timeout of a "reject" request on a cross-process lock: granted by its join, or refused

# Called with (session id, ticket ids, policy) for a supersede request from any worker.
OnSupersede = Callable[[str, frozenset[str], str], None]


class Coordinator(Protocol):
    """The cross-process side of a manager's policies (see the module docstring)."""

    distributed: bool  # the lock is shared by processes: reject and supersede go through it
    shared_tokens: bool  # the lock's fencing tokens order every writer of a session (fence writes with them)
    early_join: bool  # the lock joins its queue in the first step of the awaiting task

    async def ready(self) -> None:
        """Be ready to receive supersede requests (before this manager's first turn joins the lock)."""
        ...

    def supersede(self, session_id: str, request: LockRequest, policy: str) -> None:
        """Once ``request`` joined the session's queue, ask every worker to cancel the turns ahead of it."""
        ...

    async def ais_busy(self, session_id: str) -> bool:
        """Whether any process runs or queues a turn on the session (local turns are checked by the caller)."""
        ...

    def lost(self, request: LockRequest | None) -> bool:
        """Whether ``request`` lost its lock while holding it (its lease ran out)."""
        ...

    async def aclose(self) -> None:
        """Stop listening and close connections."""
        ...


class LocalCoordinator:
    """The coordinator of an in-process lock: the manager's registry knows everything, nothing to do.

    Example:
        >>> from chatkit import KeyedLock
        >>> coordinator_for(KeyedLock(), on_supersede=lambda *a: None)
        <LocalCoordinator early_join=True>
    """

    distributed = False
    shared_tokens = False

    def __init__(self, *, early_join: bool) -> None:
        self.early_join = early_join

    def __repr__(self) -> str:
        return f"<LocalCoordinator early_join={self.early_join}>"

    async def ready(self) -> None:
        return None

    def supersede(self, session_id: str, request: LockRequest, policy: str) -> None:
        return None

    async def ais_busy(self, session_id: str) -> bool:
        return False

    def lost(self, request: LockRequest | None) -> bool:
        return False

    async def aclose(self) -> None:
        return None


class RedisCoordinator:
    """The coordinator of a :class:`~chatkit.RedisKeyedLock`: busy checks and supersede requests via Redis.

    Supersede requests are JSON messages ``{"s": session, "p": policy, "t": [ticket, ...]}`` on the channel
    ``<lock namespace>:sessions:supersede``, which every manager using the lock's namespace subscribes to
    (its own connection, from :meth:`~chatkit.RedisKeyedLock.new_client`). One event loop, like the lock.

    Args:
        lock: the manager's lock.
        on_supersede: called on the event loop with ``(session id, tickets, policy)`` for every request.

    Raises:
        LockServerUnavailable: from :meth:`ready` when Redis cannot be reached.

    Example:
        >>> from chatkit import RedisKeyedLock
        >>> coordinator_for(RedisKeyedLock("redis://127.0.0.1:6379/0", namespace="app"), on_supersede=print)
        <RedisCoordinator channel='app:sessions:supersede' listening=False>
    """

    distributed = True
    shared_tokens = True
    early_join = True  # RedisKeyedLock sends its join in the first step of the awaiting task (call order)

    def __init__(self, lock: Any, *, on_supersede: OnSupersede) -> None:
        self._lock = lock
        self._on_supersede = on_supersede
        self.channel = f"{lock.namespace}:sessions:supersede"
        self._client: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        listening = self._reader is not None and not self._reader.done()
        return f"<RedisCoordinator channel={self.channel!r} listening={listening}>"

    # ------------------------------------------------------------------ listening

    async def ready(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._reader is not None and not self._reader.done():
            return  # the common case: no await, so a turn joins the lock's queue in its first step
        if self._loop is not None and self._loop is not loop:
            if not self._loop.is_closed():
                raise RuntimeError(
                    "this SessionManager's RedisKeyedLock is bound to the event loop that first used it; use the "
                    "manager (and its lock) on one event loop"
                )
            self._forget()
        starting = self._starting
        if starting is None or (starting.done() and (starting.cancelled() or starting.exception() is not None)):
            starting = self._starting = loop.create_task(self._start(), name="chatkit supersede listener start")
        await asyncio.shield(starting)

    def _forget(self) -> None:
        """Drop what belonged to a closed event loop (nothing of it can run any more)."""
        self._client = self._pubsub = self._reader = self._starting = None
        self._tasks = set()
        self._loop = None

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._client is None:
            self._client = self._lock.new_client()
        try:
            await self._subscribe()
        except Exception as exc:
            raise LockServerUnavailable(
                f"could not subscribe to {self.channel!r} on the lock's Redis server at {self._lock.url}: {exc}",
                url=self._lock.url,
            ) from exc
        self._reader = self._loop.create_task(self._read(), name="chatkit supersede listener")

    async def _subscribe(self) -> None:
        """Subscribe on a fresh connection and wait until Redis confirms it."""
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        pubsub = self._pubsub = self._client.pubsub()
        await pubsub.subscribe(self.channel)
        while True:
            msg = await pubsub.get_message(timeout=self._lock.socket_timeout)
            if msg is None:
                raise TimeoutError(f"no confirmation of the subscription to {self.channel!r}")
            if msg["type"] == "subscribe":
                return
            if msg["type"] == "message":
                self._deliver(msg["data"])

    async def _read(self) -> None:
        delay = 0.02
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection broke: subscribe again (requests sent meanwhile are missed)
                logger.warning("supersede listener on %s lost its connection (%s); subscribing again", self._lock.url, exc)
                while True:
                    await asyncio.sleep(delay)  # the server is down: try again, a bit later each time
                    try:
                        await self._subscribe()
                    except Exception:
                        delay = min(delay * 2, 1.0)
                        continue
                    delay = 0.02
                    break
                continue
            if msg is not None and msg["type"] == "message":
                self._deliver(msg["data"])

    def _deliver(self, data: str) -> None:
        try:
            request = json.loads(data)
            session_id, policy, tickets = str(request["s"]), str(request["p"]), frozenset(map(str, request["t"]))
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed supersede request on %r: %.200r", self.channel, data)
            return
        try:
            self._on_supersede(session_id, tickets, policy)
        except Exception:
            logger.exception("supersede request for session %r failed", session_id)

    # ------------------------------------------------------------------ requests

    def supersede(self, session_id: str, request: LockRequest, policy: str) -> None:
        task = asyncio.get_running_loop().create_task(self._announce(session_id, request, policy), name="chatkit supersede")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce(self, session_id: str, request: Any, policy: str) -> None:
        try:
            if not await request.joined():
                return  # it never reached the queue (failed, cancelled): nothing to supersede for it
            queue = await self._lock.tickets(session_id)
            if request.ticket not in queue:
                return  # it was granted and has released already: nothing was ahead of it
            ahead = queue[: queue.index(request.ticket)]
            if ahead:
                message = json.dumps({"s": session_id, "p": policy, "t": ahead})
                await self._client.publish(self.channel, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "could not ask the other workers to cancel the turns ahead on session %r (policy %r): %s; "
                "they run to their end and the new message waits for them",
                session_id,
                policy,
                exc,
            )

    async def ais_busy(self, session_id: str) -> bool:
        return bool(await self._lock.ais_busy(session_id))

    def lost(self, request: LockRequest | None) -> bool:
        return request is not None and getattr(request, "lost", None) is not None

    async def aclose(self) -> None:
        tasks = [t for t in (self._starting, self._reader, *self._tasks) if t is not None and not t.done()]
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            return  # bound to another (closed) loop: its tasks and connection are gone with it
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = self._reader = self._starting = None
        self._loop = None
        for closing in (pubsub, client):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing.aclose()


def coordinator_for(lock: AsyncKeyLock, *, on_supersede: OnSupersede) -> LocalCoordinator | RedisCoordinator:
    """The coordinator for ``lock``: a :class:`RedisCoordinator` for a ``RedisKeyedLock``, else local.

    Any other lock is treated as in-process (its tokens are not used to fence writes); ``early_join`` holds
    for ``KeyedLock`` only.
    """
    cls = type(lock)
    if cls.__name__ == "RedisKeyedLock" and cls.__module__ == "chatkit.locks.redis":  # without importing redis
        return RedisCoordinator(lock, on_supersede=on_supersede)
    return LocalCoordinator(early_join=isinstance(lock, KeyedLock))
