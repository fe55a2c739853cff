"""The small lock protocol that :class:`~chatkit.SessionManager` depends on (its ``lock=``).

Any lock of this shape works with it: the in-process :class:`~chatkit.KeyedLock` and the cross-process
``RedisKeyedLock`` both implement it. The protocol is structural (``typing.Protocol``): nothing needs to
inherit from it.

* ``lock(key, *more, timeout=..., label=None)`` returns a :class:`LockRequest`, an async context manager
  that holds every key for the duration of the block (several keys are taken atomically, without
  deadlock). Entering it may raise :class:`~chatkit.LockTimeout` or :class:`~chatkit.LockQueueFull`.
* A request belongs to the task that entered it. That task asking again for a key it holds is re-entry
  (refused with ``RuntimeError``, or nested with ``reentrant=True``); any other task waits its turn.
* ``request.token`` is ``None`` before entry; after entry it is the acquisition's *fencing token*: an
  ``int`` that grows with every acquisition of the same key (a store that remembers the highest token it
  has seen can refuse writes from a holder whose token is older), or ``None`` for a lock that issues none.
* ``await lock.run(keys, fn, *args)`` runs ``fn`` holding ``keys``.
* ``add_observer(fn)`` / ``remove_observer(fn)``: ``fn`` receives every :class:`~chatkit.LockEvent`.

Example:
    >>> from chatkit import KeyedLock
    >>> from chatkit.locks import AsyncKeyLock
    >>> isinstance(KeyedLock(), AsyncKeyLock)
    True
    >>> from chatkit.locks import LockRequest
    >>> request = KeyedLock()("session-1")
    >>> isinstance(request, LockRequest), request.token
    (True, None)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

from .keyed import LockEvent

__all__ = ["AsyncKeyLock", "LockRequest"]

T = TypeVar("T")


@runtime_checkable
class LockRequest(Protocol):
    """One acquisition: an async context manager holding its keys for the duration of the block.

    Owned by the task that enters it; ``token`` is ``None`` until then.
    """

    @property
    def keys(self) -> tuple[Hashable, ...]:
        """The keys of the request, de-duplicated, in the order given."""
        ...

    @property
    def token(self) -> int | None:
        """The fencing token of this acquisition once entered (``None``: the lock issues none)."""
        ...

    def __aenter__(self) -> Awaitable[Any]: ...

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[Any]: ...


@runtime_checkable
class AsyncKeyLock(Protocol):
    """A per-key lock usable as ``async with lock(key):`` (see the module docstring for the contract)."""

    def __call__(self, key: Hashable = ..., /, *more: Hashable, timeout: float | None = ..., label: str | None = None) -> LockRequest: ...

    async def run(
        self,
        keys: Hashable | list[Hashable],
        fn: Callable[..., T | Awaitable[T]],
        *args: Any,
        timeout: float | None = ...,
        label: str | None = None,
        **kwargs: Any,
    ) -> T: ...

    def add_observer(self, observer: Callable[[LockEvent], object]) -> None: ...

    def remove_observer(self, observer: Callable[[LockEvent], object]) -> None: ...
