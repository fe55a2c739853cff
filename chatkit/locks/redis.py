"""A per-key lock shared by processes and hosts, on Redis: FIFO tickets, leases, fencing tokens, wake-ups.

Design, in invariants (the scripts' data model is in :mod:`chatkit.locks._redis_scripts`):

* Redis decides; a process only asks. Every step that reads and writes lock state (join the queues,
  look again, leave, release) is one Lua script, so steps never interleave. A request is a *ticket* in
  the queue of each of its keys; it holds them once it heads every one of those queues. Several keys
  are joined in one step, so queues are ordered consistently across keys: no deadlock.
* In one process, requests join the queues in the order they were made: the join scripts of one lock
  are sent down one pipeline in call order (a request never awaits anything before it is sent).
* Each ticket has a lease (a TTL on its record), renewed by one background task per lock while the
  request waits or holds. A ticket whose lease ran out is dead and is dropped when it reaches the head
  of a queue, so a SIGKILLed holder's keys pass on one lease after its last renewal.
* Waiters are woken, not polling: granting a ticket publishes on its process's channel (one
  subscription per lock). A waiter looks again on its own only when a ticket ahead of it may have died
  (after that ticket's remaining lease), or after the subscription reconnected (a message may have
  been lost meanwhile).
* A holder that cannot show a renewed lease, because the renewal said its ticket is gone or because
  no renewal succeeded within the lease, is *lost*: its task is cancelled and its ``async with`` raises
  :class:`~chatkit.LockLost`. The deadline is counted from when the last successful renewal was sent,
  so the holder gives up before the server lets anyone else in.
* Every grant carries a fencing token that grows with every acquisition of a key, across processes and
  Redis restarts (see the scripts' module).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .._optional import optional_import
from ..errors import LockLost, LockServerUnavailable
from . import _redis_scripts as scripts
from ._redis_request import HOLDING, WAITING, RedisLockRequest, describe
from ._observers import emit, with_observer, without_observer
from .keyed import KeyStatistics, LockEvent, LockStatistics, check_seconds

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = ["RedisKeyedLock", "RedisKeyStatus"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MIN_LEASE = 0.1
_RECHECK_MARGIN = 0.003  # seconds past a ticket's expiry before looking at it again


class _Unset:
    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


def _redis() -> Any:
    """The ``redis`` package, or a ModuleNotFoundError that names chatkit's ``distributed`` extra."""
    optional_import("redis.asyncio", extra="distributed", feature="RedisKeyedLock")
    return optional_import("redis", extra="distributed", feature="RedisKeyedLock")


