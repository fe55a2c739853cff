"""Lock-protected chat sessions on LangGraph: :class:`SessionManager` and the records it hands out.

Modules: ``manager`` (the turn), ``graph`` (the built-in graph; checks of your own), ``sandbox`` (how a turn
is computed without writing, and the checkpoints a commit writes), ``threads`` (sessions as threads of the
checkpointer; the commit seam), ``pruning`` (old checkpoints), ``registry`` (what a manager keeps in memory),
``queue`` (a session's turns in arrival order), ``coordination`` (busy checks and supersede requests across
processes, chosen from the lock), ``fencing`` (checkpoint savers that refuse stale writes; the SQL ones in
``_fenced_sql``), ``validate`` (messages, ids, configs), ``types`` (the records).
"""

from __future__ import annotations

from .manager import SessionManager
from .types import ChatMessage, ChatResult, SessionStatistics, TurnInterrupted

__all__ = ["SessionManager", "ChatResult", "ChatMessage", "SessionStatistics", "TurnInterrupted"]
