"""What one :class:`~chatkit.SessionManager` keeps in memory: work in flight, a cache of sessions, counters.

The registry holds no history and nothing that decides whether a session exists (that is the
checkpointer's, see :mod:`chatkit.sessions.threads`). It holds:

* ``live``: per session id, the turns and deletions in flight, in arrival order: the queue that keeps a
  session's turns in that order (a turn joins the lock's queue only after every earlier one did).
* ``sessions``: a cache of when the sessions this manager has seen were last used (least recently used
  first), for ``max_sessions`` and :meth:`~chatkit.SessionManager.statistics`.
* ``tombstones``: sessions found expired (or evicted by ``max_sessions``) whose threads are still to be
  deleted, with when they were last used at that moment; readers treat them as gone.
* the manager's counters.

Every field is guarded by ``guard``, a ``threading.Lock`` (a manager may serve several event loops), held
only for short, non-awaiting sections.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Registry", "InFlight", "COUNTERS", "WAITING", "DONE"]

logger = logging.getLogger(__name__)

WAITING, DONE = "waiting", "done"  # entry states the census needs (see chatkit.sessions.manager for the others)

COUNTERS = (
    "completed",
    "failed",
    "timed_out",
    "cancelled",
    "interrupted",
    "rejected",
    "lock_timeouts",
    "refused",
    "created",
    "deleted",
    "expired",
)


@dataclass(slots=True)
class InFlight:
    """What is in flight on one session id: its turns and deletions, in arrival order."""

    entries: list[Any] = field(default_factory=list)

    def turns(self) -> list[Any]:
        """The entries that are turns (not deletions)."""
        return [e for e in self.entries if e.kind == "turn"]


class Registry:
    """Work in flight, the session cache, tombstones and counters of one manager.

    Example:
        >>> reg = Registry(ttl=60.0, max_sessions=None)
        >>> with reg.guard:
        ...     reg.learn("a", 0.0); reg.learn("b", 30.0)
        ...     reg.sweep(now=70.0)
        ['a']
        >>> sorted(reg.sessions), sorted(reg.tombstones)
        (['b'], ['a'])
    """

    def __init__(self, *, ttl: float | None, max_sessions: int | None) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.guard = threading.Lock()
        self.sessions: OrderedDict[str, float] = OrderedDict()  # session id -> last used; LRU first
        self.loaded = False  # whether a scan of the checkpointer filled ``sessions``
        self.live: dict[str, InFlight] = {}  # absent when nothing is in flight
        self.tombstones: dict[str, float] = {}  # session id -> last used when it was found gone
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def __repr__(self) -> str:
        return f"<Registry sessions={len(self.sessions)} busy={len(self.live)} tombstones={len(self.tombstones)}>"

    # All methods below: guard held.

    def learn(self, session_id: str, last_used: float) -> None:
        """Record that the session exists and was last used at ``last_used``."""
        sessions = self.sessions
        old = sessions.pop(session_id, None)
        if old is not None and old > last_used:
            last_used = old
        newest = sessions[next(reversed(sessions))] if sessions else None
        sessions[session_id] = last_used  # appended: the most recently used, unless older than the newest
        if newest is not None and newest > last_used:
            self._resort()

    def replace(self, known: Iterable[tuple[str, float]]) -> None:
        """A scan of the checkpointer: these are the sessions (in flight ones are kept too)."""
        fresh = dict(known)
        for session_id in self.live:
            if session_id in self.sessions and session_id not in fresh:
                fresh[session_id] = self.sessions[session_id]
        self.sessions = OrderedDict(sorted(fresh.items(), key=lambda kv: kv[1]))
        self.loaded = True

    def _resort(self) -> None:
        self.sessions = OrderedDict(sorted(self.sessions.items(), key=lambda kv: kv[1]))

    def forget(self, session_id: str) -> None:
        """The session is gone (deleted, or its thread was purged)."""
        self.sessions.pop(session_id, None)

    def is_alive(self, session_id: str, last_used: float, now: float) -> bool:
        """Whether a session last used at ``last_used`` still exists at ``now``: in flight, or not idle
        ``ttl`` seconds and not tombstoned since."""
        if session_id in self.live:
            return True
        if self.ttl is not None and last_used + self.ttl <= now:
            return False
        mark = self.tombstones.get(session_id)
        return mark is None or last_used > mark

    def bury(self, session_id: str, last_used: float) -> bool:
        """Mark the session gone (its thread is to be deleted); whether it was not marked already."""
        self.sessions.pop(session_id, None)
        if self.tombstones.get(session_id, float("-inf")) >= last_used:
            return False
        self.tombstones[session_id] = last_used
        self.counts["expired"] += 1
        return True

    def in_flight(self, session_id: str) -> InFlight:
        """The session id's in-flight record, created if needed."""
        live = self.live.get(session_id)
        if live is None:
            live = self.live[session_id] = InFlight()
        return live

    def forget_if_idle(self, session_id: str, live: InFlight) -> None:
        """Drop the in-flight record of a session id with nothing in flight any more."""
        if not live.entries and self.live.get(session_id) is live:
            del self.live[session_id]

    def census(self) -> tuple[int, int]:
        """(turns running, turns waiting for their session)."""
        running = waiting = 0
        for live in self.live.values():
            for entry in live.entries:
                if entry.kind != "turn":
                    continue
                if entry.state == WAITING:
                    waiting += 1
                elif entry.state != DONE:
                    running += 1
        return running, waiting

    def sweep(self, now: float, keep: str | None = None) -> list[str]:
        """Bury the cached sessions that expired by ``now`` and return their ids.

        A session expires when idle ``ttl`` seconds, or when there are more than ``max_sessions`` and it is
        among the least recently used idle ones; ``keep`` (the session being created) is never removed to
        make room. A session with anything in flight never expires. O(1) when nothing expires.
        """
        ttl, limit = self.ttl, self.max_sessions
        if ttl is None and limit is None:
            return []
        sessions = self.sessions
        expired: list[tuple[str, float]] = []
        if ttl is not None:
            for sid, last_used in sessions.items():  # least recently used first
                if last_used + ttl > now:
                    break
                if sid not in self.live:
                    expired.append((sid, last_used))
        if limit is not None and len(sessions) - len(expired) > limit:
            excess = len(sessions) - len(expired) - limit
            gone = {sid for sid, _ in expired}
            for sid, last_used in sessions.items():
                if excess == 0:
                    break
                if sid not in gone and sid not in self.live and sid != keep:
                    expired.append((sid, last_used))
                    excess -= 1
        buried = [sid for sid, last_used in expired if self.bury(sid, last_used)]
        if buried:
            logger.debug("expired %d idle sessions", len(buried))
        return buried
