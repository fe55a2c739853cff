"""chatkit: chatbots that stay correct under concurrency.

``import chatkit`` is light: the lock, the timeline and the exceptions load at once; everything that
needs LangChain, LangGraph, faiss, torch or Gradio loads on first use of its name.

Example:
    >>> import asyncio, chatkit
    >>> lock = chatkit.KeyedLock(timeout=5)
    >>> async def main():
    ...     async with lock("session-1"):
    ...         return lock.is_busy("session-1")
    >>> asyncio.run(main())
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ChatkitError,
    DirectoryLocked,
    LockLost,
    LockQueueFull,
    LockServerUnavailable,
    LockTimeout,
    SessionBusy,
    SessionNotFound,
    StaleCommit,
    TurnInterrupted,
)
from .locks import KeyedLock, KeyStatistics, LockEvent, LockStatistics
from .timeline import Timeline, TimelineRow

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY: dict[str, str] = {
    "CowVectorStore": "chatkit.store",
    "StoreSnapshot": "chatkit.store",
    "DocumentRecord": "chatkit.store",
    "StoreStatistics": "chatkit.store",
    "CompactionResult": "chatkit.store",
    "NaiveVectorStore": "chatkit.store",
    "SavedVersion": "chatkit.store",
    "HashEmbeddings": "chatkit.embeddings",
    "default_embeddings": "chatkit.embeddings",
    "ExtractiveChatModel": "chatkit.models",
    "load_local_chat_model": "chatkit.models",
    "SessionManager": "chatkit.sessions",
    "ChatResult": "chatkit.sessions",
    "ChatMessage": "chatkit.sessions",
    "SessionStatistics": "chatkit.sessions",
    "run": "chatkit.runner",
    "experiments": "chatkit.experiments",
    "embedding_lab": "chatkit.embedding_lab",
    "RedisKeyedLock": "chatkit.locks",
    "FencedInMemorySaver": "chatkit.sessions.fencing",
    "FencedSqliteSaver": "chatkit.sessions.fencing",
    "FencedPostgresSaver": "chatkit.sessions.fencing",
    "fence": "chatkit.sessions.fencing",
}

__all__ = [
    "ChatkitError",
    "DirectoryLocked",
    "LockQueueFull",
    "LockTimeout",
    "SessionBusy",
    "SessionNotFound",
    "TurnInterrupted",
    "LockLost",
    "LockServerUnavailable",
    "StaleCommit",
    "KeyedLock",
    "KeyStatistics",
    "LockEvent",
    "LockStatistics",
    "Timeline",
    "TimelineRow",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chatkit' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import embedding_lab, experiments
    from .embeddings import HashEmbeddings, default_embeddings
    from .models import ExtractiveChatModel, load_local_chat_model
    from .store import NaiveVectorStore
    from .runner import run
    from .locks import RedisKeyedLock
    from .sessions import ChatMessage, ChatResult, SessionManager, SessionStatistics
    from .sessions.fencing import FencedInMemorySaver, FencedPostgresSaver, FencedSqliteSaver, fence
    from .store import CompactionResult, CowVectorStore, DocumentRecord, SavedVersion, StoreSnapshot, StoreStatistics
