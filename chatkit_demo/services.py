"""The app-wide services behind the UI: :class:`DemoServices` (embeddings, knowledge base, sessions, upkeep)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ctypes
import ctypes.util
import dataclasses
import datetime
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from langchain_core.outputs import ChatGenerationChunk

import chatkit

from .binding import SessionBinder
from .config import ALLOWED_SUFFIXES, LOCK_TIMEOUT, DemoConfig
from .inputs import UploadRejected, read_upload
from .tokens import TokenSigner

logger = logging.getLogger("chatkit.demo")

UI_SWEEP_TIMEOUT = 10.0  # seconds the sweep waits for Gradio's loop to forget idle per-browser state
BUNDLED = "bundled"  # the "added by" of the documents indexed at start-up
Latency = Callable[[str], float | None | Awaitable[Any]]


# ------------------------------------------------------------------------------------------ the model
class PacedExtractiveModel(chatkit.ExtractiveChatModel):
    """:class:`chatkit.ExtractiveChatModel` whose streamed replies come word by word, ``token_delay`` apart
    (so that a streaming UI shows them arriving, as a real LLM's would). Non-streamed calls are not slowed.
    """

    token_delay: float = 0.0

    async def _astream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        first = True
        async for chunk in super()._astream(messages, stop, run_manager, **kwargs):
            if not first and self.token_delay > 0:
                await asyncio.sleep(self.token_delay)
            first = False
            yield chunk


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


# ------------------------------------------------------------------------------------------ records
@dataclasses.dataclass(frozen=True, slots=True)
class SweepReport:
    """What one :meth:`DemoServices.sweep` did.

    Attributes:
        expired: conversations that expired (idle longer than ``session_ttl``, or beyond ``max_sessions``).
        unbound: browser pages unbound from an expired conversation.
        pages_dropped: browser pages forgotten after ``session_ttl`` without a visit.
        sessions: conversations alive after the sweep.
        pages: browser pages known after the sweep.
        ui_states_dropped: Gradio's per-browser states forgotten after ``session_ttl`` without an event.
    """

    expired: int
    unbound: int
    pages_dropped: int
    sessions: int
    pages: int
    ui_states_dropped: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class DemoStatus:
    """Whether the services can answer yet: ``state`` is ``"waiting"`` (nothing started), ``"loading"``,
    ``"ready"`` or ``"failed"`` (``error`` says why)."""

    state: str
    documents: int = 0
    error: str | None = None


def trim_memory() -> bool:
    """Hand freed heap memory back to the operating system (glibc's ``malloc_trim``); ``False`` elsewhere.

    CPython and faiss free memory into the C heap, which keeps it for reuse: the server's RSS then stays
    at its peak after conversations expire or documents are removed. Called after those.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


# ------------------------------------------------------------------------------------------ services
class DemoServices:
    """The app-wide services behind the UI: the knowledge base, the session manager, the page bindings.

    Created cheaply. ``await core()`` makes the store and the :class:`chatkit.SessionManager` (fast: the
    embedding model loads on first use); ``await ready()`` also indexes ``data_dir`` (loading the model), once,
    whichever event loop or thread asks first. :meth:`start` does both on a background thread, which then
    sweeps expired conversations every ``sweep_interval`` seconds, so the page answers at once and shows a
    "loading" state until the knowledge base is ready.

    Example:
        >>> services = DemoServices(DemoConfig(embeddings="hash", data_dir=None))
        >>> services
        <DemoServices embeddings='hash' state='waiting' pages=0>

    Args:
        config: the configuration (default :meth:`DemoConfig.from_env`).
        embeddings: a ready LangChain ``Embeddings`` that overrides ``config.embeddings`` (tests).
        latency: the extractive model's latency, ``callable(user_text) -> seconds | None | awaitable`` (tests
            hold a reply with it); default ``config.latency``.
        clock: wall-clock seconds for conversation expiry and page bindings (tests pass a fake clock).
    """

    def __init__(
        self,
        config: DemoConfig | None = None,
        *,
        embeddings: Any = None,
        latency: Latency | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config if config is not None else DemoConfig.from_env()
        self._embeddings = embeddings
        self._latency_hook = latency
        self.clock = clock
        self._init_lock = chatkit.KeyedLock()
        self._core = False
        self._ready = False
        self._error: str | None = None
        self._started = False
        self._start_guard = threading.Lock()  # start() may be called from several threads at once
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.store: Any = None
        self.manager: Any = None
        self.signer = TokenSigner(self.config.secret_key)
        self.binder = SessionBinder(
            create=self._create_session, signer=self.signer, ttl=self.config.session_ttl,
            max_pages=4 * self.config.max_sessions, clock=clock,
        )
        self.bundled: dict[str, str] = {}  # the documents of data_dir, for "restore the bundled documents"
        self._ui_app: Any = None  # the Gradio app served, whose per-browser state the sweep also forgets
        self._ui_loop: asyncio.AbstractEventLoop | None = None  # the loop its events run on

    def __repr__(self) -> str:
        return f"<DemoServices embeddings={self.config.embeddings!r} state={self.status().state!r} pages={len(self.binder)}>"

    @property
    def is_ready(self) -> bool:
        return self._ready

    def status(self) -> DemoStatus:
        """Whether the knowledge base is loaded (for the page's "loading" banner)."""
        if self._error is not None:
            return DemoStatus("failed", error=self._error)
        if self._ready:
            return DemoStatus("ready", documents=len(self.store.snapshot().sources()))
        if self._started or self._core:
            return DemoStatus("loading")
        return DemoStatus("waiting")

    # ------------------------------------------------------------------ building

    async def _create_session(self) -> str:
        await self.core()
        return str(await self.manager.create_session())

    def _latency(self, text: str) -> float | None | Awaitable[Any]:
        """The extractive model's latency: normal, or held and slow for the turns of a double-texting burst."""
        burst = _BURST.get()
        if burst is not None:
            return burst.latency(text)
        if self._latency_hook is not None:
            return self._latency_hook(text)
        return self.config.latency

    def _build_embeddings(self) -> Any:
        """The embeddings for the store; ``None`` lets the store load the local MiniLM model on first use."""
        if self._embeddings is not None:
            return self._embeddings
        if self.config.embeddings == "hash":
            return chatkit.HashEmbeddings()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        return None

    def _build_model(self) -> Any:
        if self.config.model_dir is not None:
            return chatkit.load_local_chat_model(self.config.model_dir)
        return PacedExtractiveModel(latency=self._latency, token_delay=self.config.token_delay)

    def _read_bundled(self) -> dict[str, str]:
        documents: dict[str, str] = {}
        if self.config.data_dir is None:
            return documents
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
        return documents

    async def core(self) -> DemoServices:
        """Make the store and the session manager once (fast: nothing is indexed, no model is loaded)."""
        if self._core:
            return self
        async with self._init_lock("init"):
            if self._core:
                return self
            embeddings = self._build_embeddings()
            model = await asyncio.to_thread(self._build_model)
            store = chatkit.CowVectorStore(embeddings, progress=False)
            self.manager = chatkit.SessionManager(
                model=model,
                store=store,
                max_message_chars=self.config.max_message_chars,
                lock_timeout=LOCK_TIMEOUT,
                session_ttl=self.config.session_ttl,
                max_sessions=self.config.max_sessions,
                keep_checkpoints=4,
                clock=self.clock,
            )
            self.store = store
            self._core = True
        return self

    async def ready(self) -> DemoServices:
        """Index the bundled knowledge base once (after :meth:`core`); later calls return at once.

        Raises:
            RuntimeError: loading failed before (the error says why; the demo must be restarted).
        """
        if self._ready:
            return self
        if self._error is not None:
            raise RuntimeError(self._error)
        await self.core()
        async with self._init_lock("ready"):
            if self._ready:
                return self
            documents = await asyncio.to_thread(self._read_bundled)
            if documents:
                await self.store.aadd_sources(documents, metadata={name: bundled_metadata() for name in documents})  # one publish
            self.bundled = documents
            self._ready = True
            logger.info("demo ready: %d documents indexed", len(documents))
        return self

    # ------------------------------------------------------------------ background upkeep

    def start(self) -> None:
        """Load (:meth:`ready`) on a background thread, then sweep every ``sweep_interval`` seconds.

        Returns at once; idempotent. A loading error is logged (one line) and shown by :meth:`status`.
        """
        with self._start_guard:
            if self._started:
                return
            self._started = True
        ready = threading.Event()
        self._thread = threading.Thread(target=self._background, args=(ready,), name="chatkit-demo-upkeep", daemon=True)
        self._thread.start()
        ready.wait()

    def _background(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        started.set()
        try:
            loop.run_until_complete(self._upkeep())
        finally:
            loop.close()

    async def _upkeep(self) -> None:
        assert self._stop is not None
        try:
            await self.ready()
        except Exception as exc:  # noqa: BLE001 - shown on the page and logged; the server keeps serving
            self._error = f"the knowledge base could not be loaded: {exc}"
            logger.error("%s", self._error)
            return
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.config.sweep_interval)
            except TimeoutError:
                pass
            if self._stop.is_set():
                break
            try:
                report = await self.sweep()
            except Exception:  # an upkeep bug must not end the upkeep
                logger.exception("the expiry sweep failed")
                continue
            if report.expired or report.pages_dropped or report.ui_states_dropped:
                logger.info(
                    "expired %d conversations, forgot %d idle pages (%d browser states); %d conversations, "
                    "%d pages left",
                    report.expired, report.pages_dropped, report.ui_states_dropped, report.sessions, report.pages,
                )

    # ------------------------------------------------------------------ Gradio's per-browser state

    def attach_ui(self, app: Any) -> None:
        """The Gradio app that serves these services: the sweep also forgets its per-browser state."""
        self._ui_app = app

    def note_ui_loop(self) -> None:
        """Called by the handlers (so on the loop Gradio runs its events on): where to forget its state."""
        self._ui_loop = asyncio.get_running_loop()

    def forget_idle_ui_states(self, idle: float | None = None) -> int:
        """Forget Gradio's per-browser state (a copy of the page's configuration, some 140 KB per visitor
        and API client, which Gradio keeps until 10,000 accumulate) of every browser without an event for
        ``idle`` seconds (default ``session_ttl``). Must run on the loop Gradio runs its events on (where
        Gradio creates and reads that state, so none is dropped while an event looks it up). A browser
        coming back gets a fresh one; the demo keeps nothing there that its tokens can't restore.

        Returns:
            How many were forgotten.
        """
        holder = getattr(self._ui_app, "state_holder", None)
        data, used = getattr(holder, "session_data", None), getattr(holder, "time_last_used", None)
        if holder is None or data is None or used is None:
            return 0
        cutoff = datetime.datetime.now() - datetime.timedelta(seconds=self.config.session_ttl if idle is None else idle)
        with holder.lock:
            stale = [key for key in list(data) if used.get(key, cutoff) <= cutoff]
            for key in stale:
                data.pop(key, None)
                used.pop(key, None)
        return len(stale)

    async def _forget_ui_states(self) -> int:
        loop = self._ui_loop
        if self._ui_app is None or loop is None or loop.is_closed():
            return 0
        if loop is asyncio.get_running_loop():
            return self.forget_idle_ui_states()
        done: concurrent.futures.Future[int] = concurrent.futures.Future()

        def run() -> None:
            if not done.set_running_or_notify_cancel():  # the sweep gave up waiting
                return
            try:
                done.set_result(self.forget_idle_ui_states())
            except Exception as exc:  # noqa: BLE001 - handed to the sweep, which logs it
                done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # that loop closed meanwhile (the server stopped)
            return 0
        try:  # a loop that stopped without closing never runs it: the sweep goes on without
            return await asyncio.wait_for(asyncio.wrap_future(done), timeout=UI_SWEEP_TIMEOUT)
        except TimeoutError:
            return 0

    async def sweep(self) -> SweepReport:
        """Expire idle conversations (deleting their checkpoints), unbind the pages that held them, forget
        pages (and Gradio's per-browser state) idle longer than ``session_ttl``, and hand the freed memory
        back to the system."""
        ui_dropped = await self._forget_ui_states()
        if not self._core:
            return SweepReport(0, 0, self.binder.sweep(), 0, len(self.binder), ui_dropped)
        expired = await self.manager.expire_idle()
        alive = await self.manager.list_sessions()
        unbound = self.binder.retain(alive)
        dropped = self.binder.sweep()
        if expired or dropped or ui_dropped:
            trim_memory()
        return SweepReport(len(expired), unbound, dropped, len(alive), len(self.binder), ui_dropped)

    def close(self) -> None:
        """Stop the background thread (if started), close the session manager and the store. Idempotent."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=30)
        if self.manager is not None and not self.manager.closed:
            chatkit.run(self.manager.aclose())
        if self.store is not None and not self.store.closed:
            self.store.close()


def bundled_metadata() -> dict[str, str]:
    """The metadata of a document indexed from ``data_dir`` at start-up (or restored)."""
    return {"added_by": BUNDLED, "owner": BUNDLED, "added_at": now_iso()}


def now_iso() -> str:
    """The time now, UTC, to the second (``2025-01-31T14:05:09Z``)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
