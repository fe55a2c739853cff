"""Per-key locks: same-key callers run one at a time in arrival order, other keys in parallel.

:class:`KeyedLock` is the in-process lock (asyncio tasks on any number of loops, and threads);
``RedisKeyedLock`` is the same interface across processes and hosts, on Redis (it needs
``chatkit[distributed]``). The :class:`AsyncKeyLock` protocol is what :class:`~chatkit.SessionManager` depends on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .keyed import KeyedLock, KeyStatistics, LockEvent, LockStatistics, check_seconds
from .protocol import AsyncKeyLock, LockRequest

__all__ = [
    "AsyncKeyLock",
    "LockRequest",
    "KeyedLock",
    "KeyStatistics",
    "LockEvent",
    "LockStatistics",
    "check_seconds",
    "RedisKeyedLock",
    "RedisKeyStatus",
]

_LAZY = {"RedisKeyedLock", "RedisKeyStatus"}  # chatkit.locks.redis: loads only when named


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'chatkit.locks' has no attribute {name!r}")
    from . import redis

    value = getattr(redis, name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .redis import RedisKeyedLock, RedisKeyStatus