def _shown(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe for messages and logs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _key_name(key: Hashable) -> str:
    if type(key) is str:
        return key
    if type(key) is int:
        return str(key)
    raise TypeError(
        f"RedisKeyedLock keys must be str or int (they become Redis key names), got {type(key).__name__} {key!r}"
    )


@dataclass(frozen=True, slots=True)
class RedisKeyStatus:
    """One key as Redis sees it, across every process (see :meth:`RedisKeyedLock.status`).

    Attributes:
        key: the key.
        held: whether some request holds it.
        holder: the holder's label (``None`` when not held).
        token: the holder's fencing token (``None`` when not held).
        queued: tickets in the key's queue, the holder's included (a dead process's ticket counts until it
            reaches the head).
        lease_left: seconds left on the holder's lease (``None`` when not held).
    """

    key: Hashable
    held: bool
    holder: str | None
    token: int | None
    queued: int
    lease_left: float | None


class _LocalKey:
    """What this process's requests do with one key: its local holder, local waiters, counters since busy."""

    __slots__ = ("holder", "waiting", "acquisitions", "timeouts", "cancellations", "rejections", "total_wait", "max_wait", "total_hold")

    def __init__(self) -> None:
        self.holder: RedisLockRequest | None = None
        self.waiting = 0
        self.acquisitions = 0
        self.timeouts = 0
        self.cancellations = 0
        self.rejections = 0
        self.total_wait = 0.0
        self.max_wait = 0.0
        self.total_hold = 0.0


class RedisKeyedLock:
    """A per-key lock across processes and hosts: ``async with lock(key):`` holds ``key`` everywhere.

    The :class:`~chatkit.KeyedLock` interface (and the :class:`~chatkit.locks.AsyncKeyLock` protocol) on
    Redis: same-key callers, in any process using the same Redis server and ``namespace``, run one at a
    time in the order their requests reached Redis; several keys are taken atomically without deadlock;
    ``timeout``, ``max_pending``, ``run``, statistics and observer events work as in ``KeyedLock``.

    * **Handoff**: a released key goes to the next ticket in the same server-side step, which publishes a
      wake-up to the waiter's process (about one round trip; no polling).
    * **Leases**: each request's ticket expires ``lease`` seconds after its last renewal; a background task
      renews every ``lease / 3``. If a holder's process dies, its keys pass on one lease later.
    * **Lost locks**: a holder whose lease is gone (its renewal found the ticket expired or the server
      emptied, or no renewal succeeded for ``0.9 * lease``: paused, cut off) is cancelled, and its
      ``async with`` raises :class:`~chatkit.LockLost`. Commit work through a fenced checkpoint saver
      (:mod:`chatkit.sessions.fencing`) with ``request.token`` so that a holder that lost its lock
      without noticing in time still cannot overwrite a newer holder's work.
    * **Fencing tokens**: ``request.token`` grows with every acquisition of a key, in every process (it is
      seeded from the Redis server's clock in microseconds, so it keeps growing after a restart).
    * **Redis down**: taking a lock raises :class:`~chatkit.LockServerUnavailable` naming the URL;
      holders and waiters that cannot renew give up at their lease deadline.

    Local and exact views: :meth:`is_busy`, :meth:`locked`, :meth:`waiters`, ``len(lock)`` and
    :meth:`statistics` answer at once for *this* lock object's requests (no round trip); :meth:`status`,
    :meth:`ais_busy` and :meth:`tickets` ask Redis about every process.

    One event loop: the lock binds to the loop that first uses it (its connections live there); make one
    per loop. Close it with ``await lock.aclose()`` or ``async with RedisKeyedLock(...) as lock:``.

    Deployment: one Redis server (or primary); on a Cluster give a hash-tagged namespace
    (``"{chatkit-locks}"``) so all its data shares one slot. Leases rely on the Redis server's clock and
    the process's monotonic clock running at about the same rate.

    Args:
        url: the Redis server, e.g. ``redis://127.0.0.1:6379/0`` (``rediss://`` for TLS).
        namespace: prefix of every Redis key and channel the lock uses; processes that share a namespace
            share the locks.
        lease: seconds a request stays valid without renewal (at least 0.1).
        timeout: default longest wait, in seconds (``None``: as long as it takes). Per-call override.
        max_pending: the most live waiters per key, counted across all processes; the next caller gets
            :class:`~chatkit.LockQueueFull` at once.
        observer: a callable receiving every :class:`~chatkit.LockEvent` of this lock object's requests.
        clock: the clock for statistics and events (``time.monotonic``).
        socket_timeout: seconds to wait for the server to connect or answer before
            :class:`~chatkit.LockServerUnavailable`.

    Raises:
        ModuleNotFoundError: the ``redis`` package is missing (``pip install "chatkit[distributed]"``).
        TypeError: a key other than ``str`` or ``int``, or a wrongly typed setting.
        ValueError: a bad URL, an empty namespace, a lease under 0.1 s, a non-positive timeout,
            ``max_pending < 1``.

    Example:
        >>> import asyncio
        >>> from chatkit import RedisKeyedLock
        >>> from chatkit.testing import redis_server
        >>> async def main(url):
        ...     async with RedisKeyedLock(url, lease=5) as lock:
        ...         first = lock("session-1")
        ...         async with first:
        ...             pass
        ...         second = lock("session-1", "session-2")
        ...         async with second:
        ...             return second.token > first.token, await lock.ais_busy("session-1")
        >>> with redis_server() as server:
        ...     asyncio.run(main(server.url))
        (True, True)
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "chatkit:lock",
        lease: float = 10.0,
        timeout: float | None = None,
        max_pending: int | None = None,
        observer: Callable[[LockEvent], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        socket_timeout: float = 5.0,
    ) -> None:
        redis = _redis()
        if not isinstance(url, str):
            raise TypeError(f"url must be a Redis URL string, got {url!r}")
        try:
            redis.asyncio.connection.parse_url(url)
        except ValueError as exc:
            raise ValueError(f"not a Redis URL: {_shown(url)!r} ({exc})") from None
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        lease_s = check_seconds("lease", lease)
        if lease_s is None or lease_s < _MIN_LEASE:
            raise ValueError(f"lease must be at least {_MIN_LEASE} s (and finite), got {lease!r}")
        self._timeout = check_seconds("timeout", timeout)
        if max_pending is not None:
            if isinstance(max_pending, bool) or not isinstance(max_pending, int):
                raise TypeError(f"max_pending must be an int or None, got {max_pending!r}")
            if max_pending < 1:
                raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        sock = check_seconds("socket_timeout", socket_timeout)
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._url = url
        self.url = _shown(url)
        self._namespace = namespace
        self._lease = lease_s
        self._lease_ms = int(lease_s * 1000)
        self._max_pending = max_pending
        self._socket_timeout = sock
        self._clock = clock
        self._observers: tuple[Callable[[LockEvent], object], ...] = ()
        if observer is not None:
            self.add_observer(observer)
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        )
        self._no_script = redis.exceptions.NoScriptError
        self._id = secrets.token_hex(8)
        self._channel = f"{namespace}:w:{self._id}"
        self._seq = itertools.count(1)
        # live tickets of this lock object (joined the queues, not yet released or withdrawn)
        self._tickets: dict[str, RedisLockRequest] = {}
        # keys this lock object's requests hold or wait for; absent when none does
        self._local: dict[str, _LocalKey] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Redis | None = None
        self._sub_client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._starting: asyncio.Task[None] | None = None
        self._started = False
        self._tasks: list[asyncio.Task[None]] = []
        self._batch: list[tuple[RedisLockRequest, asyncio.Future[list[Any]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._renew_now: asyncio.Event | None = None
        self._last_error: BaseException | None = None
        self._outage_logged = False
        # lock-wide totals for this lock object
        self._acquisitions = 0
        self._timeouts = 0
        self._cancellations = 0
        self._rejections = 0
        self._losses = 0
        self._total_wait = 0.0
        self._max_wait = 0.0
        self._total_hold = 0.0

    # ----------------------------------------------------------------- public API

    @property
    def namespace(self) -> str:
        """The prefix of the lock's Redis keys and channels."""
        return self._namespace

    @property
    def lease(self) -> float:
        """Seconds a request stays valid without renewal."""
        return self._lease

    @property
    def socket_timeout(self) -> float | None:
        """Seconds to wait for the server to connect or answer."""
        return self._socket_timeout

    def __call__(
        self, key: Hashable = _UNSET, /, *more: Hashable, timeout: float | None = _UNSET, label: str | None = None
    ) -> RedisLockRequest:
        """Return an async context manager that holds the keys, in every process, for the block.

        Several keys are de-duplicated (``1`` and ``"1"`` name the same key) and taken together, atomically.
        """
        given = more if key is _UNSET else (key, *more)
        if not given:
            raise TypeError("give at least one key, e.g. lock('session-1')")
        names: dict[str, Hashable] = {}
        for k in given:
            names.setdefault(_key_name(k), k)
        if timeout is _UNSET:
            timeout = self._timeout
        else:
            timeout = check_seconds("timeout", timeout)
        if label is not None and type(label) is not str:
            raise TypeError(f"label must be a str or None, got {label!r}")
        return RedisLockRequest(self, tuple(names.values()), tuple(names), timeout, label)

    async def run(
        self,
        keys: Hashable | list[Hashable],
        fn: Callable[..., T | Awaitable[T]],
        *args: Any,
        timeout: float | None = _UNSET,
        label: str | None = None,
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` holding ``keys`` and return its result (awaited if awaitable).

        ``keys`` is one key, or a ``list`` of keys.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        key_tuple = tuple(keys) if isinstance(keys, list) else (keys,)
        async with self(*key_tuple, timeout=timeout, label=label):
            result = fn(*args, **kwargs)
            if isinstance(result, Awaitable):
                return await result  # type: ignore[no-any-return]
            return result

    def is_busy(self, key: Hashable = _UNSET) -> bool:
        """Local view: whether this lock object's requests hold or wait for ``key`` (or any key).

        Other processes are not asked; :meth:`ais_busy` does.
        """
        if key is _UNSET:
            return bool(self._local)
        return _key_name(key) in self._local

    async def ais_busy(self, key: Hashable) -> bool:
        """Whether any process holds or waits for ``key`` (one round trip to Redis).

        Raises:
            LockServerUnavailable: Redis could not be reached.
        """
        return (await self.status(key)).queued > 0

    async def status(self, key: Hashable) -> RedisKeyStatus:
        """The key as Redis sees it now, across every process (one round trip).

        Raises:
            LockServerUnavailable: Redis could not be reached.
        """
        name = _key_name(key)
        await self._ensure_started()
        reply = await self._call(scripts.STATUS, [f"{self._namespace}:q:{name}"], [self._namespace, name], f"the status of key {key!r}")
        if int(reply[0]) == 0:
            return RedisKeyStatus(key, False, None, None, 0, None)
        queued, label, token, pttl = int(reply[0]), reply[1], reply[2], int(reply[3])
        if token == "":
            return RedisKeyStatus(key, False, None, None, queued, None)
        return RedisKeyStatus(key, True, label, int(token), queued, max(pttl, 0) / 1000)

    async def tickets(self, key: Hashable) -> list[str]:
        """The ticket ids in ``key``'s queue in Redis, first to last, across every process (one round trip).

        The first is the holder's once it is granted; a dead process's ticket is listed until it reaches
        the head. ``request.ticket`` is a request's own, once ``await request.joined()`` said it joined.

        Raises:
            LockServerUnavailable: Redis could not be reached.
        """
        name = _key_name(key)
        await self._ensure_started()
        assert self._client is not None
        try:
            return list(await self._client.lrange(f"{self._namespace}:q:{name}", 0, -1))
        except self._errors as exc:
            raise self._unavailable(exc, f"list the queue of key {key!r}") from exc

    def new_client(self) -> Redis:
        """A new redis-py asyncio client to this lock's server (same URL and socket timeout, ``str`` replies).

        For work that goes with the lock, such as :class:`~chatkit.SessionManager`'s cross-process
        signalling; the caller closes it (``await client.aclose()``).
        """
        return self._make_client(0)

    def locked(self, key: Hashable) -> bool:
        """Local view: whether one of this lock object's requests holds ``key``."""
        st = self._local.get(_key_name(key))
        return st is not None and st.holder is not None

    def waiters(self, key: Hashable) -> int:
        """Local view: how many of this lock object's requests wait for ``key``."""
        st = self._local.get(_key_name(key))
        return 0 if st is None else st.waiting

    def __len__(self) -> int:
        """Local view: the number of keys this lock object's requests hold or wait for."""
        return len(self._local)

    def _census(self) -> tuple[int, int, int]:
        held = sum(st.holder is not None for st in self._local.values())
        waiting = sum(st.waiting for st in self._local.values())
        return len(self._local), held, waiting

    def __repr__(self) -> str:
        keys, held, waiting = self._census()
        state = "connected" if self._started else "not connected"
        return (
            f"<RedisKeyedLock {self.url} namespace={self._namespace!r} {state} lease={self._lease:g}s keys={keys}"
            f" held={held} waiting={waiting} timeout={self._timeout} max_pending={self._max_pending}"
            f" acquisitions={self._acquisitions} lost={self._losses}>"
        )

    @overload
    def statistics(self) -> LockStatistics: ...
    @overload
    def statistics(self, key: Hashable) -> KeyStatistics: ...
    def statistics(self, key: Hashable = _UNSET) -> LockStatistics | KeyStatistics:
        """Local view: this lock object's totals (no argument), or the local state and counters of a key.

        A key's counters start again each time it becomes busy here; lock-wide totals never reset.
        """
        if key is _UNSET:
            keys, held, waiting = self._census()
            return LockStatistics(
                keys=keys,
                held=held,
                waiters=waiting,
                acquisitions=self._acquisitions,
                timeouts=self._timeouts,
                cancellations=self._cancellations,
                rejections=self._rejections,
                total_wait=self._total_wait,
                max_wait=self._max_wait,
                total_hold=self._total_hold,
            )
        st = self._local.get(_key_name(key))
        if st is None:
            return KeyStatistics(key, False, None, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)
        return KeyStatistics(
            key=key,
            held=st.holder is not None,
            holder=None if st.holder is None else st.holder.label_text,
            waiters=st.waiting,
            acquisitions=st.acquisitions,
            timeouts=st.timeouts,
            cancellations=st.cancellations,
            rejections=st.rejections,
            total_wait=st.total_wait,
            max_wait=st.max_wait,
            total_hold=st.total_hold,
        )

    def add_observer(self, observer: Callable[[LockEvent], object]) -> None:
        """Call ``observer(event)`` for every :class:`~chatkit.LockEvent` of this lock object's requests.

        Observers run on the event loop, in the task whose request the event is about (or in the lock's
        background task for a lost holder); an exception in an observer is logged and otherwise ignored.
        """
        self._observers = with_observer(self._observers, observer)

    def remove_observer(self, observer: Callable[[LockEvent], object]) -> None:
        """Stop calling ``observer``.

        Raises:
            ValueError: it was not added.
        """
        self._observers = without_observer(self._observers, observer)

    async def __aenter__(self) -> RedisKeyedLock:
        await self._ensure_started()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the background tasks and close the connections (the lock may be used again later).

        Requests still waiting fail with :class:`~chatkit.LockLost`; blocks still holding are cancelled
        (their keys pass on when their leases run out). Close the lock after its blocks ended.
        """
        starting, self._starting = self._starting, None
        tasks = [t for t in (starting, self._flusher, *self._tasks) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._socket_timeout)
        for req in list(self._tickets.values()):
            self._lose(req, "the lock was closed", None)
        for req, fut in self._batch:
            if not fut.done():
                fut.set_exception(self._unavailable(RuntimeError("the lock was closed"), f"lock {describe(req.keys)}"))
        self._batch = []
        self._tasks = []
        self._flusher = None
        self._started = False
        pubsub, client, sub = self._pubsub, self._client, self._sub_client
        self._pubsub = self._client = self._sub_client = None
        self._loop = None
        for closing in (pubsub, client, sub):
            if closing is not None:
                try:
                    async with asyncio.timeout(self._socket_timeout):
                        await closing.aclose()
                except self._errors:  # already broken (or not answering): nothing to close politely
                    pass

    # ----------------------------------------------------------------- connection and background tasks

    async def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(
                    "this RedisKeyedLock is bound to the event loop that first used it; make one lock per event "
                    "loop (or await lock.aclose() before using it on another loop)"
                )
            self._reset_for(loop)
        if self._started:
            return
        if self._starting is None:
            self._starting = loop.create_task(self._start(), name="RedisKeyedLock start")
        starting = self._starting
        try:
            await asyncio.shield(starting)
        except BaseException:
            if starting.done() and self._starting is starting:
                self._starting = None  # it failed: the next caller tries again
            raise

    def _reset_for(self, loop: asyncio.AbstractEventLoop) -> None:
        """Forget a closed loop's connections and tasks (nothing of them can run any more)."""
        self._loop = loop
        self._started = False
        self._starting = None
        self._tasks = []
        self._batch = []
        self._flusher = None
        self._tickets.clear()
        self._local.clear()
        self._client = self._sub_client = self._pubsub = None

    def _make_client(self, retries: int) -> Redis:
        redis = _redis()
        Retry = optional_import("redis.asyncio.retry", extra="distributed", feature="RedisKeyedLock").Retry
        NoBackoff = optional_import("redis.backoff", extra="distributed", feature="RedisKeyedLock").NoBackoff

        return redis.asyncio.Redis.from_url(  # type: ignore[no-any-return]
            self._url,
            decode_responses=True,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_timeout,
            retry=Retry(NoBackoff(), retries),
            client_name=f"chatkit-lock-{self._id}",
        )

    async def _start(self) -> None:
        # Commands retry once on a broken connection (every script is idempotent per ticket); the
        # subscription does not, so that a reconnect is noticed and followed by a re-check.
        self._client = self._make_client(1)
        self._sub_client = self._make_client(0)
        try:
            await self._subscribe()
            pipe = self._client.pipeline(transaction=False)
            for script in scripts.ALL:
                pipe.script_load(script.text)
            await pipe.execute()
        except BaseException as exc:
            clients = (self._pubsub, self._client, self._sub_client)
            self._pubsub = self._client = self._sub_client = None
            for c in clients:
                if c is not None:
                    with contextlib.suppress(*self._errors):
                        await c.aclose()
            if isinstance(exc, self._errors):
                raise self._unavailable(exc, "connect") from exc
            raise
        self._renew_now = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_wakeups(), name="RedisKeyedLock wake-ups"),
            loop.create_task(self._renew_leases(), name="RedisKeyedLock lease renewal"),
        ]
        self._started = True

    async def _subscribe(self) -> None:
        """Subscribe to this lock's wake-up channel and wait until Redis confirms it."""
        assert self._sub_client is not None
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except self._errors:
                pass
        pubsub = self._pubsub = self._sub_client.pubsub()
        await pubsub.subscribe(self._channel)
        while True:
            msg = await pubsub.get_message(timeout=self._socket_timeout)
            if msg is None:
                raise TimeoutError(f"no confirmation of the subscription to {self._channel!r}")
            if msg["type"] == "subscribe":
                return
            if msg["type"] == "message":
                self._on_wakeup(msg["data"])

    async def _read_wakeups(self) -> None:
        """Background: route grant messages to their waiters; re-subscribe (and re-check) after a break."""
        while True:
            assert self._pubsub is not None
            try:
                msg = await self._pubsub.get_message(timeout=None)
            except Exception as exc:  # broken connection (or a confused client): subscribe afresh
                if not isinstance(exc, self._errors):
                    logger.exception("RedisKeyedLock: unexpected error reading wake-ups from %s", self.url)
                self._note_outage(exc)
                await self._resubscribe()
                continue
            if msg is not None and msg["type"] == "message":
                self._on_wakeup(msg["data"])

    async def _resubscribe(self) -> None:
        delay = 0.02
        while True:
            try:
                await self._subscribe()
            except Exception as exc:
                self._note_outage(exc)
                await asyncio.sleep(delay)  # the server is down: try again, a bit later each time
                delay = min(delay * 2, self._lease / 4)
                continue
            break
        logger.info("RedisKeyedLock: subscription to %s restored; re-checking %d request(s)", self.url, len(self._tickets))
        # A grant published while the subscription was down is lost: every waiter looks again, and every
        # ticket is renewed now (which also finds out whether the server kept them).
        for req in list(self._tickets.values()):
            if req.state == WAITING:
                req.recheck_due = True
                req.wake()
        assert self._renew_now is not None
        self._renew_now.set()

    def _note_outage(self, exc: BaseException) -> None:
        self._last_error = exc
        if not self._outage_logged:
            self._outage_logged = True
            logger.warning("RedisKeyedLock: lost the connection to %s: %s", self.url, exc)

    async def _renew_leases(self) -> None:
        """Background: renew the lease of every live ticket every ``lease / 3`` (and at once when asked)."""
        assert self._renew_now is not None and self._loop is not None
        interval = self._lease / 3
        loop = self._loop
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._renew_now.wait()
            except TimeoutError:
                pass
            self._renew_now.clear()
            live = [r for r in self._tickets.values() if r.confirmed]
            if not live:
                continue
            sent = loop.time()
            assert self._client is not None
            try:
                pipe = self._client.pipeline(transaction=False)
                for r in live:
                    pipe.pexpire(r.record, self._lease_ms)
                alive = await pipe.execute()
            except Exception as exc:  # unreachable: holders give up at their lease deadline
                if not isinstance(exc, self._errors):
                    logger.exception("RedisKeyedLock: unexpected error renewing leases on %s", self.url)
                self._note_outage(exc)
                continue
            if self._outage_logged:
                self._outage_logged = False
                logger.warning("RedisKeyedLock: %s answers again", self.url)
            self._last_error = None
            for r, ok in zip(live, alive):
                if self._tickets.get(r.ticket) is not r:
                    continue  # released or withdrawn meanwhile
                if ok:
                    r.extend(sent)
                else:
                    self._lose(r, "gone", None)
            self._renewed(len(live))

    def _renewed(self, count: int) -> None:
        """Called after each successful renewal round (a hook for tests)."""

    def _on_wakeup(self, data: str) -> None:
        ticket, _, token = data.partition(" ")
        req = self._tickets.get(ticket)
        if req is not None and req.state == WAITING and req.granted_token is None:
            req.granted_token = int(token)
            req.wake()

    # ----------------------------------------------------------------- calls to Redis

    def _unavailable(self, exc: BaseException, doing: str) -> LockServerUnavailable:
        err = LockServerUnavailable(
            f"could not reach the lock's Redis server at {self.url} to {doing}: {exc}", url=self.url
        )
        err.__cause__ = exc
        return err

    async def _call(self, script: scripts.Script, keys: list[str], args: list[Any], doing: str) -> Any:
        client = self._client
        if client is None:
            raise self._unavailable(RuntimeError("the lock was closed"), doing)
        try:
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)
            except self._no_script:  # the server restarted (or flushed its scripts)
                await client.script_load(script.text)
                return await client.evalsha(script.sha, len(keys), *keys, *args)
        except self._errors as exc:
            raise self._unavailable(exc, doing) from exc

    def _enqueue(self, req: RedisLockRequest) -> asyncio.Future[list[Any]]:
        """Send ``req``'s join script in call order (batched down one pipeline); its reply arrives later."""
        assert self._loop is not None
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        self._batch.append((req, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = self._loop.create_task(self._flush(), name="RedisKeyedLock enqueue")
        return fut

    def _acquire_args(self, req: RedisLockRequest) -> tuple[list[str], list[Any]]:
        ns = self._namespace
        keys = [req.record, *(f"{ns}:q:{n}" for n in req.names)]
        args = [ns, req.ticket, self._channel, req.label_text, self._lease_ms, self._max_pending or 0, *req.names]
        return keys, args

    async def _flush(self) -> None:
        assert self._client is not None and self._loop is not None
        while self._batch:
            batch, self._batch = self._batch, []
            sent = self._loop.time()
            try:
                replies = await self._send_batch([self._acquire_args(req) for req, _ in batch])
            except self._errors as exc:
                for req, fut in batch:
                    if not fut.done():
                        fut.set_exception(self._unavailable(exc, f"lock {describe(req.keys)}"))
                continue
            except BaseException as exc:  # cancelled (aclose): nobody will answer these
                for req, fut in batch:
                    if not fut.done():
                        fut.set_exception(self._unavailable(RuntimeError("the lock was closed"), f"lock {describe(req.keys)}"))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (req, fut), reply in zip(batch, replies):
                req.sent = sent
                if fut.done():
                    continue
                if isinstance(reply, BaseException):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    async def _send_batch(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(scripts.ACQUIRE.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, self._no_script) for r in replies):
            await self._client.script_load(scripts.ACQUIRE.text)  # the server restarted: every join is idempotent
            return await self._send_batch(calls)
        return replies

    # ----------------------------------------------------------------- bookkeeping

    def _emit(self, events: list[LockEvent]) -> None:
        emit(self._observers, events, self)

    def _local_enter(self, req: RedisLockRequest) -> None:
        for n in req.names:
            st = self._local.get(n)
            if st is None:
                st = self._local[n] = _LocalKey()
            st.waiting += 1

    def _local_leave(self, req: RedisLockRequest, outcome: str, now: float) -> None:
        """``req`` stopped waiting: ``outcome`` is acquired, timed_out, cancelled, rejected or failed."""
        waited = now - req.t_request
        if outcome == "acquired":
            self._acquisitions += 1
            self._total_wait += waited
            self._max_wait = max(self._max_wait, waited)
        elif outcome == "timed_out":
            self._timeouts += 1
        elif outcome == "cancelled":
            self._cancellations += 1
        elif outcome == "rejected":
            self._rejections += 1
        for n in req.names:
            st = self._local[n]
            st.waiting -= 1
            if outcome == "acquired":
                st.holder = req
                st.acquisitions += 1
                st.total_wait += waited
                st.max_wait = max(st.max_wait, waited)
            elif outcome == "timed_out":
                st.timeouts += 1
            elif outcome == "cancelled":
                st.cancellations += 1
            elif outcome == "rejected":
                st.rejections += 1
            if st.holder is None and st.waiting == 0:
                del self._local[n]

    def _local_release(self, req: RedisLockRequest, now: float) -> float:
        held = now - req.t_acquired
        self._total_hold += held
        for n in req.names:
            st = self._local.get(n)
            if st is None or st.holder is not req:
                continue
            st.holder = None
            st.total_hold += held
            if st.waiting == 0:
                del self._local[n]
        return held

    def _lose(self, req: RedisLockRequest, why: str, cause: BaseException | None) -> None:
        """``req`` can no longer count on its ticket: fail it (waiting) or cancel its block (holding)."""
        if self._tickets.get(req.ticket) is req:
            del self._tickets[req.ticket]
        req.cancel_watchdog()
        outage = self._last_error if cause is None else cause
        if why == "gone":
            reason = (
                f"Redis at {self.url} no longer has its ticket: its lease of {self._lease:g} s ran out before it was "
                "renewed (the process was paused or cut off), or the server restarted or lost its data"
            )
        elif why == "expired":
            reason = f"no renewal of its lease of {self._lease:g} s succeeded in time"
            if outage is not None:
                reason += f" (Redis at {self.url} is unreachable: {outage})"
            else:
                reason += f" (the process was paused or too busy to renew it; Redis at {self.url})"
        else:
            reason = f"{why} (Redis at {self.url})"
        if req.state == WAITING:
            if why == "expired" and outage is not None:
                err: BaseException = LockServerUnavailable(
                    f"gave up waiting for {describe(req.keys)}: {reason}", url=self.url
                )
            else:
                err = LockLost(
                    f"lost the place of {req.label_text!r} in the queue for {describe(req.keys)}: {reason}",
                    keys=req.keys,
                    url=self.url,
                    held=False,
                )
            err.__cause__ = outage
            req.error = err
            req.wake()
        elif req.state == HOLDING and req.lost is None:
            self._losses += 1
            err = LockLost(
                f"{req.label_text!r} lost the lock on {describe(req.keys)} (token {req.token}): {reason}; another "
                "caller may hold it now, so its block was cancelled",
                keys=req.keys,
                url=self.url,
                held=True,
            )
            err.__cause__ = outage
            req.lost = err
            logger.warning("RedisKeyedLock: %s", err)
            owner = req.owner
            if owner is not None and not owner.done():
                req.cancelled_by_lock = True
                owner.cancel(str(err))

    def _abandon(self, req: RedisLockRequest) -> None:
        """Best effort, in the background: take a failed request's ticket out of Redis at once."""
        if not req.confirmed or self._loop is None or self._client is None:
            return

        async def withdraw() -> None:
            try:
                reply = await self._call(scripts.WITHDRAW, [req.record], [self._namespace, req.ticket], "withdraw")
                if int(reply[0]) == 1:
                    await self._call(scripts.RELEASE, [req.record], [self._namespace, req.ticket, reply[1]], "release")
            except LockServerUnavailable:
                pass  # its lease runs out instead

        task = self._loop.create_task(withdraw(), name="RedisKeyedLock withdraw")
        self._tasks = [t for t in self._tasks if not t.done()] + [task]

    def _recheck_delay(self, pttl_ms: int) -> float:
        """When to look again: just after the first ticket ahead of us may expire (at most one lease)."""
        if pttl_ms < 0:
            return self._lease
        return min(pttl_ms / 1000 + _RECHECK_MARGIN, self._lease)
