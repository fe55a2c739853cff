"""Which chat sessions exist, what is in flight on each, and which idle sessions expire.

The registry holds no history (that is the checkpointer's), only bookkeeping. Every field is guarded by
``guard``, a ``threading.Lock`` (a :class:`~chatkit.SessionManager` may serve several event loops), held
only for short, non-awaiting sections.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Registry", "SessionRecord", "InFlight", "COUNTERS", "WAITING", "DONE"]

logger = logging.getLogger(__name__)

WAITING, DONE = "waiting", "done"  # turn states the census needs (see chatkit.sessions for the others)

COUNTERS = (
    "completed",
    "failed",
    "timed_out",
    "cancelled",
    "interrupted",
    "rejected",
    "lock_timeouts",
    "created",
    "deleted",
    "expired",
)


@dataclass(slots=True)
class SessionRecord:
    """The session exists; when it was created and last used (on the manager's clock)."""

    created: float
    last_used: float
    turns: int = 0


@dataclass(slots=True)
class InFlight:
    """What is in flight on one session id: its turns (running or queued, in arrival order), deletions."""

    turns: list[Any] = field(default_factory=list)
    others: int = 0


class Registry:
    """Sessions (least recently used first), work in flight, removed sessions whose thread is still to be
    deleted (``tombstones``), and the manager's counters.

    Example:
        >>> reg = Registry(ttl=60.0, max_sessions=None)
        >>> with reg.guard:
        ...     reg.add("a", now=0.0); reg.add("b", now=30.0)
        ...     reg.sweep(now=70.0)
        ['a']
        >>> sorted(reg.sessions), sorted(reg.tombstones)
        (['b'], ['a'])
    """

    def __init__(self, *, ttl: float | None, max_sessions: int | None) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.guard = threading.Lock()
        self.sessions: OrderedDict[str, SessionRecord] = OrderedDict()
        self.live: dict[str, InFlight] = {}  # absent when nothing is in flight
        self.tombstones: set[str] = set()
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def __repr__(self) -> str:
        return f"<Registry sessions={len(self.sessions)} busy={len(self.live)} tombstones={len(self.tombstones)}>"

    # All methods below: guard held.

    def add(self, session_id: str, now: float) -> None:
        """Register a new session as the most recently used."""
        self.sessions[session_id] = SessionRecord(created=now, last_used=now)
        self.counts["created"] += 1

    def touch(self, session_id: str, now: float) -> SessionRecord | None:
        """Mark the session used now (most recently used); ``None`` if it does not exist."""
        record = self.sessions.get(session_id)
        if record is not None:
            record.last_used = now
            self.sessions.move_to_end(session_id)
        return record

    def in_flight(self, session_id: str) -> InFlight:
        """The session id's in-flight record, created if needed."""
        live = self.live.get(session_id)
        if live is None:
            live = self.live[session_id] = InFlight()
        return live

    def forget_if_idle(self, session_id: str, live: InFlight) -> None:
        """Drop the in-flight record of a session id with nothing in flight any more."""
        if not live.turns and not live.others and self.live.get(session_id) is live:
            del self.live[session_id]

    def census(self) -> tuple[int, int]:
        """(turns running, turns waiting for their session's lock)."""
        running = waiting = 0
        for live in self.live.values():
            for turn in live.turns:
                if turn.state == WAITING:
                    waiting += 1
                elif turn.state != DONE:
                    running += 1
        return running, waiting

    def sweep(self, now: float, keep: str | None = None) -> list[str]:
        """Remove expired idle sessions and return their ids (their threads become tombstones).

        A session expires when idle ``ttl`` seconds, or when there are more than ``max_sessions`` and it is
        among the least recently used idle ones; ``keep`` (the session being created or used) is never
        removed to make room. A session with anything in flight never expires. O(1) when nothing expires.
        """
        ttl, limit = self.ttl, self.max_sessions
        if ttl is None and limit is None:
            return []
        sessions = self.sessions
        expired: list[str] = []
        if ttl is not None:
            for sid, record in sessions.items():  # least recently used first
                if record.last_used + ttl > now:
                    break
                if sid not in self.live:
                    expired.append(sid)
        if limit is not None and len(sessions) - len(expired) > limit:
            excess = len(sessions) - len(expired) - limit
            gone = set(expired)
            for sid in sessions:
                if excess == 0:
                    break
                if sid not in gone and sid not in self.live and sid != keep:
                    expired.append(sid)
                    excess -= 1
        for sid in expired:
            del sessions[sid]
            self.tombstones.add(sid)
        if expired:
            self.counts["expired"] += len(expired)
            logger.debug("expired %d idle sessions", len(expired))
        return expired
