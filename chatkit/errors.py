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
