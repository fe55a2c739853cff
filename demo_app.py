"""chatkit's multi-user Gradio demo: chat, a race lab and a live knowledge base, correct under concurrency.

Run it::

    python demo_app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS]
                       [--model DIR] [--data DIR] [--embeddings minilm|hash] [--latency SECONDS]
                       [--chat-concurrency N]

Design (see docs/readme/demo.md):

* ``demo`` is built at module level and launched only under ``__main__``; building it loads nothing
  heavy. The embedding model, the knowledge base and the :class:`chatkit.SessionManager` are created on
  first use by :class:`DemoServices` (app-wide services, like a database: never per-user globals).
* Every browser session (Gradio's ``session_hash``, plus the login name under ``--auth``) gets its own
  chatkit session, created on its first message and bound to it in :class:`SessionBinder`. Chat
  history lives in the ``SessionManager`` (LangGraph checkpoints), never only in ``gr.State``. A session
  id sent by a client is only ever accepted after a binding check; foreign ids are refused.
* Events have generous concurrency limits so different sessions run in parallel; the turns of one
  session are serialized by chatkit's per-session lock, not by Gradio's queue.
* The handlers are plain (async) methods of :class:`DemoHandlers`; tests call them directly with a
  ``gr.Request(session_hash=...)``.
"""

from __future__ import annotations

import os

# Gradio reads this at import time; without it it tries to reach its analytics server.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import asyncio
import contextvars
import dataclasses
import logging
import sys
import threading
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Literal

import gradio as gr

import chatkit

__all__ = [
    "DemoConfig",
    "DemoServices",
    "DemoHandlers",
    "EXPERIMENTS",
    "KnowledgeHandlers",
    "RaceLabHandlers",
    "SessionBinder",
    "UploadRejected",
    "build_demo",
    "demo",
    "main",
    "parse_args",
    "read_upload",
    "validate_message",
]

logger = logging.getLogger("chatkit.demo")

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / "data"
POLICIES: tuple[str, ...] = ("enqueue", "reject", "interrupt", "rollback")
LOCK_TIMEOUT = 60.0  # seconds a message may wait for the earlier turns of its session
SESSION_TTL = 2 * 3600.0  # idle chat sessions expire after this many seconds...
MAX_SESSIONS = 10_000  # ...or when there are more than this many (least recently used first)
ALLOWED_SUFFIXES: tuple[str, ...] = (".md", ".txt")
MAX_FILES_PER_UPLOAD = 20
EmbeddingsChoice = Literal["minilm", "hash"]

POLICY_HELP: dict[str, str] = {
    "enqueue": "**enqueue** (default): messages wait in line and are answered one by one, in order; "
    "each answer sees every earlier message.",
    "reject": "**reject**: while a message is being answered, new ones are refused at once "
    "(`SessionBusy`); nothing is stored for them.",
    "interrupt": "**interrupt**: a new message cancels the answer in progress; the interrupted "
    "message stays in the history (without a reply) and the new answer sees it.",
    "rollback": "**rollback**: a new message cancels the answer in progress and discards that turn "
    "entirely; only the newest message is answered.",
}


