"""A per-key lock for asyncio tasks and threads: FIFO handoff, timeouts, a pending limit, many keys at once.

Design, in invariants:

* One ``threading.Lock`` (the *guard*) protects all state, so callers on different event loops and plain
  threads share one lock. Nobody ever awaits or runs user code while holding the guard.
* ``_table`` has an entry for a key only while someone holds or waits for it: the holding request itself
  while the key is uncontended (the fast path allocates nothing else), a :class:`_KeyState` once someone
  waits. The entry is deleted the moment the key goes idle, so a lock that saw a million keys keeps none.
* Each key has at most one holder and an insertion-ordered queue of waiters (an ``OrderedDict``: O(1) append,
  O(1) removal from anywhere, O(1) peek and pop at the head).
* A request for several keys joins every key's queue in one step under the guard and is granted all of its
  keys at once, when it is at the head of every queue and every key is free. Queues are therefore ordered
  consistently (by arrival) across keys, which rules out deadlock without needing orderable keys.
* Ownership is decided under the guard and only there: a waiter owns its keys once ``granted`` is set.
  Waking a waiter (a future on its own loop, or a ``threading.Event``) only tells it to look. A waiter that
  times out or is cancelled after it was granted passes the keys on to the next waiter itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Literal, TypeVar, overload

from ..errors import LockQueueFull, LockTimeout

__all__ = ["KeyedLock", "LockEvent", "LockStatistics", "KeyStatistics"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

EventKind = Literal["requested", "acquired", "released", "timed_out", "cancelled", "rejected"]


class _Unset:
    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


@dataclass(frozen=True, slots=True)
class LockEvent:
    """One thing that happened to a request, as seen by an observer.

    Attributes:
        kind: ``"requested"``, ``"acquired"``, ``"released"``, ``"timed_out"``, ``"cancelled"``
            (while waiting) or ``"rejected"`` (queue full, or re-entry refused).
        keys: the keys of the request, de-duplicated, in the order given.
        label: who asked: the ``label=`` given, else the task's or thread's name.
        time: the lock clock's reading (``time.monotonic`` by default) when it happened.
        waited: for ``acquired``, ``timed_out`` and ``cancelled``: seconds spent waiting.
        held: for ``released``: seconds the keys were held.
    """

    kind: EventKind
    keys: tuple[Hashable, ...]
    label: str
    time: float
    waited: float | None = None
    held: float | None = None

    @property
    def key(self) -> Hashable:
        """The single key of a one-key request, else the tuple of keys."""
        return self.keys[0] if len(self.keys) == 1 else self.keys


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """The live state of one key, and counters since it last became busy.

    A key keeps no state while idle, so its counters start again each time it becomes busy;
    :meth:`KeyedLock.statistics` without a key gives lock-wide totals that never reset.
    """

    key: Hashable
    held: bool
    holder: str | None
    waiters: int
    acquisitions: int
    timeouts: int
    cancellations: int
    rejections: int
    total_wait: float
    max_wait: float
    total_hold: float


@dataclass(frozen=True, slots=True)
class LockStatistics:
    """Lock-wide state and totals since the lock was made."""

    keys: int
    held: int
    waiters: int
    acquisitions: int
    timeouts: int
    cancellations: int
    rejections: int
    total_wait: float
    max_wait: float
    total_hold: float

    @property
    def mean_wait(self) -> float:
        """Average seconds an acquisition waited (0 when there were none)."""
        return self.total_wait / self.acquisitions if self.acquisitions else 0.0


class _KeyState:
    """A contended key: its holder, its waiters in arrival order, and counters since it became busy.

    An uncontended key is stored in the table as its holding request alone (no state object at all);
    the first waiter upgrades it to a ``_KeyState``.
    """

    __slots__ = (
        "holder",
        "queue",
        "acquisitions",
        "timeouts",
        "cancellations",
        "rejections",
        "total_wait",
        "max_wait",
        "total_hold",
    )

    def __init__(self, holder: _Request | None) -> None:
        self.holder = holder
        self.queue: OrderedDict[_Request, None] = OrderedDict()
        self.acquisitions = 0 if holder is None else 1
        self.timeouts = 0
        self.cancellations = 0
        self.rejections = 0
        self.total_wait = 0.0
        self.max_wait = 0.0
        self.total_hold = 0.0


def check_seconds(name: str, value: float | None) -> float | None:
    """Validate a duration: a positive number of seconds, or None (inf also means None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return None if math.isinf(value) else float(value)


def _dedupe(keys: tuple[Hashable, ...]) -> tuple[Hashable, ...]:
    if not keys:
        raise TypeError("give at least one key, e.g. lock('session-1')")
    for k in keys:
        try:
            hash(k)
        except TypeError:
            raise TypeError(f"lock keys must be hashable, got {type(k).__name__} {k!r}") from None
    if len(keys) == 1:
        return keys
    return tuple(dict.fromkeys(keys))


def _describe(keys: tuple[Hashable, ...]) -> str:
    return f"key {keys[0]!r}" if len(keys) == 1 else f"keys {list(keys)!r}"


class KeyedLock:
    """A lock per key: same-key callers run one at a time in arrival order, other keys run in parallel.

    Use ``async with lock(key):`` in asyncio code, ``with lock.sync(key):`` in plain threads, and
    ``await lock.run(key, fn)`` to run a function under the lock. One ``KeyedLock`` may be shared by several
    event loops (a notebook's, a web server's) and threads: FIFO order holds across all of them.

    Args:
        timeout: default longest wait, in seconds (``None``: wait as long as it takes). Per-call override.
        max_pending: the most live waiters per key; the next caller gets :class:`LockQueueFull` at once.
        max_hold: an async holder that keeps a key longer than this is cancelled, and gets
            :class:`LockTimeout`; the key passes on only after that holder has finished.
        reentrant: allow the task (or thread) that holds all the requested keys to enter again.
        observer: a callable receiving every :class:`LockEvent` (see :meth:`add_observer`).
        clock: the clock for statistics and events (``time.monotonic``). Timeouts of async waiters run on
            their event loop's clock, those of threads on ``threading.Event.wait``.

    Raises:
        TypeError: an unhashable key, or no key.
        ValueError: a zero, negative or NaN timeout or ``max_hold``, or ``max_pending < 1``.

    Example:
        >>> import asyncio
        >>> from chatkit import KeyedLock
        >>> lock = KeyedLock(timeout=60)
        >>> order = []
        >>> async def turn(session, n):
        ...     async with lock(session):
        ...         order.append(f"start {n}")
        ...         await asyncio.sleep(0)          # the model call
        ...         order.append(f"end {n}")
        >>> async def main():
        ...     await asyncio.gather(turn("s1", 1), turn("s1", 2), turn("s2", 3))
        >>> asyncio.run(main())
        >>> order
        ['start 1', 'start 3', 'end 1', 'end 3', 'start 2', 'end 2']
        >>> len(lock)  # idle keys keep no state
        0
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        max_pending: int | None = None,
        max_hold: float | None = None,
        reentrant: bool = False,
        observer: Callable[[LockEvent], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout = check_seconds("timeout", timeout)
        if max_pending is not None:
            if isinstance(max_pending, bool) or not isinstance(max_pending, int):
                raise TypeError(f"max_pending must be an int or None, got {max_pending!r}")
            if max_pending < 1:
                raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        self._max_pending = max_pending
        self._max_hold = check_seconds("max_hold", max_hold)
        self._reentrant = bool(reentrant)
        self._clock = clock
        self._guard = threading.Lock()
        # key -> its holding _Request (uncontended) or its _KeyState (contended); absent when idle
        self._table: dict[Hashable, _KeyState | _Request] = {}
        self._observers: tuple[Callable[[LockEvent], object], ...] = ()
        self._fast = self._max_hold is None  # uncontended single keys skip the general path
        # lock-wide totals
        self._acquisitions = 0
        self._timeouts = 0
        self._cancellations = 0
        self._rejections = 0
        self._total_wait = 0.0
        self._max_wait = 0.0
        self._total_hold = 0.0
        if observer is not None:
            self.add_observer(observer)

    # ----------------------------------------------------------------- public API

    def __call__(
        self, key: Hashable = _UNSET, /, *more: Hashable, timeout: float | None = _UNSET, label: str | None = None
    ) -> _Request:
        """Return an async context manager that holds the keys for the duration of the block.

        Several keys are de-duplicated and taken together, atomically: no two callers can deadlock on each
        other's keys, and a caller that times out or is cancelled holds none of them.
        """
        if more or key is _UNSET:
            keys = _dedupe(() if key is _UNSET else (key, *more))
        else:
            keys = (key,)
            try:
                hash(key)
            except TypeError:
                raise TypeError(f"lock keys must be hashable, got {type(key).__name__} {key!r}") from None
        if timeout is _UNSET:
            timeout = self._timeout
        else:
            timeout = check_seconds("timeout", timeout)
        if label is not None and type(label) is not str:
            raise TypeError(f"label must be a str or None, got {label!r}")
        req = _new_request(_Request)  # no __init__ call: this is the hot path
        req.lock = self
        req.keys = keys
        req.timeout = timeout
        req.label = label
        req.frame = None
        req.granted = False
        return req

    def sync(
        self, key: Hashable = _UNSET, /, *more: Hashable, timeout: float | None = _UNSET, label: str | None = None
    ) -> _Request:
        """Like calling the lock, but a plain context manager for threads (``with lock.sync(key):``).

        Raises:
            RuntimeError: on entry from a thread that is running an event loop (it would block the loop).
        """
        return self(key, *more, timeout=timeout, label=label)

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

        ``keys`` is one key, or a ``list`` of keys (a tuple is one key, since tuples are common keys).
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
        """Whether ``key`` is held or waited for; without a key, whether any key is."""
        if key is _UNSET:
            return bool(self._table)
        return key in self._table

    def locked(self, key: Hashable) -> bool:
        """Whether ``key`` is held right now."""
        v = self._table.get(key)
        return v is not None and (type(v) is _Request or v.holder is not None)  # type: ignore[union-attr]

    def waiters(self, key: Hashable) -> int:
        """How many callers are waiting for ``key`` (not counting its holder)."""
        v = self._table.get(key)
        return len(v.queue) if type(v) is _KeyState else 0

    def __len__(self) -> int:
        """The number of keys that are held or waited for."""
        return len(self._table)

    def _census(self) -> tuple[int, int, int]:
        keys = len(self._table)
        held = waiting = 0
        for v in self._table.values():
            if type(v) is _KeyState:
                held += v.holder is not None
                waiting += len(v.queue)
            else:
                held += 1
        return keys, held, waiting

    def __repr__(self) -> str:
        with self._guard:
            keys, held, waiting = self._census()
        return (
            f"<KeyedLock keys={keys} held={held} waiting={waiting} timeout={self._timeout}"
            f" max_pending={self._max_pending} acquisitions={self._acquisitions}>"
        )

    @overload
    def statistics(self) -> LockStatistics: ...
    @overload
    def statistics(self, key: Hashable) -> KeyStatistics: ...
    def statistics(self, key: Hashable = _UNSET) -> LockStatistics | KeyStatistics:
        """Lock-wide totals (no argument), or the live state and counters of one key."""
        with self._guard:
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
            v = self._table.get(key)
            if v is None:
                return KeyStatistics(key, False, None, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)
            if type(v) is _Request:
                return KeyStatistics(key, True, v.label_text(), 0, 1, 0, 0, 0, 0.0, 0.0, 0.0)
            assert isinstance(v, _KeyState)
            return KeyStatistics(
                key=key,
                held=v.holder is not None,
                holder=None if v.holder is None else v.holder.label_text(),
                waiters=len(v.queue),
                acquisitions=v.acquisitions,
                timeouts=v.timeouts,
                cancellations=v.cancellations,
                rejections=v.rejections,
                total_wait=v.total_wait,
                max_wait=v.max_wait,
                total_hold=v.total_hold,
            )

    def add_observer(self, observer: Callable[[LockEvent], object]) -> None:
        """Call ``observer(event)`` for every :class:`LockEvent` from now on.

        Observers run outside the lock's internal guard, on the thread where the event happened; an
        exception in an observer is logged and otherwise ignored. Without observers, events cost nothing.
        """
        if not callable(observer):
            raise TypeError(f"observer must be callable, got {observer!r}")
        with self._guard:
            self._observers = (*self._observers, observer)
            self._fast = False

    def remove_observer(self, observer: Callable[[LockEvent], object]) -> None:
        """Stop calling ``observer``.

        Raises:
            ValueError: it was not added.
        """
        with self._guard:
            obs = list(self._observers)
            try:
                obs.remove(observer)
            except ValueError:
                raise ValueError(f"{observer!r} is not an observer of this lock") from None
            self._observers = tuple(obs)
            self._fast = not obs and self._max_hold is None

    # ----------------------------------------------------------------- internals (guard held unless noted)

    def _emit(self, events: list[LockEvent]) -> None:
        """Deliver events to the observers (guard NOT held)."""
        for observer in self._observers:
            for event in events:
                try:
                    observer(event)
                except Exception:  # an observer must never break locking
                    logger.exception("KeyedLock observer %r failed on %r", observer, event)

    def _state(self, key: Hashable) -> _KeyState | None:
        """The key's state, upgrading an uncontended holder to a ``_KeyState``."""
        v = self._table.get(key)
        if v is None or type(v) is _KeyState:
            return v  # type: ignore[return-value]
        st = _KeyState(v)  # type: ignore[arg-type]
        self._table[key] = st
        return st

    def _can_grant(self, req: _Request) -> bool:
        table = self._table
        for k in req.keys:
            st = table[k]
            assert type(st) is _KeyState
            if st.holder is not None or next(iter(st.queue)) is not req:
                return False
        return True

    def _grant(self, req: _Request, now: float) -> None:
        """Give ``req`` all its keys (it is at the head of every queue and every key is free)."""
        waited = now - req.t_request
        for k in req.keys:
            st = self._table[k]
            assert type(st) is _KeyState
            del st.queue[req]
            st.holder = req
            st.acquisitions += 1
            st.total_wait += waited
            if waited > st.max_wait:
                st.max_wait = waited
        self._acquisitions += 1
        req.token = self._acquisitions
        self._total_wait += waited
        if waited > self._max_wait:
            self._max_wait = waited
        req.granted = True
        req.t_acquired = now

    def _grant_heads(self, keys: Iterable[Hashable], now: float, woken: list[_Request]) -> None:
        """After ``keys`` were freed or lost a waiter: drop idle keys, grant the heads that can run now."""
        table = self._table
        for k in keys:
            st = table.get(k)
            if st is None or type(st) is not _KeyState or st.holder is not None:
                continue
            if not st.queue:
                del table[k]
                continue
            head = next(iter(st.queue))
            if len(head.keys) == 1 or self._can_grant(head):
                self._grant(head, now)
                woken.append(head)

    def _release_locked(self, req: _Request, now: float, woken: list[_Request]) -> float:
        held = now - req.t_acquired
        table = self._table
        for k in req.keys:
            st = table[k]
            if st is req:  # never contended
                del table[k]
            else:
                assert type(st) is _KeyState and st.holder is req
                st.holder = None
                st.total_hold += held
        self._total_hold += held
        self._grant_heads(req.keys, now, woken)
        return held

    def _withdraw_locked(self, req: _Request, timed_out: bool, now: float, woken: list[_Request]) -> None:
        """Remove a waiter that was not granted (it timed out or was cancelled) from every queue."""
        table = self._table
        for k in req.keys:
            st = table[k]
            assert type(st) is _KeyState
            del st.queue[req]
            if timed_out:
                st.timeouts += 1
            else:
                st.cancellations += 1
        if timed_out:
            self._timeouts += 1
        else:
            self._cancellations += 1
        self._grant_heads(req.keys, now, woken)

    @staticmethod
    def _wake_all(woken: list[_Request]) -> None:
        """Tell granted waiters to resume (guard NOT held)."""
        for req in woken:
            req.wake()

    def _abandon(self, req: _Request) -> None:
        """A granted waiter can't be woken (its loop is closed): release on its behalf (guard NOT held)."""
        woken: list[_Request] = []
        with self._guard:
            self._release_locked(req, self._clock(), woken)
        self._wake_all(woken)


class _Request:
    """One acquisition: the context manager, the waiter in the queues and, once granted, the holder.

    Who holds it is recorded as ``frame``, the frame that entered the ``async with`` (or ``with``): it is
    on the current call stack exactly when the current task or thread is the one that holds the keys,
    which is how re-entry is detected without the cost of looking up the current task on every acquire.
    """

    # The uncontended path touches only slots (set by KeyedLock.__call__, which skips __init__); the
    # attributes of waiters, re-entries and max_hold live in __dict__, with their defaults on the class.
    __slots__ = ("lock", "keys", "timeout", "label", "frame", "granted", "t_acquired", "token", "__dict__")
    owner: asyncio.Task[Any] | threading.Thread | None = None  # known for waiters, threads and max_hold
    parent: _Request | None = None  # set when this is a re-entry into ``parent``
    depth = 0  # open re-entries into this (holding) request
    hold_handle: asyncio.TimerHandle | None = None
    hold_expired = False
    event: threading.Event | None = None
    loop: asyncio.AbstractEventLoop
    thread: int  # the thread running ``loop`` (waiters only)
    future: asyncio.Future[None]
    t_request: float
    lock: KeyedLock
    keys: tuple[Hashable, ...]
    timeout: float | None
    label: str | None
    frame: FrameType | None  # who entered: see the class docstring
    granted: bool
    t_acquired: float
    token: int  # the fencing token: the lock's acquisition count when this request was granted

    def __repr__(self) -> str:
        state = "holding" if self.granted else "waiting" if self.frame is not None else "new"
        return f"<lock request for {_describe(self.keys)} by {self.label_text()!r}: {state}>"

    def label_text(self) -> str:
        """The caller's label, else its task's or thread's name, else the function that took the lock."""
        if self.label is not None:
            return self.label
        owner = self.owner
        if isinstance(owner, asyncio.Task):
            return owner.get_name()
        if isinstance(owner, threading.Thread):
            return owner.name
        frame = self.frame
        return "?" if frame is None else frame.f_code.co_qualname

    def _on_my_stack(self) -> bool:
        """Whether the current task or thread is the one that entered this (holding) request."""
        target = self.frame
        frame: FrameType | None = sys._getframe()
        while frame is not None:
            if frame is target:
                return True
            frame = frame.f_back
        return False

    def _event(self, kind: EventKind, now: float, waited: float | None = None, held: float | None = None) -> LockEvent:
        return LockEvent(kind, self.keys, self.label_text(), now, waited, held)


    def wake(self) -> None:
        """Tell this granted waiter to resume, on its own loop or thread (guard NOT held)."""
        if self.event is not None:
            self.event.set()
            return
        fut = self.future
        try:
            if self.thread == _get_ident():  # the waiter's loop runs on this thread: no cross-thread call
                if not fut.done():
                    fut.set_result(None)
            else:
                self.loop.call_soon_threadsafe(_set_result, fut)
        except RuntimeError:  # its loop is closed: nobody will ever resume this waiter
            self.lock._abandon(self)

    # ------------------------------------------------------------ acquiring (both flavours)

    def _enter_locked(self, now: float, events: list[LockEvent] | None) -> bool:
        """Guard held: take the keys now (True) or join their queues (False). May raise."""
        lock = self.lock
        table = lock._table
        keys = self.keys
        self.t_request = now
        states = [lock._state(k) for k in keys]
        # Re-entry by the task or thread that holds them?
        holders: list[_Request] = []
        for st in states:
            h = None if st is None else st.holder
            if h is not None and h not in holders and h._on_my_stack():
                holders.append(h)
        if holders:
            if not lock._reentrant or len(holders) != 1 or not set(keys) <= set(holders[0].keys):
                self._reject_locked(now, events)
                if lock._reentrant:
                    raise RuntimeError(
                        f"{self.label_text()!r} holds some of {_describe(keys)} and asked for more: a re-entrant "
                        "acquisition may only ask again for keys it took together in one request"
                    )
                raise RuntimeError(
                    f"{self.label_text()!r} already holds {_describe(keys)} and asked for it again, which would "
                    "deadlock. Release it first, or make the lock with KeyedLock(reentrant=True)"
                )
            self.parent = holders[0]
            self.token = self.parent.token
            self.parent.depth += 1
            self.granted = True
            self.t_acquired = now
            return True
        if lock._max_pending is not None:
            for k, st in zip(keys, states):
                if st is not None and len(st.queue) >= lock._max_pending:
                    self._reject_locked(now, events)
                    raise LockQueueFull(
                        f"too many requests are already waiting for key {k!r} (max_pending={lock._max_pending});"
                        " try again later",
                        key=k,
                        max_pending=lock._max_pending,
                    )
        if events is not None:
            events.append(self._event("requested", now))
        for k, st in zip(keys, states):
            if st is None:
                st = _KeyState(None)
                table[k] = st
            st.queue[self] = None
        if lock._can_grant(self):
            lock._grant(self, now)
            if events is not None:
                events.append(self._event("acquired", now, waited=0.0))
            return True
        return False

    def _reject_locked(self, now: float, events: list[LockEvent] | None) -> None:
        lock = self.lock
        lock._rejections += 1
        for k in self.keys:
            st = lock._table.get(k)
            if type(st) is _KeyState:
                st.rejections += 1
        if events is not None:
            events.append(self._event("rejected", now))

    def _release(self) -> None:
        """Give the keys back and hand them to the next waiters (guard NOT held)."""
        if self.parent is not None:
            self.parent.depth -= 1
            return
        if self.depth:
            raise RuntimeError(
                f"released {_describe(self.keys)} while a re-entrant acquisition of it is still open"
            )
        lock = self.lock
        woken: list[_Request] = []
        with lock._guard:
            now = lock._clock()
            held = lock._release_locked(self, now, woken)
        lock._wake_all(woken)
        if lock._observers:
            lock._emit([self._event("released", now, held=held)])

    # ------------------------------------------------------------ asyncio

    def __aenter__(self) -> Awaitable[None]:
        # A plain function returning an awaitable: the uncontended path builds no coroutine at all.
        if self.frame is not None:
            raise RuntimeError("this lock request was already used; call lock(key) again for a new one")
        self.frame = sys._getframe(1)
        lock = self.lock
        keys = self.keys
        if lock._fast and len(keys) == 1:
            # Fast path: an idle key is stored as its holder alone; no state object, no event, no timer.
            guard = lock._guard
            guard.acquire()
            try:
                if lock._table.setdefault(keys[0], self) is self:
                    self.granted = True
                    self.t_acquired = lock._clock()
                    lock._acquisitions += 1
                    self.token = lock._acquisitions
                    return _done_future or _ready()
            finally:
                guard.release()
        return self._acquire()

    async def _acquire(self) -> None:
        lock = self.lock
        loop = asyncio.get_running_loop()
        self.owner = _current_task()
        events: list[LockEvent] | None = [] if lock._observers else None
        try:
            with lock._guard:
                done = self._enter_locked(lock._clock(), events)
                if not done:
                    self.loop = loop
                    self.thread = _get_ident()
                    self.future = loop.create_future()
        finally:
            if events:  # observers run outside the guard
                lock._emit(events)
        if not done:
            await self._wait_async(loop)
        if lock._max_hold is not None and self.parent is None:
            self.hold_handle = loop.call_later(lock._max_hold, self._on_max_hold)

    async def _wait_async(self, loop: asyncio.AbstractEventLoop) -> None:
        lock = self.lock
        timer = None if self.timeout is None else loop.call_later(self.timeout, self._on_timeout)
        try:
            await self.future
        except asyncio.CancelledError:
            self._after_cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if lock._observers:
            lock._emit([self._event("acquired", self.t_acquired, waited=self.t_acquired - self.t_request)])

    def _timeout_error(self, waited: float) -> LockTimeout:
        return LockTimeout(
            f"gave up waiting for {_describe(self.keys)} after {waited:.3g} s (timeout={self.timeout:g} s): "
            "earlier requests held it the whole time",
            keys=self.keys,
            waited=waited,
        )

    def _on_timeout(self) -> None:
        """Runs on the waiter's own loop when its timeout expires."""
        lock = self.lock
        woken: list[_Request] = []
        with lock._guard:
            if self.granted:  # the handoff won the race: its wake-up is on the way
                return
            now = lock._clock()
            lock._withdraw_locked(self, True, now, woken)
        waited = now - self.t_request
        if not self.future.done():
            self.future.set_exception(self._timeout_error(waited))
        lock._wake_all(woken)
        if lock._observers:
            lock._emit([self._event("timed_out", now, waited=waited)])

    def _after_cancel(self) -> None:
        """The waiting task was cancelled: leave the queues, or pass on keys handed over meanwhile."""
        lock = self.lock
        woken: list[_Request] = []
        with lock._guard:
            now = lock._clock()
            if self.granted:
                held = lock._release_locked(self, now, woken)
                events = [
                    self._event("acquired", self.t_acquired, waited=self.t_acquired - self.t_request),
                    self._event("released", now, held=held),
                ]
            elif self.future.done() and not self.future.cancelled():
                # Its timeout fired first (and already left the queues); the cancellation wins.
                self.future.exception()  # retrieved: asyncio must not log it as lost
                events = []
            else:
                lock._withdraw_locked(self, False, now, woken)
                events = [self._event("cancelled", now, waited=now - self.t_request)]
        lock._wake_all(woken)
        if lock._observers:
            lock._emit(events)

    def _on_max_hold(self) -> None:
        self.hold_expired = True
        owner = self.owner
        if isinstance(owner, asyncio.Task) and not owner.done():
            owner.cancel(f"held {_describe(self.keys)} longer than max_hold={self.lock._max_hold:g} s")

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        lock = self.lock
        if lock._fast and len(self.keys) == 1:
            # Fast path: the key was never contended, so the table holds this request itself.
            key = self.keys[0]
            table = lock._table
            guard = lock._guard
            guard.acquire()
            try:
                if table.get(key) is self:
                    del table[key]
                    lock._total_hold += lock._clock() - self.t_acquired
                    return _done_future or _ready()
            finally:
                guard.release()
        if self.hold_handle is None:
            self._release()
            return _done_future or _ready()
        return self._aexit(exc_type, exc)

    async def _aexit(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        """Release a holder that had a ``max_hold`` timer, turning its expiry into ``LockTimeout``."""
        lock = self.lock
        assert self.hold_handle is not None
        self.hold_handle.cancel()
        self._release()
        if self.hold_expired:
            owner = self.owner
            if isinstance(owner, asyncio.Task):
                owner.uncancel()
            if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
                max_hold = lock._max_hold or 0.0
                raise LockTimeout(
                    f"held {_describe(self.keys)} longer than max_hold={max_hold:g} s; the work was cancelled "
                    "and the lock passed on",
                    keys=self.keys,
                    waited=max_hold,
                ) from exc

    # ------------------------------------------------------------ threads

    def __enter__(self) -> None:
        if _get_running_loop() is not None:
            raise RuntimeError(
                "lock.sync() was used in a thread that runs an event loop, where it would block the loop; "
                "use 'async with lock(key):' there"
            )
        if self.frame is not None:
            raise RuntimeError("this lock request was already used; call lock(key) again for a new one")
        self.frame = sys._getframe(1)
        self.owner = threading.current_thread()
        lock = self.lock
        events: list[LockEvent] | None = [] if lock._observers else None
        try:
            with lock._guard:
                done = self._enter_locked(lock._clock(), events)
                if not done:
                    self.event = threading.Event()
        finally:
            if events:
                lock._emit(events)
        if done:
            return
        woken: list[_Request] = []
        try:
            self.event.wait(self.timeout)
        except BaseException:  # e.g. KeyboardInterrupt while waiting: hold nothing, leave the queues
            with lock._guard:
                now = lock._clock()
                if self.granted:
                    lock._release_locked(self, now, woken)
                else:
                    lock._withdraw_locked(self, False, now, woken)
            lock._wake_all(woken)
            raise
        with lock._guard:
            now = lock._clock()
            if not self.granted:
                lock._withdraw_locked(self, True, now, woken)
        lock._wake_all(woken)
        if self.granted:
            if lock._observers:
                lock._emit([self._event("acquired", self.t_acquired, waited=self.t_acquired - self.t_request)])
            return
        waited = now - self.t_request
        if lock._observers:
            lock._emit([self._event("timed_out", now, waited=waited)])
        raise self._timeout_error(waited)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()


_done_future: asyncio.Future[None] | None = None


def _ready() -> Awaitable[None]:
    """An awaitable that is already done, so ``await`` returns at once.

    A finished ``asyncio.Future`` (implemented in C) is the cheapest such object; awaiting a finished
    future never touches its event loop, so the one made on the first loop serves every loop.
    """
    global _done_future
    if _done_future is None:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        _done_future = fut
    return _done_future
_new_request = object.__new__
_get_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident
_current_task = asyncio.current_task


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
