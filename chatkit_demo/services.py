"""The app-wide services behind the UI: :class:`DemoServices` (embeddings, knowledge base, sessions)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import chatkit

from .binding import SessionBinder
from .config import ALLOWED_SUFFIXES, LOCK_TIMEOUT, MAX_SESSIONS, SESSION_TTL, DemoConfig
from .inputs import UploadRejected, read_upload

logger = logging.getLogger("chatkit.demo")


# ------------------------------------------------------------------------------------------ services
class _Burst:
    """Model latency for the turns of one double-texting burst.

    A turn's model call signals that it started, then waits until every message of the burst has been
    sent, then ``seconds``: so the first reply can never finish before the last message arrived, however
    slow the machine, and each policy shows its behaviour on every run.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.all_sent = asyncio.Event()
        self._started: dict[str, asyncio.Event] = {}

    def started(self, text: str) -> asyncio.Event:
        return self._started.setdefault(text, asyncio.Event())

    async def latency(self, text: str) -> float:
        self.started(text).set()
        await self.all_sent.wait()
        return self.seconds


# The burst a turn belongs to. A ContextVar, not a global: it is set only in the task that sends a burst
# (the turns it starts inherit it), so every other visitor's turns keep the normal latency.
_BURST: contextvars.ContextVar[_Burst | None] = contextvars.ContextVar("demo_burst", default=None)


class DemoServices:
    """The app-wide services behind the UI: embeddings, the knowledge base, the session manager.

    Created cheaply; the heavy parts (the embedding model, indexing ``data_dir``) load on the first
    ``await services.ready()``, once, whichever event loop or thread asks first.

    Example:
        >>> services = DemoServices(DemoConfig(embeddings="hash", data_dir=None))
        >>> services
        <DemoServices embeddings='hash' ready=False>
    """

    def __init__(self, config: DemoConfig | None = None, *, embeddings: Any = None) -> None:
        """``embeddings``: a ready LangChain ``Embeddings`` that overrides ``config.embeddings`` (tests)."""
        self.config = config if config is not None else DemoConfig.from_env()
        self._embeddings = embeddings
        self._init_lock = chatkit.KeyedLock()
        self._ready = False
        self.store: Any = None
        self.manager: Any = None
        self.binder = SessionBinder(create=self._create_session)
        self.loaded_sources: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<DemoServices embeddings={self.config.embeddings!r} ready={self._ready}>"

    @property
    def is_ready(self) -> bool:
        return self._ready

    async def _create_session(self) -> str:
        if self.manager is None:
            raise RuntimeError("DemoServices.ready() must be awaited before sessions are created")
        return str(await self.manager.create_session())

    def _latency(self, text: str) -> float | Awaitable[float]:
        """The extractive model's latency: normal, or held and slow for the turns of a double-texting burst."""
        burst = _BURST.get()
        return self.config.latency if burst is None else burst.latency(text)

    def _build_embeddings(self) -> Any:
        if self._embeddings is not None:
            return self._embeddings
        if self.config.embeddings == "hash":
            return chatkit.HashEmbeddings()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        return chatkit.default_embeddings()

    def _build_model(self) -> Any:
        if self.config.model_dir is not None:
            return chatkit.load_local_chat_model(self.config.model_dir)
        return chatkit.ExtractiveChatModel(latency=self._latency)

    async def ready(self) -> DemoServices:
        """Load the model and the knowledge base once; later calls return at once."""
        if self._ready:
            return self
        async with self._init_lock("init"):
            if self._ready:
                return self
            embeddings = await asyncio.to_thread(self._build_embeddings)
            model = await asyncio.to_thread(self._build_model)
            store = chatkit.CowVectorStore(embeddings, progress=False)
            documents: dict[str, str] = {}
            if self.config.data_dir is not None:
                for path in sorted(Path(self.config.data_dir).iterdir()):
                    if not path.is_file() or path.suffix.lower() not in ALLOWED_SUFFIXES:
                        continue
                    if path.name.lower() == "readme.md":  # describes the corpus; not part of it
                        continue
                    try:
                        name, text = read_upload(path, max_bytes=10 * 1024 * 1024)
                    except UploadRejected as exc:
                        logger.warning("skipping a knowledge-base file: %s", exc)
                        continue
                    documents[name] = text
            if documents:
                await store.aadd_sources(documents)  # one atomic publish
            self.store = store
            self.loaded_sources = tuple(documents)
            self.manager = chatkit.SessionManager(
                model=model,
                store=store,
                max_message_chars=self.config.max_message_chars,
                lock_timeout=LOCK_TIMEOUT,
                session_ttl=SESSION_TTL,
                max_sessions=MAX_SESSIONS,
            )
            self._ready = True
            logger.info("demo ready: %d documents indexed", len(documents))
        return self
