"""Exceptions raised by chatkit.

Misuse raises built-in exceptions (``TypeError``, ``ValueError``, ``RuntimeError``);
the named exceptions below describe conditions a correct program must handle.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

__all__ = [
    "ChatkitError",
    "LockTimeout",
    "LockQueueFull",
    "SessionNotFound",
    "SessionBusy",
    "TurnInterrupted",
    "DirectoryLocked",
    "LockLost",
    "LockServerUnavailable",
    "StaleCommit",
]


class ChatkitError(Exception):
    """Base class of chatkit's own exceptions."""


class LockTimeout(ChatkitError, TimeoutError):
    """A caller waited longer than its timeout for a lock, or held it longer than ``max_hold``.

    Attributes:
        keys: the keys the caller asked for.
        waited: seconds spent waiting (or holding, for ``max_hold``).
    """

    def __init__(self, message: str, *, keys: tuple[Hashable, ...] = (), waited: float = 0.0) -> None:
        super().__init__(message)
        self.keys = keys
        self.waited = waited


class LockQueueFull(ChatkitError):
    """A key already has ``max_pending`` live waiters; the caller was turned away at once.

    Attributes:
        key: the key whose queue is full.
        max_pending: the configured limit.
    """

    def __init__(self, message: str, *, key: Hashable = None, max_pending: int = 0) -> None:
        super().__init__(message)
        self.key = key
        self.max_pending = max_pending


class SessionNotFound(ChatkitError, LookupError):
    """No session has this id (it never existed, was deleted, expired, or is malformed)."""

    def __init__(self, session_id: object) -> None:
        super().__init__(f"no chat session with id {session_id!r}")
        self.session_id = session_id

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a KeyError
        return str(self.args[0])


class SessionBusy(ChatkitError):
    """The session already has a turn running or queued and the policy is ``"reject"``."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is busy with another message; "
            "wait for the reply before sending the next one (policy 'reject')"
        )
        self.session_id = session_id


class TurnInterrupted(ChatkitError):
    """A newer message on the same session superseded this one (policy ``"interrupt"`` or ``"rollback"``).

    With ``"interrupt"`` a turn that had started keeps its user message in the history (without a reply);
    with ``"rollback"``, and for turns that were still queued, nothing of it is kept.

    Attributes:
        session_id: the session.
        policy: ``"interrupt"`` or ``"rollback"``.
        kept_message: whether this turn's user message stayed in the history.
    """

    def __init__(self, session_id: str, policy: str, *, kept_message: bool) -> None:
        kept = "its message was kept without a reply" if kept_message else "nothing of it was kept"
        super().__init__(
            f"a newer message on session {session_id!r} superseded this one (policy {policy!r}); {kept}"
        )
        self.session_id = session_id
        self.policy = policy
        self.kept_message = kept_message


class DirectoryLocked(ChatkitError, TimeoutError):
    """Another writer holds the store directory (a directory has one writer at a time).

    Attributes:
        directory: the store directory.
        holder: what the current writer wrote into the lock file (its pid and host), or ``""``.
        waited: seconds spent waiting for it (``lock_timeout``).
    """

    def __init__(self, directory: Path, *, holder: str = "", waited: float = 0.0) -> None:
        who = f" ({holder})" if holder else ""
        super().__init__(
            f"{directory} has a writer already{who}; a store directory has one writer at a time: close that "
            "store, pass lock_timeout= to wait for it, or open the directory read-only with CowVectorStore.load()"
        )
        self.directory = directory
        self.holder = holder
        self.waited = waited


class LockLost(ChatkitError):
    """A cross-process lock (:class:`~chatkit.RedisKeyedLock`) no longer holds, or waits for, these keys.

    Its lease ran out before it was renewed (the process was paused, or cut off from Redis), or the Redis
    server lost the lock's records (restarted without persistence, flushed): another caller may hold the
    keys now. A holder's block is cancelled and its ``async with`` raises this; a waiter's wait raises it.
    Work done under the lock should be committed through a fenced store (see
    :func:`chatkit.sessions.fencing.fence`), which refuses the lost holder's writes.

    Attributes:
        keys: the keys of the request.
        url: the Redis server (password hidden).
        held: whether the request held the keys (``False``: it lost its place in the queue).
    """

    def __init__(self, message: str, *, keys: tuple[Hashable, ...] = (), url: str = "", held: bool = True) -> None:
        super().__init__(message)
        self.keys = keys
        self.url = url
        self.held = held


class LockServerUnavailable(ChatkitError, ConnectionError):
    """The lock's Redis server could not be reached (refused, timed out, or the connection broke).

    Attributes:
        url: the Redis server (password hidden).
    """

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class StaleCommit(ChatkitError):
    """A fenced checkpoint saver refused a write that would have lost or overwritten someone else's.

    The write's fencing token is older than the newest one its thread has seen (a newer lock holder has
    written since: this writer lost its lock), or the thread's head is no longer the checkpoint the
    write was computed from (another writer committed first). Nothing of the refused write is stored;
    every committed checkpoint stays.

    Attributes:
        thread_id: the thread.
        reason: ``"token"`` or ``"head"`` (or ``"order"``: the new checkpoint's id does not sort after
            the head, so it would not become the latest).
        token: the write's fencing token (``None``: it carried none).
        newest_token: the newest token the thread had seen.
        expected: the checkpoint id the write expected as the head (``None``: no checkpoint).
        head: the thread's actual head (``None``: no checkpoint).
    """

    def __init__(
        self,
        message: str,
        *,
        thread_id: str = "",
        reason: str = "head",
        token: int | None = None,
        newest_token: int | None = None,
        expected: str | None = None,
        head: str | None = None,
    ) -> None:
        super().__init__(message)
        self.thread_id = thread_id
        self.reason = reason
        self.token = token
        self.newest_token = newest_token
        self.expected = expected
        self.head = head