# --------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True, slots=True)
class DemoConfig:
    """Everything the demo needs to start; immutable, shared by all visitors.

    Attributes:
        data_dir: markdown/text files indexed at start-up (``None``: start with an empty knowledge base).
        model_dir: a local Hugging Face causal-LM directory for :func:`chatkit.load_local_chat_model`;
            ``None`` uses the offline :class:`chatkit.ExtractiveChatModel`.
        embeddings: ``"minilm"`` (the local all-MiniLM-L6-v2, the default) or ``"hash"`` (fast,
            deterministic :class:`chatkit.HashEmbeddings`, for tests).
        latency: seconds the extractive model "thinks" per reply (0 = as fast as possible).
        burst_latency: seconds per reply for the double-texting control, so that its messages overlap.
        max_message_chars: longest accepted chat message.
        max_upload_bytes: largest accepted knowledge-base file.
        max_burst: most messages the double-texting control sends at once.

    Example:
        >>> DemoConfig(embeddings="hash").embeddings
        'hash'
        >>> DemoConfig(max_burst=0)
        Traceback (most recent call last):
        ...
        ValueError: max_burst must be >= 1, got 0
    """

    data_dir: Path | None = DEFAULT_DATA_DIR
    model_dir: Path | None = None
    embeddings: EmbeddingsChoice = "minilm"
    latency: float = 0.0
    burst_latency: float = 0.6
    max_message_chars: int = 2000
    max_upload_bytes: int = 512 * 1024
    max_burst: int = 5

    def __post_init__(self) -> None:
        if self.embeddings not in ("minilm", "hash"):
            raise ValueError(f"embeddings must be 'minilm' or 'hash', got {self.embeddings!r}")
        for name in ("latency", "burst_latency"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        for name in ("max_message_chars", "max_upload_bytes", "max_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls) -> DemoConfig:
        """Defaults, overridden by ``CHATKIT_DEMO_EMBEDDINGS``, ``CHATKIT_DEMO_DATA`` and
        ``CHATKIT_DEMO_LATENCY`` (used by the module-level ``demo`` and by tests)."""
        kwargs: dict[str, Any] = {}
        if emb := os.environ.get("CHATKIT_DEMO_EMBEDDINGS"):
            kwargs["embeddings"] = emb
        if data := os.environ.get("CHATKIT_DEMO_DATA"):
            kwargs["data_dir"] = None if data == "-" else Path(data)
        if latency := os.environ.get("CHATKIT_DEMO_LATENCY"):
            kwargs["latency"] = float(latency)
        return cls(**kwargs)


# ------------------------------------------------------------------------------------ input checks
class UploadRejected(ValueError):
    """A knowledge-base upload that can't be indexed; the message says why, for the UI."""


def validate_message(message: object, *, max_chars: int) -> str:
    """Return the message stripped, or raise ``ValueError`` with a sentence a person understands.

    >>> validate_message("  hi ", max_chars=10)
    'hi'
    >>> validate_message("   ", max_chars=10)
    Traceback (most recent call last):
    ...
    ValueError: The message is empty: type something first.
    """
    if not isinstance(message, str):
        raise ValueError(f"The message must be text, got {type(message).__name__}.")
    text = message.strip()
    if not text:
        raise ValueError("The message is empty: type something first.")
    if len(text) > max_chars:
        raise ValueError(
            f"The message is too long: {len(text):,} characters, the limit is {max_chars:,}. "
            "Shorten it and send it again."
        )
    return text


def read_upload(path: str | Path, *, max_bytes: int) -> tuple[str, str]:
    """Read one uploaded knowledge-base file: returns ``(source name, text)``.

    Raises:
        UploadRejected: wrong type (not ``.md``/``.txt``), larger than ``max_bytes``, empty, or not UTF-8.
    """
    path = Path(path)
    name = path.name
    if path.suffix.lower() not in ALLOWED_SUFFIXES:
        raise UploadRejected(
            f"{name}: only .md and .txt files can be added (got {path.suffix or 'no extension'!r})."
        )
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadRejected(f"{name}: the file is {size:,} bytes; the limit is {max_bytes:,} bytes.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UploadRejected(
            f"{name}: the file is not valid UTF-8 text (byte {exc.start}); save it as UTF-8 and retry."
        ) from None
    if not text.strip():
        raise UploadRejected(f"{name}: the file is empty.")
    if "\x00" in text:
        raise UploadRejected(f"{name}: the file contains NUL bytes; it does not look like text.")
    return name, text


# ---------------------------------------------------------------------------------- session binding
Owner = tuple[str | None, str]  # (login name under --auth, Gradio session hash)


class SessionBinder:
    """Binds each chatkit session to the browser session that created it.

    The owner of a request is Gradio's ``session_hash`` (one per page load / per ``gradio_client``),
    plus the login name when ``--auth`` is on. ``session_for`` returns the caller's own session,
    creating it on first use (under a lock, so two first messages can't create two sessions).
    ``check`` accepts a session id only when it belongs to the caller.

    Example:
        >>> ids = iter(["s1", "s2"])
        >>> binder = SessionBinder(create=lambda: next(ids))
        >>> alice, bob = gr.Request(session_hash="a"), gr.Request(session_hash="b")
        >>> binder.session_for(alice), binder.session_for(alice), binder.session_for(bob)
        ('s1', 's1', 's2')
        >>> binder.check("s1", bob)
        Traceback (most recent call last):
        ...
        PermissionError: session 's1' does not belong to this browser session
    """

    def __init__(self, *, create: Any) -> None:
        self._create = create
        self._guard = threading.Lock()
        self._by_owner: dict[Owner, str] = {}
        self._owner_of: dict[str, Owner] = {}

    def __repr__(self) -> str:
        return f"<SessionBinder bound={len(self._by_owner)}>"

    def __len__(self) -> int:
        return len(self._by_owner)

    @staticmethod
    def owner(request: gr.Request | None) -> Owner:
        """The binding key of a request.

        Raises:
            PermissionError: the request carries no browser session (``session_hash``).
        """
        session_hash = getattr(request, "session_hash", None) if request is not None else None
        if not session_hash or not isinstance(session_hash, str):
            raise PermissionError("this request has no browser session; open the demo in a browser")
        username = getattr(request, "username", None)
        return (username if isinstance(username, str) else None, session_hash)

    def session_for(self, request: gr.Request | None) -> str:
        """The caller's chatkit session id, created and bound on first use."""
        owner = self.owner(request)
        with self._guard:
            sid = self._by_owner.get(owner)
            if sid is None:
                sid = self._create()
                self._by_owner[owner] = sid
                self._owner_of[sid] = owner
            return sid

    def peek(self, request: gr.Request | None) -> str | None:
        """The caller's session id if it has one, without creating it."""
        owner = self.owner(request)
        with self._guard:
            return self._by_owner.get(owner)

    def check(self, session_id: object, request: gr.Request | None) -> str:
        """Return ``session_id`` if it is bound to the caller.

        Raises:
            PermissionError: unknown, malformed or foreign id (the same message for all three, so a
                caller learns nothing about other visitors' sessions).
        """
        owner = self.owner(request)
        with self._guard:
            if isinstance(session_id, str) and self._owner_of.get(session_id) == owner:
                return session_id
        raise PermissionError(f"session {str(session_id)[:80]!r} does not belong to this browser session")

    def release(self, request: gr.Request | None) -> str | None:
        """Unbind the caller's session (browser tab closed); returns the id it had, if any."""
        try:
            owner = self.owner(request)
        except PermissionError:
            return None
        with self._guard:
            sid = self._by_owner.pop(owner, None)
            if sid is not None:
                self._owner_of.pop(sid, None)
            return sid


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

    def _create_session(self) -> str:
        if self.manager is None:
            raise RuntimeError("DemoServices.ready() must be awaited before sessions are created")
        return self.manager.create_session()

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
                await store.add_documents(documents)  # one atomic publish
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


# ------------------------------------------------------------------------------------------ handlers
def _ui_error(exc: BaseException) -> gr.Error:
    """A Gradio error whose text is the exception's own message (shown in the UI and to API clients)."""
    return gr.Error(str(exc) or type(exc).__name__, print_exception=False)


def _chat_messages(history: Sequence[Any]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in history]


def _sources_of(result: Any) -> list[str]:
    """The knowledge-base sources a chat result drew on, de-duplicated, in order."""
    found: list[str] = []
    for item in getattr(result, "sources", None) or ():
        source = item if isinstance(item, str) else getattr(item, "metadata", {}).get("source")
        if source and source not in found:
            found.append(str(source))
    return found


class DemoHandlers:
    """The demo's event handlers: plain async methods, callable directly in tests.

    Every method that touches a chat session takes the ``gr.Request`` and resolves the session through
    the :class:`SessionBinder`; none accepts a session id without the binding check.

    Example:
        >>> import asyncio
        >>> handlers = DemoHandlers(DemoServices(DemoConfig(embeddings="hash", data_dir=None)))
        >>> asyncio.run(handlers.chat("   ", gr.Request(session_hash="doc")))
        Traceback (most recent call last):
        ...
        gradio.exceptions.Error: 'The message is empty: type something first.'

    Raises:
        gr.Error: for every user-facing problem (bad input, a foreign session id, a busy session); its
            message is shown in the UI and returned to API clients.
    """

    def __init__(self, services: DemoServices) -> None:
        self.services = services

    def __repr__(self) -> str:
        return f"<DemoHandlers {self.services!r}>"

    # -- chat ------------------------------------------------------------------------------------
    def _message(self, message: object) -> str:
        try:
            return validate_message(message, max_chars=self.services.config.max_message_chars)
        except ValueError as exc:
            raise _ui_error(exc) from None

    async def _session(self, request: gr.Request | None, session_id: object = None) -> str:
        await self.services.ready()
        try:
            if session_id is None:
                return self.services.binder.session_for(request)
            return self.services.binder.check(session_id, request)
        except PermissionError as exc:
            raise _ui_error(exc) from None

    async def _turn(
        self, session_id: str, text: str, request: gr.Request | None, policy: str | None = None
    ) -> Any:
        try:
            return await self.services.manager.chat(session_id, text, policy=policy)
        except chatkit.SessionNotFound:
            self.services.binder.release(request)  # expired: the next message starts a new session
            raise gr.Error(
                "Your chat session expired after a long idle time; a new one starts with your next message."
            ) from None
        except (ValueError, chatkit.ChatkitError) as exc:
            raise _ui_error(exc) from None

    async def _history(self, session_id: str, request: gr.Request | None) -> list[dict[str, str]]:
        try:
            return _chat_messages(await self.services.manager.get_history(session_id))
        except chatkit.SessionNotFound:  # expired while idle: forget it; the next message starts anew
            self.services.binder.release(request)
            return []

    async def chat(self, message: str, request: gr.Request) -> tuple[list[dict[str, str]], str, str]:
        """Send ``message`` in the caller's own session.

        Returns:
            (the session's whole history for the Chatbot, the sources of the answer as Markdown,
            ``""`` to clear the textbox).
        """
        text = self._message(message)
        sid = await self._session(request)
        result = await self._turn(sid, text, request)
        sources = _sources_of(result)
        note = (
            "**Retrieved from** (best match first): " + ", ".join(f"`{s}`" for s in sources)
            if sources
            else "_No knowledge-base document was used._"
        )
        return await self._history(sid, request), note, ""

    async def restore(self, request: gr.Request) -> tuple[list[dict[str, str]], str]:
        """The caller's history and a short description of its session (on page load)."""
        sid = await self._session(request)
        short = sid[:8]
        return await self._history(sid, request), f"Your private chat session: `{short}…` (bound to this browser tab)"

    async def double_text(
        self, message: str, count: float, policy: str, request: gr.Request
    ) -> tuple[list[dict[str, str]], list[list[str]], str]:
        """Send ``count`` copies of ``message`` (numbered) at once under ``policy``; show what happened.

        The model is made slow (``burst_latency``) for these turns only, so the messages overlap.

        Returns:
            (the history, one table row per message: [message, outcome, reply], the policy's explanation).
        """
        text = self._message(message)
        if policy not in POLICIES:
            raise gr.Error(f"Unknown policy {policy!r}; choose one of {', '.join(POLICIES)}.")
        n = int(count)
        if not 1 <= n <= self.services.config.max_burst:
            raise gr.Error(f"Send between 1 and {self.services.config.max_burst} messages at once, not {n}.")
        sid = await self._session(request)
        texts = [f"{text} (#{i + 1} of {n})" for i in range(n)]
        manager = self.services.manager
        burst = _Burst(self.services.config.burst_latency)
        token = _BURST.set(burst)  # inherited by the tasks created below, and only by them
        tasks: list[asyncio.Task[Any]] = []
        started = asyncio.create_task(burst.started(texts[0]).wait())
        try:
            # message 1 first; the others the moment its model call has started (or it has finished),
            # each created in order so that each joins the session's queue before the next
            tasks.append(asyncio.create_task(manager.chat(sid, texts[0], policy=policy)))
            await asyncio.wait([tasks[0], started], return_when=asyncio.FIRST_COMPLETED)
            for t in texts[1:]:
                tasks.append(asyncio.create_task(manager.chat(sid, t, policy=policy)))
                await asyncio.sleep(0)
            burst.all_sent.set()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:  # the visitor went away: cancel the burst's turns (chatkit rolls them back)
            for task in tasks:
                task.cancel()
            raise
        finally:
            started.cancel()
            burst.all_sent.set()  # never leave a turn held, whatever happened above
            _BURST.reset(token)
        history = await self.services.manager.get_history(sid)
        rows = [[t, *_describe_outcome(out)] for t, out in zip(texts, outcomes, strict=True)]
        return _chat_messages(history), rows, POLICY_HELP[policy]

    async def api_session(self, request: gr.Request) -> str:
        """API: the caller's own session id (created on first use)."""
        return await self._session(request)

    async def api_history(self, session_id: str, request: gr.Request) -> list[dict[str, str]]:
        """API: the history of ``session_id``, only if it belongs to the caller."""
        sid = await self._session(request, session_id)
        return await self._history(sid, request)

    async def api_send(self, session_id: str, message: str, request: gr.Request) -> str:
        """API: send ``message`` into ``session_id``, only if it belongs to the caller; returns the reply."""
        text = self._message(message)
        sid = await self._session(request, session_id)
        result = await self._turn(sid, text, request)
        return str(result.reply)

    async def unload(self, request: gr.Request) -> None:
        """The browser tab closed: unbind its session and delete it."""
        sid = self.services.binder.release(request)
        if sid is not None and self.services.manager is not None:
            try:
                await self.services.manager.delete_session(sid)
            except chatkit.ChatkitError:  # already expired
                pass


def _describe_outcome(outcome: object) -> tuple[str, str]:
    """(what happened, reply) for one double-texted message, from what its ``chat()`` call returned."""
    if isinstance(outcome, chatkit.SessionBusy):
        return "rejected at once (session busy); nothing stored", ""
    kept = getattr(outcome, "kept_message", None)  # chatkit's TurnInterrupted
    if kept is not None:
        if kept:
            return "interrupted: its message stays in the history, without a reply", ""
        return "superseded: discarded, nothing of it kept", ""
    if isinstance(outcome, BaseException):
        return f"failed: {outcome or type(outcome).__name__}", ""
    return "answered", str(getattr(outcome, "reply", ""))


class KnowledgeHandlers:
    """Knowledge-base tab: upload (with progress), list, remove, search. Shared by all visitors.

    Uploads are checked before anything is stored: a bad file is reported and skipped, every other file
    of the same upload is indexed, and nothing already stored is touched.
    """

    def __init__(self, services: DemoServices) -> None:
        self.services = services

    def __repr__(self) -> str:
        return f"<KnowledgeHandlers {self.services!r}>"

    async def documents(self) -> list[list[Any]]:
        """One row per document: [source, chunks, version it was published in]."""
        await self.services.ready()
        return _document_rows(self.services.store)

    async def upload(
        self, files: Sequence[Any] | None, progress: gr.Progress = gr.Progress()
    ) -> tuple[str, list[list[Any]], Any]:
        """Index uploaded ``.md``/``.txt`` files (replacing same-named documents atomically).

        Returns:
            (a status report in Markdown, the document table, an update of the remove dropdown).
        """
        paths = [getattr(f, "name", f) for f in files or ()]
        if not paths:
            raise gr.Error("Choose one or more .md or .txt files to upload first.")
        if len(paths) > MAX_FILES_PER_UPLOAD:
            raise gr.Error(f"Upload at most {MAX_FILES_PER_UPLOAD} files at once, not {len(paths)}; nothing was added.")
        await self.services.ready()
        store = self.services.store
        lines: list[str] = []
        progress(0.0, desc="checking files")
        checked: list[tuple[str, str]] = []
        for p in paths:
            try:
                checked.append(read_upload(p, max_bytes=self.services.config.max_upload_bytes))
            except (UploadRejected, OSError) as exc:
                lines.append(f"- **not added**: {exc}")
        for i, (name, text) in enumerate(checked):
            progress((i, len(checked)), desc=f"indexing {name}", unit="files")
            try:
                record = await store.add_document(name, text)
            except (ValueError, TypeError) as exc:
                lines.append(f"- **not added**: {name}: {exc}")
                continue
            verb = "replaced" if record.replaced else "added"
            plural = "s" if record.chunks != 1 else ""
            lines.append(f"- **{verb}**: `{name}`, {record.chunks} chunk{plural}, published as version {record.version}")
        progress(1.0, desc="done")
        return "\n".join(lines), _document_rows(store), _source_choices(store)

    async def remove(self, source: str | None) -> tuple[str, list[list[Any]], Any]:
        """Remove one document; the table and the dropdown are refreshed."""
        if not source:
            raise gr.Error("Choose a document to remove first.")
        await self.services.ready()
        store = self.services.store
        existed = await store.remove_document(source)
        status = (
            f"**Removed** `{source}` (now version {store.version})."
            if existed
            else f"`{source}` was not in the knowledge base (someone else may have removed it)."
        )
        return status, _document_rows(store), _source_choices(store)

    async def source_choices(self) -> Any:
        """An update of the remove dropdown with the current documents."""
        await self.services.ready()
        return _source_choices(self.services.store)

    async def search(self, query: str, k: float = 4) -> tuple[list[list[Any]], str]:
        """Search one pinned snapshot; says which version answered.

        Returns:
            (rows [source, chunk, score, text], a Markdown line naming the snapshot version).
        """
        if not isinstance(query, str) or not query.strip():
            raise gr.Error("Type something to search for.")
        if len(query) > self.services.config.max_message_chars:
            raise gr.Error(f"The query is too long; the limit is {self.services.config.max_message_chars:,} characters.")
        await self.services.ready()
        snapshot = self.services.store.snapshot()
        hits = await snapshot.asimilarity_search_with_relevance_scores(query.strip(), k=max(1, int(k)))
        rows = [
            [
                doc.metadata.get("source", "?"),
                doc.metadata.get("chunk", doc.metadata.get("chunk_index", "")),
                round(float(score), 3),
                _preview(doc.page_content),
            ]
            for doc, score in hits
        ]
        note = f"Answered by snapshot **version {snapshot.version}** ({len(rows)} results)."
        return rows, note


def _preview(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _document_rows(store: Any) -> list[list[Any]]:
    """[source, chunks, version] per document, all read from one pinned snapshot."""
    snapshot = store.snapshot()
    rows: list[list[Any]] = []
    for source in snapshot.sources():
        chunks = snapshot.documents(source)
        version = max((int(doc.metadata.get("version", 0)) for doc in chunks), default=0)
        rows.append([source, len(chunks), version])
    return rows


def _source_choices(store: Any) -> Any:
    return gr.update(choices=store.snapshot().sources(), value=None)


# ------------------------------------------------------------------------------------------ race lab
# label in the UI -> experiment name in chatkit.experiments
EXPERIMENTS: dict[str, str] = {
    "Session history: concurrent chat() on one session": "session_race",
    "LangGraph checkpointer: concurrent ainvoke on one thread": "checkpointer_race",
    "Vector store: search while a document is replaced": "store_race",
}
# experiment name -> its keyword arguments for (concurrent requests, use the fix)
_EXPERIMENT_ARGS: dict[str, Any] = {
    "session_race": lambda n, fixed: {"questions": _questions(n), "locking": fixed},
    "checkpointer_race": lambda n, fixed: {"questions": _questions(n), "locked": fixed},
    # one writer replaces a document of n chunks while a reader keeps searching
    "store_race": lambda n, fixed: {"parts": n, "cow": fixed},
}


class RaceLabHandlers:
    """Race lab tab: run one of :mod:`chatkit.experiments` with or without the lock.

    Each run builds its own private objects, so visitors' experiments never touch each other or the
    demo's real sessions and knowledge base.
    """

    def __init__(self, services: DemoServices) -> None:
        self.services = services

    def __repr__(self) -> str:
        return f"<RaceLabHandlers experiments={len(EXPERIMENTS)}>"

    async def run(self, experiment: str, requests: float, locked: bool) -> tuple[Any, list[list[Any]], str]:
        """Run ``experiment`` with ``requests`` concurrent requests.

        Returns:
            (the timeline figure, one row per anomaly: [kind, who, detail], a Markdown summary).
        """
        name = EXPERIMENTS.get(experiment)
        if name is None:
            raise gr.Error(f"Unknown experiment {experiment!r}; choose one of the list.")
        n = int(requests)
        if not 2 <= n <= 20:
            raise gr.Error(f"Choose between 2 and 20 concurrent requests, not {n}.")
        result = await _run_experiment(name, n, bool(locked))
        return _experiment_outputs(result, locked=bool(locked))


def _questions(n: int) -> tuple[str, ...]:
    """``n`` distinct questions for an experiment's concurrent requests."""
    from chatkit import experiments

    base = list(experiments.QUESTIONS)
    return tuple(base[i] if i < len(base) else f"Message {i + 1}: what happens now?" for i in range(n))


async def _run_experiment(name: str, requests: int, locked: bool) -> Any:
    from chatkit import experiments

    fn = getattr(experiments, name, None)
    if fn is None:
        raise gr.Error(f"The experiment {name!r} is not available in this version of chatkit.")
    return await fn(**_EXPERIMENT_ARGS[name](requests, locked))


def _experiment_outputs(result: Any, *, locked: bool) -> tuple[Any, list[list[Any]], str]:
    figure = result.plot()
    rows = [[a.kind, a.who, a.detail] for a in result.anomalies]
    verdict = f"**{len(rows)} anomalies**" if rows else "**no anomalies**"
    return figure, rows, f"{verdict}: {result.summary()}"


# ---------------------------------------------------------------------------------------------- UI
INTRO = """# chatkit demo: chat that stays correct under concurrency
Every browser tab gets its own private chat session. Send several messages at once, upload documents
while others chat, and watch races happen (and disappear) in the **Race lab**."""

CHAT_LIMIT = 128  # concurrent chat events across all visitors; one session's turns are serialized by chatkit


def build_demo(
    config: DemoConfig | None = None,
    *,
    services: DemoServices | None = None,
    chat_concurrency: int | None = CHAT_LIMIT,
) -> gr.Blocks:
    """Build the Gradio app. Cheap: nothing heavy loads until the first request (or ``services.ready()``).

    Example:
        >>> app = build_demo(DemoConfig(embeddings="hash", data_dir=None))
        >>> type(app).__name__
        'Blocks'

    Args:
        config: the configuration (default :meth:`DemoConfig.from_env`), or
        services: ready-made services (shared by several apps, e.g. in the benchmark).
        chat_concurrency: how many chat events may run at once across all visitors (``None``: no
            limit). ``1`` is Gradio's default, the "one global queue" baseline of the benchmark.

    Raises:
        ValueError: both ``config`` and ``services`` given.
    """
    if config is not None and services is not None:
        raise ValueError("pass config or services, not both")
    services = services if services is not None else DemoServices(config)
    chat = DemoHandlers(services)
    kb = KnowledgeHandlers(services)
    lab = RaceLabHandlers(services)
    cfg = services.config

    with gr.Blocks(title="chatkit demo", analytics_enabled=False) as blocks:
        gr.Markdown(INTRO)
        with gr.Tab("Chat", id="chat"):
            session_md = gr.Markdown(elem_id="session-info")
            chatbot = gr.Chatbot(
                label="Conversation", height=380, elem_id="chatbot", buttons=["copy"],
                group_consecutive_messages=False,
            )
            sources = gr.Markdown(elem_id="sources")
            with gr.Row():
                message = gr.Textbox(
                    placeholder="Ask about race conditions, locks, snapshots, double texting…",
                    show_label=False, scale=5, max_lines=4, elem_id="message",
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Accordion("Double texting: send several messages at once", open=False, elem_id="double-text"):
                with gr.Row():
                    policy = gr.Radio(list(POLICIES), value="enqueue", label="Policy", elem_id="policy")
                    count = gr.Slider(2, cfg.max_burst, value=min(3, cfg.max_burst), step=1, label="Messages at once")
                burst_message = gr.Textbox(value="What is a lost update?", label="Message", elem_id="burst-message")
                burst = gr.Button("Send them all at once", elem_id="burst")
                policy_help = gr.Markdown(POLICY_HELP["enqueue"])
                outcomes = gr.Dataframe(
                    headers=["message", "what happened", "reply"], interactive=False, wrap=True, elem_id="outcomes"
                )

        with gr.Tab("Race lab", id="lab"):
            gr.Markdown(
                "Run a race on private objects: several concurrent requests, without and with chatkit's lock. "
                "Bars show waiting for the lock, holding it and the work; a red **X** marks damage."
            )
            with gr.Row():
                experiment = gr.Dropdown(list(EXPERIMENTS), value=next(iter(EXPERIMENTS)), label="Experiment", scale=3)
                requests = gr.Slider(
                    2, 10, value=3, step=1, scale=2,
                    label="Concurrent requests (vector store: chunks of the replaced document)",
                )
                locked = gr.Checkbox(
                    value=False, label="Use chatkit (lock / copy-on-write store)", scale=1, elem_id="locked"
                )
            run = gr.Button("Run experiment", variant="primary", elem_id="run-lab")
            lab_summary = gr.Markdown(elem_id="lab-summary")
            plot = gr.Plot(label="Timeline", elem_id="lab-plot")
            anomalies = gr.Dataframe(headers=["anomaly", "request", "detail"], interactive=False, wrap=True)

        with gr.Tab("Knowledge base", id="kb"):
            with gr.Row():
                with gr.Column(scale=2):
                    files = gr.File(
                        file_count="multiple", file_types=list(ALLOWED_SUFFIXES), type="filepath",
                        label=f"Add .md or .txt files (UTF-8, at most {cfg.max_upload_bytes // 1024} KiB each)",
                        elem_id="upload",
                    )
                    add = gr.Button("Add to knowledge base", variant="primary", elem_id="add-docs")
                    upload_status = gr.Markdown(elem_id="upload-status")
                with gr.Column(scale=3):
                    documents = gr.Dataframe(
                        headers=["document", "chunks", "version"], interactive=False, elem_id="documents",
                        max_height=300,
                    )
                    with gr.Row():
                        to_remove = gr.Dropdown([], label="Remove a document", scale=3, elem_id="remove-choice")
                        remove = gr.Button("Remove", variant="stop", scale=1, elem_id="remove")
            with gr.Row():
                query = gr.Textbox(label="Search the knowledge base", scale=5, elem_id="query")
                k = gr.Slider(1, 10, value=4, step=1, label="Results", scale=1)
                search = gr.Button("Search", scale=1, elem_id="search")
            search_note = gr.Markdown(elem_id="search-note")
            results = gr.Dataframe(
                headers=["source", "chunk", "relevance", "text"], interactive=False, wrap=True, elem_id="results"
            )

        # -- events. Chat-like events share one generous pool: sessions run in parallel, a session's
        # turns are serialized by chatkit's per-session lock, not by Gradio's queue.
        chat_kw: dict[str, Any] = {"concurrency_id": "chat", "concurrency_limit": chat_concurrency}
        gr.on(
            [message.submit, send.click], chat.chat, [message], [chatbot, sources, message],
            api_name="chat", **chat_kw,
        )
        burst.click(
            chat.double_text, [burst_message, count, policy], [chatbot, outcomes, policy_help],
            api_name="double_text", **chat_kw,
        )
        policy.change(lambda p: POLICY_HELP.get(p, ""), [policy], [policy_help], api_visibility="private", queue=False)
        run.click(lab.run, [experiment, requests, locked], [plot, anomalies, lab_summary],
                  api_name="race_lab", concurrency_id="lab", concurrency_limit=2)
        add.click(kb.upload, [files], [upload_status, documents, to_remove],
                  api_name="upload", concurrency_id="kb_write", concurrency_limit=4)
        remove.click(kb.remove, [to_remove], [upload_status, documents, to_remove],
                     api_name="remove", concurrency_id="kb_write", concurrency_limit=4)
        gr.on([query.submit, search.click], kb.search, [query, k], [results, search_note],
              api_name="search", concurrency_id="kb_read", concurrency_limit=None)
        blocks.load(chat.restore, None, [chatbot, session_md], api_name="on_load_chat", api_visibility="private",
                    **chat_kw)
        blocks.load(kb.documents, None, [documents], api_name="on_load_documents", api_visibility="private",
                    concurrency_limit=None)
        blocks.load(kb.source_choices, None, [to_remove], api_name="on_load_choices", api_visibility="private",
                    concurrency_limit=None)
        blocks.unload(chat.unload)
        gr.api(kb.documents, api_name="documents", concurrency_limit=None)
        gr.api(chat.api_session, api_name="my_session", **chat_kw)
        gr.api(chat.api_history, api_name="history", **chat_kw)
        gr.api(chat.api_send, api_name="send", **chat_kw)

    blocks.queue(default_concurrency_limit=8, max_size=2048)
    blocks.chatkit_services = services  # type: ignore[attr-defined]  # for tests and main()
    return blocks


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="demo_app.py", description="chatkit's multi-user Gradio demo")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    parser.add_argument("--auth", type=_parse_auth, default=None, metavar="USER:PASS", help="require a login")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="a local Hugging Face causal-LM directory (default: the offline extractive model)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR",
                        help="knowledge-base directory of .md/.txt files (default: data/)")
    parser.add_argument("--embeddings", choices=("minilm", "hash"), default="minilm",
                        help="minilm: the local all-MiniLM-L6-v2 (default); hash: fast, for smoke tests")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds the extractive model takes per reply")
    parser.add_argument("--chat-concurrency", type=int, default=CHAT_LIMIT, metavar="N",
                        help=f"chat events running at once across all visitors (default {CHAT_LIMIT}; "
                        "1 = Gradio's default single queue, for comparison)")
    args = parser.parse_args(argv)
    if args.chat_concurrency < 1:
        parser.error(f"--chat-concurrency must be >= 1, got {args.chat_concurrency}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    for name in ("data", "model"):
        value = getattr(args, name)
        if value is not None and not value.is_dir():
            parser.error(f"--{name} {value} is not a directory")
    return args


def _parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth must be USER:PASS with a non-empty user and password")
    return user, password


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo until interrupted; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chatkit").setLevel(logging.INFO)  # ours; third-party request logs stay quiet
    args = parse_args(argv)
    config = DemoConfig(data_dir=args.data, model_dir=args.model, embeddings=args.embeddings, latency=args.latency)
    services = DemoServices(config)
    app = build_demo(services=services, chat_concurrency=args.chat_concurrency)
    if args.share and args.auth is None:
        print(
            "WARNING: --share without --auth: anyone who gets the public link can use this demo. "
            "Add --auth USER:PASS to require a login.",
            file=sys.stderr, flush=True,
        )
    print(f"Loading the knowledge base from {config.data_dir} ({config.embeddings} embeddings)…", flush=True)
    chatkit.run(services.ready())
    app.launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=args.auth,
        prevent_thread_lock=True, show_error=True, max_file_size=4 * config.max_upload_bytes,
    )
    if args.share:
        if app.share_url:
            print(f"Public link: {app.share_url}", flush=True)
        else:
            print(
                "NOTE: no public share link could be made (this machine cannot reach Gradio's share "
                f"server). The demo keeps serving locally at {app.local_url}",
                flush=True,
            )
    print(f"chatkit demo running at {app.local_url} (Ctrl+C to stop)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


demo = build_demo()

if __name__ == "__main__":
    sys.exit(main())
