"""The records :class:`~chatkit.SessionManager` hands out: messages, turn results, statistics, and the
exception a superseded turn raises."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ..errors import TurnInterrupted

__all__ = ["ChatMessage", "ChatResult", "SessionStatistics", "TurnInterrupted", "Policy", "POLICIES"]

Policy = Literal["enqueue", "reject", "interrupt", "rollback"]
POLICIES: tuple[Policy, ...] = ("enqueue", "reject", "interrupt", "rollback")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a session's history: what the user sent and the assistant replied (tool calls without
    text and tool results are not part of it).

    Attributes:
        role: ``"user"`` or ``"assistant"``.
        content: the text.
        timestamp: when it was written (UTC), or ``None`` for a message written by other means (for
            example a raw ``graph.ainvoke`` on the session's thread).
    """

    role: Literal["user", "assistant"]
    content: str
    timestamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class ChatResult:
    """What one committed turn produced.

    Attributes:
        reply: the assistant's reply.
        session_id: the session it belongs to.
        turn: which user message of the session this was (1 for the first), counted in the session's messages.
        sources: the sources of the retrieved chunks the model was given, best match first (the state's
            ``context`` key: the built-in graph's retrieval, or a graph of your own that keeps Documents there).
        waited: seconds spent waiting for earlier turns of the same session.
        elapsed: seconds from the call to the commit, waiting included.
    """

    reply: str
    session_id: str
    turn: int = 0
    sources: tuple[str, ...] = ()
    waited: float = 0.0
    elapsed: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A snapshot of a :class:`~chatkit.SessionManager`: live state, then totals since it was made.

    Attributes:
        sessions: sessions this manager knows of (created, used or listed by it, or read from the
            checkpointer for ``max_sessions``) and has not seen expire; ``await list_sessions()`` reads the
            checkpointer itself.
        running: turns holding their session's lock now.
        waiting: turns queued behind another turn of their session now.
        completed: turns committed (user message and reply saved together).
        failed: turns whose graph (model, tool, retriever) raised; nothing was saved.
        timed_out: turns that exceeded ``turn_timeout``; nothing was saved.
        cancelled: turns whose caller went away; nothing was saved.
        interrupted: turns superseded by a newer message with policy ``"interrupt"`` or ``"rollback"``.
        rejected: messages refused at once with :class:`~chatkit.SessionBusy` (policy ``"reject"``).
        lock_timeouts: messages that waited longer than ``lock_timeout``.
        refused: turns not saved because a fenced checkpointer refused their commit
            (:class:`~chatkit.StaleCommit`: another writer committed first, or this worker lost the
            session's lock) or the lock was lost before the commit (:class:`~chatkit.LockLost`).
        created: sessions created.
        deleted: sessions deleted with :meth:`~chatkit.SessionManager.delete_session`.
        expired: sessions this manager found expired (idle too long, or beyond ``max_sessions``).
    """

    sessions: int
    running: int
    waiting: int
    completed: int
    failed: int
    timed_out: int
    cancelled: int
    interrupted: int
    rejected: int
    lock_timeouts: int
    refused: int
    created: int
    deleted: int
    expired: int
