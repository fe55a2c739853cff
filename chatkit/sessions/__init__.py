"""Lock-protected chat sessions on LangGraph: :class:`SessionManager` and the records it hands out."""

from __future__ import annotations

from .manager import SessionManager
from .types import ChatMessage, ChatResult, SessionStatistics, TurnInterrupted

__all__ = ["SessionManager", "ChatResult", "ChatMessage", "SessionStatistics", "TurnInterrupted"]
