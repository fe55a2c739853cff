"""A per-key lock for asyncio tasks and threads: FIFO handoff, timeouts, a pending limit, many keys at once.

Design, in invariants:

* A request is owned by the asyncio task that entered it (``async with``), or by the thread that entered it
  (``with lock.sync(...)``), as in anyio and trio. Re-entry means the owner asking again, wherever in its
  code it asks (inside a helper, an ``@asynccontextmanager``, under ``asyncio.timeout``); any other task is
  another caller and waits, whoever started it and whichever loop steps it (see :mod:`.owner`).
* One ``threading.Lock`` (the *guard*) protects the lock's state, so callers on different event loops and
  plain threads share one lock. Nobody ever awaits or runs user code while holding the guard.
* ``_table`` has an entry for a key only while someone holds or waits for it: the holding request itself
  while the key is uncontended (the fast path allocates nothing else), a :class:`_KeyState` once someone
  waits. The entry is deleted the moment the key goes idle, so a lock that saw a million keys keeps none.
* The uncontended path takes no guard. It claims an *idle* key with one atomic ``dict.setdefault``; every
  other change to the table happens under the guard and only to keys that are present, except adding a
  key, which also uses ``setdefault``: neither side can overwrite the other. It releases by deleting its
  own entry, after a handshake with waiters that makes sure nobody is upgrading that entry to a
  ``_KeyState`` at the same moment: the holder marks itself ``exiting`` and then reads ``contended``; a
  waiter (under the guard) marks the holder ``contended`` and then reads ``exiting``. Python threads run
  one at a time, each step seen by the others in order, so one side always sees the other's mark: the
  holder releases through the guard, or the waiter backs off until the entry is gone. (On a Python without
  the GIL the uncontended path is off: every request takes the guard.)
* Each key has at most one holder and an insertion-ordered queue of waiters (an ``OrderedDict``: O(1) append,
  O(1) removal from anywhere, O(1) peek and pop at the head).
* A request for several keys joins every key's queue in one step under the guard and is granted all of its
  keys at once, when it is at the head of every queue and every key is free. Queues are therefore ordered
  consistently (by arrival) across keys, which rules out deadlock without needing orderable keys.
* A waiter's fate is decided under the guard, once: its ``state`` goes from ``WAITING`` to exactly one of
  ``GRANTED`` (a release handed it the keys), ``TIMED_OUT`` (its timer) or ``CANCELLED`` (its task was
  cancelled, seen by its timer or by the task itself). Whoever comes second reads the state and acts on it:
  a timer that finds the waiter granted does nothing; a cancelled task that finds itself granted passes the
  keys on; one that finds itself withdrawn only re-raises. Waking a waiter (a future on its own loop, or a
  ``threading.Event``) only tells it to look.
* Handing keys on is a loop, never a recursion: a granted waiter that can never be woken (its loop was
  closed) is released on its behalf and whoever is next joins the same work list.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from ..errors import LockQueueFull, LockTimeout
from ._observers import emit, with_observer, without_observer
from .owner import cache as _owner_cache
from .owner import current_owner as _current_owner
from .owner import current_tasks as _current_tasks
from .owner import owner_name as _owner_name
from .owner import plain_task_type as _PlainTask

__all__ = ["KeyedLock", "LockEvent", "LockStatistics", "KeyStatistics"]


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
        label: who asked: the ``label=`` given, else the name of the task (or thread) that owns the request.
        time: the lock clock's reading (``time.monotonic`` by default) when it happened.
        waited: for ``acquired``, ``timed_out`` and ``cancelled``: seconds spent waiting.
        held: for ``released``: seconds the keys were held (``None`` for an uncontended hold that began
            before the lock measured hold times; see :attr:`LockStatistics.total_hold`).

    Example:
        >>> import asyncio
        >>> from chatkit import KeyedLock
        >>> events = []
        >>> lock = KeyedLock(observer=events.append)
        >>> async def main():
        ...     async with lock("k", label="turn 1"):
        ...         pass
        >>> asyncio.run(main())
        >>> [(e.label, e.kind, e.key) for e in events]
        [('turn 1', 'requested', 'k'), ('turn 1', 'acquired', 'k'), ('turn 1', 'released', 'k')]
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

    A key keeps no state while idle, so its counters start again each time it becomes busy, and an
    uncontended key has no counters beyond its holder; :meth:`KeyedLock.statistics` without a key gives
    lock-wide totals that never reset.

    Attributes:
        key: the key.
        held: whether somebody holds it.
        holder: the holder's ``label=``, else the name of its task (or thread); ``None`` when free.
        waiters: requests waiting for it.
        acquisitions, timeouts, cancellations, rejections: since the key became busy.
        total_wait, max_wait: seconds waited by those acquisitions.
        total_hold: seconds the key was held while somebody waited for it.

    Example:
        >>> from chatkit import KeyedLock
        >>> KeyedLock().statistics("k")
        KeyStatistics(key='k', held=False, holder=None, waiters=0, acquisitions=0, timeouts=0, cancellations=0, rejections=0, total_wait=0.0, max_wait=0.0, total_hold=0.0)
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
    """Lock-wide state and totals since the lock was made.

    Attributes:
        keys: keys held or waited for right now; ``held`` of them are held, by requests that ``waiters``
            more requests wait behind.
        acquisitions: requests granted (re-entries not counted).
        timeouts, cancellations: requests that gave up waiting; ``rejections``: turned away at once
            (``max_pending``, or re-entry refused).
        total_wait, max_wait: seconds waited by the acquisitions.
        total_hold: seconds keys were held. The uncontended path reads no clock until somebody asks: the
            first call to :meth:`KeyedLock.statistics` starts measuring every hold (for good: it then costs
            two clock readings per acquisition). Before that, only holds that went through the general path
            count (those that waited, were observed or limited by ``max_hold``), and a hold somebody waited
            for counts from the moment they started waiting.

    Example:
        >>> import asyncio
        >>> from chatkit import KeyedLock
        >>> lock = KeyedLock()
        >>> async def main():
        ...     async with lock("a"):
        ...         pass
        ...     async with lock("a", "b"):
        ...         pass
        >>> asyncio.run(main())
        >>> s = lock.statistics()
        >>> (s.keys, s.acquisitions, s.mean_wait)
        (0, 2, 0.0)
    """

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

    A request belongs to the asyncio task (or, with ``sync()``, the thread) that entered it. That task asking
    again for keys it holds is re-entry: :class:`RuntimeError` at once, or with ``reentrant=True`` a nested
    acquisition. Every other task waits its turn, including tasks the holder started and tasks stepped by a
    nested event loop. On Python 3.11 ``asyncio.wait_for`` runs its awaitable in a new task, so a request
    made through it is another task's; ``asyncio.timeout()`` stays in the current task.

    Args:
        timeout: default longest wait, in seconds (``None``: wait as long as it takes). Per-call override.
        max_pending: the most live waiters per key; the next caller gets :class:`LockQueueFull` at once.
        max_hold: an async holder that keeps a key longer than this is cancelled, and gets
            :class:`LockTimeout`; the key passes on only after that holder has finished. If the holder is also
            cancelled from outside, the outside cancellation wins (as with ``asyncio.timeout``).
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
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._max_pending = max_pending
        self._max_hold = check_seconds("max_hold", max_hold)
        self._reentrant = bool(reentrant)
        self._clock = clock
        self._guard = threading.Lock()
        # key -> its holding _Request (uncontended) or its _KeyState (contended); absent when idle
        self._table: dict[Hashable, _KeyState | _Request] = {}
        self._observers: tuple[Callable[[LockEvent], object], ...] = ()
        self._fast = self._max_hold is None and _GIL  # uncontended single keys skip the general path
        # Whether the uncontended path reads the clock to time its holds: from the first statistics() call.
        self._timed = False
        # Fencing tokens: next() on an itertools.count is atomic, so the fast path needs no guard for it.
        # The number of acquisitions is read off the same counter (see _acquisitions_locked).
        self._tokens = itertools.count(1)
        self._peeks = 0
        # lock-wide totals (guard held)
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

        Raises:
            TypeError: no key, an unhashable key, or a label that is not a str.
            ValueError: a zero, negative or NaN ``timeout``.
        """
        if more or timeout is not _UNSET or label is not None or (type(key) is not str and type(key) is not int):
            return self._request(key, more, timeout, label)
        # The uncontended path starts here: one str or int key (always hashable), no options, no __init__.
        req = _Request()
        req.lock = self
        req.key = key
        req.token = None
        req.contended = False
        return req

    def _request(self, key: Hashable, more: tuple[Hashable, ...], timeout: float | None, label: str | None) -> _Request:
        """The general form of :meth:`__call__`: validate, de-duplicate, apply the options."""
        if more or key is _UNSET:
            keys = _dedupe(() if key is _UNSET else (key, *more))
        else:
            try:
                hash(key)
            except TypeError:
                raise TypeError(f"lock keys must be hashable, got {type(key).__name__} {key!r}") from None
            keys = (key,)
        if timeout is not _UNSET:
            timeout = check_seconds("timeout", timeout)
        if label is not None and type(label) is not str:
            raise TypeError(f"label must be a str or None, got {label!r}")
        if len(keys) == 1:
            req = _Request()
        else:
            req = _Requests()
            req.keys = keys
        if timeout is not _UNSET:
            req.timeout = timeout
        if label is not None:
            req.label = label
        req.lock = self
        req.key = keys[0]
        req.token = None
        req.contended = False
        return req

    def sync(
        self, key: Hashable = _UNSET, /, *more: Hashable, timeout: float | None = _UNSET, label: str | None = None
    ) -> _Request:
        """Like calling the lock, but a plain context manager for threads (``with lock.sync(key):``).

        The request belongs to the thread that enters it.

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
        return v is not None and (type(v) is not _KeyState or v.holder is not None)  # type: ignore[union-attr]

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
        for v in list(self._table.values()):
            if type(v) is _KeyState:
                held += v.holder is not None
                waiting += len(v.queue)
            else:
                held += 1
        return keys, held, waiting

    def __repr__(self) -> str:
        with self._guard:
            keys, held, waiting = self._census()
            acquisitions = self._acquisitions_locked()
        return (
            f"<KeyedLock keys={keys} held={held} waiting={waiting} timeout={self._timeout}"
            f" max_pending={self._max_pending} acquisitions={acquisitions}>"
        )

    @overload
    def statistics(self) -> LockStatistics: ...
    @overload
    def statistics(self, key: Hashable) -> KeyStatistics: ...
    def statistics(self, key: Hashable = _UNSET) -> LockStatistics | KeyStatistics:
        """Lock-wide totals (no argument), or the live state and counters of one key.

        The first call also starts timing uncontended holds (see :attr:`LockStatistics.total_hold`): until
        somebody asks, the uncontended path reads no clock.
        """
        with self._guard:
            self._timed = True
            if key is _UNSET:
                keys, held, waiting = self._census()
                return LockStatistics(
                    keys=keys,
                    held=held,
                    waiters=waiting,
                    acquisitions=self._acquisitions_locked(),
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
            if type(v) is not _KeyState:
                return KeyStatistics(key, True, v.label_text(), 0, 1, 0, 0, 0, 0.0, 0.0, 0.0)  # type: ignore[union-attr]
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
        with self._guard:
            self._observers = with_observer(self._observers, observer)
            self._fast = False

    def remove_observer(self, observer: Callable[[LockEvent], object]) -> None:
        """Stop calling ``observer``.

        Raises:
            ValueError: it was not added.
        """
        with self._guard:
            self._observers = without_observer(self._observers, observer)
            self._fast = not self._observers and self._max_hold is None and _GIL

    # ----------------------------------------------------------------- internals (guard held unless noted)

    def _acquisitions_locked(self) -> int:
        """How many acquisitions were granted (the tokens issued so far).

        Reading ``itertools.count`` means taking a number from it, so each reading skips one token; the
        readings are counted and subtracted. Tokens only need to grow, not to be consecutive.
        """
        issued = next(self._tokens) - 1 - self._peeks
        self._peeks += 1
        return issued

    def _emit(self, events: list[LockEvent]) -> None:
        """Deliver events to the observers (guard NOT held)."""
        emit(self._observers, events, self)

    def _state(self, key: Hashable) -> _KeyState:
        """The key's state, created (for an idle key) or upgraded (from an uncontended holder) as needed."""
        table = self._table
        v = table.get(key)
        if v is None:
            st = _KeyState(None)
            v = table.setdefault(key, st)  # a fast-path holder may have claimed the key meanwhile
            if v is st:
                return st
        if type(v) is _KeyState:
            return v
        # An uncontended holder, upgraded: _hold_off() marked it, so it releases through the guard (no race).
        # If its hold is not being timed, time it from now on: contended holds always count in total_hold.
        assert v.contended, "upgrading an uncontended holder without _hold_off()"  # type: ignore[union-attr]
        if getattr(v, "t_acquired", None) is None:
            v.t_acquired = self._clock()  # type: ignore[union-attr]
        st = _KeyState(v)  # type: ignore[arg-type]
        table[key] = st
        return st

    def _hold_off(self, keys: Iterable[Hashable]) -> bool:
        """Guard held: tell the uncontended holders of ``keys`` that someone is interested in their key.

        An uncontended holder releases without the guard (see ``_Request.__aexit__``): it marks itself
        ``exiting``, *then* reads ``contended``. Here it is the other way round: mark ``contended``, *then*
        read ``exiting``. Python's threads run one at a time, each step seen by all, so one side always sees
        the other's mark: either the holder will release through the guard (and find the key upgraded), or
        it is releasing right now and nothing may touch its entry: False, try again in a moment.
        """
        table = self._table
        for k in keys:
            v = table.get(k)
            if v is not None and type(v) is not _KeyState:
                v.contended = True  # type: ignore[union-attr]
                if getattr(v, "exiting", False):
                    return False
        return True

    def _holds(self, req: _Request) -> bool:
        v = self._table.get(req.key)
        return v is req or (type(v) is _KeyState and v.holder is req)  # type: ignore[union-attr]

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
        req.token = next(self._tokens)
        self._total_wait += waited
        if waited > self._max_wait:
            self._max_wait = waited
        req.state = GRANTED
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

    def _release_locked(self, req: _Request, now: float, woken: list[_Request]) -> float | None:
        """Free ``req``'s keys and hand them on; how long it held them (None: its hold was not timed)."""
        t_acquired = getattr(req, "t_acquired", None)  # an uncontended hold begun before timing started
        held = None if t_acquired is None else now - t_acquired
        table = self._table
        for k in req.keys:
            st = table[k]
            if st is req:  # never contended
                del table[k]
            else:
                assert type(st) is _KeyState and st.holder is req
                st.holder = None
                if held is not None:
                    st.total_hold += held
        if held is not None:
            self._total_hold += held
        if req.state is not None:
            req.state = RELEASED
        self._grant_heads(req.keys, now, woken)
        return held

    def _withdraw_locked(self, req: _Request, outcome: str, now: float, woken: list[_Request]) -> None:
        """Remove a waiting request from every queue, once: it timed out or was cancelled."""
        assert req.state is WAITING
        req.state = outcome
        timed_out = outcome is TIMED_OUT
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

    def _wake_all(self, woken: list[_Request]) -> None:
        """Tell granted waiters to resume (guard NOT held).

        A waiter whose loop was closed can never resume: it is released on its behalf, and whoever that
        grants joins ``woken``. A loop over a growing list, not a recursion: hundreds of such waiters in a
        row hand the keys on in constant stack depth.
        """
        events: list[LockEvent] | None = None
        i = 0
        while i < len(woken):
            req = woken[i]
            i += 1
            if req._wake():
                continue
            with self._guard:
                if req.state is not GRANTED:
                    continue
                now = self._clock()
                held = self._release_locked(req, now, woken)
            if self._observers:
                events = (events or []) + [
                    req._event("acquired", req.t_acquired, waited=req.t_acquired - req.t_request),
                    req._event("released", now, held=held),
                ]
        if events:
            self._emit(events)


