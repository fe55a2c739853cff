"""Per-key locks: same-key callers run one at a time in arrival order, other keys in parallel.

:class:`KeyedLock` is the in-process lock (asyncio tasks on any number of loops, and threads). The
:class:`AsyncKeyLock` protocol is what :class:`~chatkit.SessionManager` and the store depend on.
"""

from __future__ import annotations

from .keyed import KeyedLock, KeyStatistics, LockEvent, LockStatistics, check_seconds
from .protocol import AsyncKeyLock, LockRequest

__all__ = ["AsyncKeyLock", "LockRequest", "KeyedLock", "KeyStatistics", "LockEvent", "LockStatistics", "check_seconds"]