class _KeysOnFirstUse:
    """``request.keys`` of a one-key request: the tuple is made on first use and then kept in the request's
    ``__dict__`` (a non-data descriptor, so the instance attribute wins). The uncontended path never needs it."""

    def __get__(self, req: _Request | None, owner: type | None = None) -> Any:
        if req is None:
            return self
        keys = req.__dict__["keys"] = (req.key,)
        return keys


# request states, for requests that went through the general path (see the module docstring)
WAITING = "waiting"
GRANTED = "holding"
TIMED_OUT = "timed out"
CANCELLED = "cancelled"
RELEASED = "released"
_NEW: Any = _Unset()  # the owner of a request nobody entered yet


class _Request:
    """One acquisition of one key: the context manager, the waiter in the queue and, once granted, the holder.

    ``owner`` is the task (or thread) that entered it. The uncontended path touches only the slots
    (:meth:`KeyedLock.__call__` sets ``lock``, ``key`` and ``token``; entering sets ``owner``); what only
    waiters, re-entries, ``max_hold`` and per-call options need lives in ``__dict__``, with its default on
    the class.
    """

    __slots__ = ("lock", "key", "owner", "token", "contended", "exiting", "t_acquired", "__dict__")
    lock: KeyedLock
    key: Hashable  # the (first) key
    owner: object  # the entering task or thread; unset until entered
    token: int | None  # the fencing token, once granted; a re-entry shares its parent's
    t_acquired: float  # unset for an uncontended hold begun before timing started (see KeyedLock._timed)
    # Whether it may release on the fast path: False only while it is an uncontended holder that no waiter
    # has marked (KeyedLock._hold_off); True from the start for requests that took the general path.
    contended: bool
    exiting: bool  # set when its holder starts to release (read with getattr: unset before)
    # defaults, overridden per request only when needed
    timeout: float | None = _UNSET  # _UNSET: the lock's default
    label: str | None = None
    state: str | None = None  # None for a request that took the fast path
    parent: _Request | None = None  # set when this is a re-entry into ``parent``
    depth = 0  # open re-entries into this (holding) request
    hold_handle: asyncio.TimerHandle | None = None
    hold_expired = False  # its max_hold timer cancelled the owner
    cancelling = 0  # the owner's cancellation count when it started holding (max_hold)
    event: threading.Event | None = None  # a waiting thread's wake-up
    loop: asyncio.AbstractEventLoop  # a waiting task's loop and wake-up future
    future: asyncio.Future[None]
    t_request: float

    keys: tuple[Hashable, ...] = _KeysOnFirstUse()  # type: ignore[assignment]  # see _KeysOnFirstUse

    def __repr__(self) -> str:
        if getattr(self, "owner", _NEW) is _NEW:
            state = "new"
        elif self.state is not None:
            state = self.state
        else:
            state = "holding" if self.lock._holds(self) else "released"
        token = "" if self.token is None else f", token {self.token}"
        return f"<lock request for {_describe(self.keys)} by {self.label_text()!r}: {state}{token}>"

    def label_text(self) -> str:
        """The caller's label, else its task's or thread's name."""
        if self.label is not None:
            return self.label
        owner = getattr(self, "owner", _NEW)
        if owner is _NEW:
            return "nobody yet"
        return _owner_name(owner)

    def _check_unused(self) -> None:
        if self.token is not None or self.state is not None:
            raise RuntimeError("this lock request was already used; call lock(key) again for a new one")

    def _event(self, kind: EventKind, now: float, waited: float | None = None, held: float | None = None) -> LockEvent:
        return LockEvent(kind, self.keys, self.label_text(), now, waited, held)

    def _timeout(self) -> float | None:
        timeout = self.timeout
        return self.lock._timeout if timeout is _UNSET else timeout

    def _timeout_error(self, waited: float) -> LockTimeout:
        return LockTimeout(
            f"gave up waiting for {_describe(self.keys)} after {waited:.3g} s (timeout={self._timeout():g} s): "
            "earlier requests held it the whole time",
            keys=self.keys,
            waited=waited,
        )

    def _wake(self) -> bool:
        """Tell this granted waiter to resume, on its own loop or thread (guard NOT held).

        Returns False when it never can: its event loop is closed.
        """
        event = self.event
        if event is not None:
            event.set()
            return True
        loop = self.loop
        fut = self.future
        try:
            if getattr(loop, "_thread_id", None) == _get_ident():  # its loop is running this code
                if not fut.done():
                    fut.set_result(None)
            else:
                loop.call_soon_threadsafe(_set_result, fut)
        except RuntimeError:
            if loop.is_closed():
                return False
            raise
        return True

    # ------------------------------------------------------------ acquiring (both flavours)

    def _enter_locked(self, now: float, events: list[LockEvent] | None) -> bool | None:
        """Guard held: take the keys now (True), join their queues (False), or, when a holder of one of
        them is releasing it this very moment without the guard, nothing yet (None: try again). May raise."""
        lock = self.lock
        table = lock._table
        keys = self.keys
        if not lock._hold_off(keys):
            return None
        owner = self.owner
        self.t_request = now
        # Re-entry: does the asking task or thread hold any of these keys?
        mine: list[_Request] = []
        for k in keys:
            v = table.get(k)
            h = v.holder if type(v) is _KeyState else v  # type: ignore[union-attr]
            if h is not None and h.owner is owner and h not in mine:
                mine.append(h)  # type: ignore[arg-type]
        if mine:
            parent = mine[0]
            if not lock._reentrant or len(mine) != 1 or not set(keys) <= set(parent.keys):
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
            for k in parent.keys:
                lock._state(k)  # the parent now releases through the general path, which checks re-entries
            self.parent = parent
            self.token = parent.token
            parent.depth += 1
            self.state = GRANTED
            self.t_acquired = now
            return True
        if lock._max_pending is not None:
            for k in keys:
                st = table.get(k)
                if type(st) is _KeyState and len(st.queue) >= lock._max_pending:
                    self._reject_locked(now, events)
                    raise LockQueueFull(
                        f"too many requests are already waiting for key {k!r} (max_pending={lock._max_pending});"
                        " try again later",
                        key=k,
                        max_pending=lock._max_pending,
                    )
        if events is not None:
            events.append(self._event("requested", now))
        self.state = WAITING
        for k in keys:
            lock._state(k).queue[self] = None
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
        lock = self.lock
        parent = self.parent
        woken: list[_Request] = []
        with lock._guard:
            if parent is not None:
                if self.state is not GRANTED:
                    raise RuntimeError(f"released a re-entrant acquisition of {_describe(self.keys)} twice")
                self.state = RELEASED
                parent.depth -= 1
                return
            if self.depth:
                raise RuntimeError(
                    f"released {_describe(self.keys)} while a re-entrant acquisition of it is still open"
                )
            if not lock._holds(self):
                raise RuntimeError(f"released {_describe(self.keys)}, which this request does not hold")
            now = lock._clock()
            held = lock._release_locked(self, now, woken)
        lock._wake_all(woken)
        if lock._observers:
            lock._emit([self._event("released", now, held=held)])

    # ------------------------------------------------------------ asyncio

    def __aenter__(self) -> Awaitable[None]:
        # A plain function returning an awaitable: the uncontended path builds no coroutine at all.
        if self.token is not None:
            raise RuntimeError("this lock request was already used; call lock(key) again for a new one")
        # The owner: the task running this code. The shortcut (see .owner) reads the task that the loop last
        # seen running in this thread is stepping, trusted only while that loop runs here, unpatched.
        try:
            loop, ident = _owner_cache.loop_ident
            owner = _current_tasks[loop]  # type: ignore[index]
            if loop._thread_id is not ident or asyncio.Task is not _PlainTask:
                owner = _current_owner(self)
        except (AttributeError, KeyError, TypeError):  # first use in this thread, no task running there, ...
            owner = _current_owner(self)
        self.owner = owner
        lock = self.lock
        # Fast path: claim an idle key with one atomic setdefault (no guard); it stores the request itself.
        if lock._fast and lock._table.setdefault(self.key, self) is self:
            self.token = next(lock._tokens)
            if lock._timed:
                self.t_acquired = lock._clock()
            if _done_future is not None:  # (an "is" test: cheaper than the truth value of a future)
                return _done_future
            return _ready()
        return self._acquire()

    def _enter_once(self, loop: asyncio.AbstractEventLoop | None) -> bool | None:
        """One attempt to enter through the general path: True (granted), False (queued: a future on
        ``loop`` to wait for, or a ``threading.Event`` when ``loop`` is None) or None (try again)."""
        lock = self.lock
        events: list[LockEvent] | None = [] if lock._observers else None
        try:
            with lock._guard:
                done = self._enter_locked(lock._clock(), events)
                if done is False:
                    if loop is None:
                        self.event = threading.Event()
                    else:
                        self.loop = loop
                        self.future = loop.create_future()
        finally:
            if events:  # observers run outside the guard
                lock._emit(events)
        return done

    async def _acquire(self) -> None:
        self._check_unused()
        self.contended = True  # the general path: it releases through the general path too
        lock = self.lock
        loop = asyncio.get_running_loop()
        tries = 0
        while True:
            done = self._enter_once(loop)
            if done is not None:
                break
            # A holder in another thread is releasing one of the keys right now: let it finish.
            tries += 1
            if tries < 100:
                time.sleep(0)
            else:  # it never finishes (a release interrupted for good?): stay polite to this loop
                await asyncio.sleep(0.001)
        if not done:
            await self._wait_async(loop)
        if lock._max_hold is not None and self.parent is None:
            owner = self.owner
            if isinstance(owner, asyncio.Task):
                self.cancelling = owner.cancelling()
                self.hold_handle = loop.call_later(lock._max_hold, self._on_max_hold)

    async def _wait_async(self, loop: asyncio.AbstractEventLoop) -> None:
        lock = self.lock
        timeout = self._timeout()
        timer = None if timeout is None else loop.call_later(timeout, self._on_timeout)
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

    def _on_timeout(self) -> None:
        """Runs on the waiter's own loop when its timeout expires (its task has not resumed yet)."""
        lock = self.lock
        fut = self.future
        woken: list[_Request] = []
        with lock._guard:
            if self.state is not WAITING:  # granted (its wake-up is on the way) or already withdrawn
                return
            now = lock._clock()
            # Cancelled first, in this same loop iteration: the cancellation is what happened to it.
            outcome = CANCELLED if fut.cancelled() else TIMED_OUT
            lock._withdraw_locked(self, outcome, now, woken)
        waited = now - self.t_request
        if not fut.done():
            fut.set_exception(self._timeout_error(waited))
        lock._wake_all(woken)
        if lock._observers:
            lock._emit([self._event("timed_out" if outcome is TIMED_OUT else "cancelled", now, waited=waited)])

    def _after_cancel(self) -> None:
        """The waiting task was cancelled: leave the queues, or pass on keys handed over meanwhile."""
        lock = self.lock
        woken: list[_Request] = []
        with lock._guard:
            now = lock._clock()
            state = self.state
            if state is GRANTED:
                held = lock._release_locked(self, now, woken)
                events = [
                    self._event("acquired", self.t_acquired, waited=self.t_acquired - self.t_request),
                    self._event("released", now, held=held),
                ]
            elif state is WAITING:
                lock._withdraw_locked(self, CANCELLED, now, woken)
                events = [self._event("cancelled", now, waited=now - self.t_request)]
            else:  # its timer withdrew it first; the cancellation still wins for the caller
                events = []
        fut = self.future
        if fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: asyncio must not log a LockTimeout nobody will see
        lock._wake_all(woken)
        if lock._observers and events:
            lock._emit(events)

    def _on_max_hold(self) -> None:
        owner = self.owner
        if isinstance(owner, asyncio.Task) and not owner.done():
            self.hold_expired = owner.cancel(f"held {_describe(self.keys)} longer than max_hold={self.lock._max_hold:g} s")

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        # Fast path: the table still holds this request itself (nobody waited). No guard: first mark
        # ourselves exiting, then check that no waiter marked us contended (KeyedLock._hold_off does the same
        # in the other order, so one side always sees the other).
        # Not contended means: an uncontended holder no waiter has marked, so its entry is still itself.
        self.exiting = True
        if not self.contended:
            lock = self.lock
            if lock._timed:
                return self._timed_exit(exc_type, exc)
            try:
                del lock._table[self.key]
            except BaseException:  # interrupted half-way (a signal in a key's __eq__?): leave nothing behind
                self._abort_exit()
                raise
            if _done_future is not None:
                return _done_future
            return _ready()
        return self._exit(exc_type, exc)

    def _timed_exit(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> Awaitable[None]:
        """The fast release while hold times are measured: the total is added under the guard."""
        lock = self.lock
        table = lock._table
        key = self.key
        guard = lock._guard
        guard.acquire()
        try:
            if table.get(key) is self:
                del table[key]
                try:
                    lock._total_hold += lock._clock() - self.t_acquired
                except AttributeError:  # the hold began before timing started
                    pass
                return _done_future or _ready()
        finally:
            guard.release()
        return self._exit(exc_type, exc)

    def _abort_exit(self) -> None:
        """The fast release was interrupted: make sure the key is released (waiters hold off meanwhile)."""
        lock = self.lock
        with lock._guard:
            if lock._table.get(self.key) is self:
                del lock._table[self.key]

    def _exit(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> Awaitable[None]:
        """Release through the general path; a ``max_hold`` expiry becomes ``LockTimeout``, unless the owner
        was also cancelled from outside (then its ``CancelledError`` goes on, as with ``asyncio.timeout``)."""
        if self.hold_handle is not None:
            self.hold_handle.cancel()
        self._release()
        if self.hold_expired:
            self.hold_expired = False
            owner: asyncio.Task[Any] = self.owner  # type: ignore[assignment]
            if owner.uncancel() <= self.cancelling and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
                max_hold = self.lock._max_hold or 0.0
                raise LockTimeout(
                    f"held {_describe(self.keys)} longer than max_hold={max_hold:g} s; the work was cancelled "
                    "and the lock passed on",
                    keys=self.keys,
                    waited=max_hold,
                ) from exc
        return _done_future or _ready()

    # ------------------------------------------------------------ threads

    def __enter__(self) -> None:
        if _get_running_loop() is not None:
            raise RuntimeError(
                "lock.sync() was used in a thread that runs an event loop, where it would block the loop; "
                "use 'async with lock(key):' there"
            )
        self._check_unused()
        self.owner = threading.current_thread()
        self.contended = True  # the general path (see _Request.contended)
        lock = self.lock
        tries = 0
        while True:
            done = self._enter_once(None)
            if done is not None:
                break
            tries += 1  # a holder in another thread is releasing one of the keys right now: let it finish
            time.sleep(0 if tries < 100 else 0.001)
        if done:
            return
        woken: list[_Request] = []
        assert self.event is not None
        try:
            self.event.wait(self._timeout())
        except BaseException:  # e.g. KeyboardInterrupt while waiting: hold nothing, leave the queues
            with lock._guard:
                now = lock._clock()
                if self.state is GRANTED:
                    lock._release_locked(self, now, woken)
                elif self.state is WAITING:
                    lock._withdraw_locked(self, CANCELLED, now, woken)
            lock._wake_all(woken)
            raise
        with lock._guard:
            now = lock._clock()
            granted = self.state is GRANTED
            if not granted:
                lock._withdraw_locked(self, TIMED_OUT, now, woken)
        lock._wake_all(woken)
        if granted:
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


class _Requests(_Request):
    """One acquisition of several keys (``keys`` set when made): always the general path, under the guard."""

    __slots__ = ()

    def __aenter__(self) -> Awaitable[None]:
        self._check_unused()
        self.owner = _current_owner(self)
        return self._acquire()

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        return self._exit(exc_type, exc)


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


_get_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident
# The uncontended path's guard-free release relies on the GIL's one-at-a-time execution (see the module
# docstring); a free-threaded Python takes the general path for every request.
_GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
