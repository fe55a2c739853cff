"""Lock-protected chat sessions on LangGraph: atomic turns and double-texting policies.

How a turn works (``locking=True``):

1. *Admission*, synchronously (no ``await`` before the caller joins its session's queue, so turns run in
   arrival order): validate, apply the policy (``reject`` refuses at once, ``interrupt``/``rollback``
   cancel the session's turns in flight), record the turn.
2. Take the session's :class:`~chatkit.KeyedLock` key (FIFO; :class:`~chatkit.LockTimeout` after
   ``lock_timeout``).
3. Read the latest checkpoint of the session's thread: the history.
4. Compute the reply by running the same graph *without* a checkpointer on ``history + [user message]``,
   inside ``turn_timeout``. Nothing is written while the model runs, so a model error, a timeout or a
   cancellation leaves the history exactly as it was.
5. Commit: one ``aupdate_state`` writes the user message and the reply together, as one new checkpoint
   on top of the one read in step 3 (under the lock nobody else writes the thread). The write is
   shielded from cancellation; a caller cancelled during it gets ``CancelledError`` once it has
   finished, and the turn is taken out again (``RemoveMessage`` of both messages, one more checkpoint),
   so the history is again exactly what it was.

LangGraph's own ``ainvoke`` is not atomic (it checkpoints the input message before the model runs, and
that checkpoint stays when the model fails or is cancelled), which is why a turn is computed first and
committed once. ``locking=False`` skips step 2 and commits on the checkpoint each turn read, as a
read-modify-write service does; it shows the two races: turns of one session read the same checkpoint,
each commits a branch on it, and the last commit wins (messages lost, replies computed without the
earlier turns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, RemoveMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph

from .._labels import caller_label
from .graph import GENERATE, SESSION_KEY, WHO_KEY, build_chat_graph
from .registry import DONE, WAITING, InFlight, Registry
from .types import POLICIES, ChatMessage, ChatResult, Policy, SessionStatistics, TurnInterrupted
from ..errors import LockTimeout, SessionBusy, SessionNotFound
from ..locks import KeyedLock, check_seconds
from ..models import ExtractiveChatModel

if TYPE_CHECKING:
    from langchain_core.vectorstores import VectorStore

    from ..timeline import Timeline

__all__ = ["SessionManager", "ChatResult", "ChatMessage", "SessionStatistics", "TurnInterrupted"]

logger = logging.getLogger(__name__)

# Session ids: what create_session() makes (22 url-safe characters), or a caller's own id with
# create_if_missing=True (letters, digits and ``_ - . : @``, at most 128 characters).
_SESSION_ID = re.compile(r"[A-Za-z0-9_\-.:@]{1,128}")

# Turn states. A turn may be superseded (cancelled by a newer message) only while WAITING or RUNNING.
RUNNING, COMMITTING, CLEANUP = "running", "committing", "cleanup"  # and WAITING, DONE


@dataclass(slots=True, eq=False)
class _Turn:
    """One message in flight: what it asks, who runs it, and how far it got."""

    session_id: str
    text: str
    who: str
    task: asyncio.Task[Any]  # the task to cancel to supersede it (a stream's worker once it runs)
    loop: asyncio.AbstractEventLoop
    create_if_missing: bool
    sink: _StreamSink | None
    t0: float  # perf_counter at arrival
    live: InFlight | None = None
    state: str = WAITING
    superseded: str | None = None  # the policy that cancelled it
    kept_message: bool = False
    request: Any = None  # the held lock request
    waited: float = 0.0
    lock_timed_out: bool = False


class _StreamSink:
    """Where a streaming turn sends reply chunks, and the gate it waits at before committing."""

    __slots__ = ("queue", "gate")

    DONE: Any = object()

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def finished(self) -> None:
        """Every chunk is queued: wait until the consumer has read them all (then the turn commits)."""
        self.queue.put_nowait(self.DONE)
        await self.gate


def _positive_int(name: str, value: int | None, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return value


_CHECKPOINT_FORMAT = 4  # langgraph's checkpoint format version whose channel_values we read directly
TIMESTAMP_KEY = "chatkit_timestamp"  # in a stored message's response_metadata: when it was written (epoch s)


def _stamped(message: Any) -> Any:
    """A shallow copy of ``message`` with the current time in its ``response_metadata``."""
    return message.model_copy(update={"response_metadata": {**message.response_metadata, TIMESTAMP_KEY: time.time()}})


async def _finish_uncancellable(task: asyncio.Future[Any]) -> bool:
    """Wait for ``task`` to finish even if we are cancelled meanwhile; return whether we were."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


class SessionManager:
    """Chat sessions whose turns are serialized per session, atomic, and stored as LangGraph checkpoints.

    Each session is a LangGraph thread; its history is the thread's checkpointed state (one source of
    truth). Turns of one session run one at a time in arrival order and each sees every earlier turn;
    different sessions never wait for each other. A turn commits its user message and reply together:
    if the model raises, the turn exceeds ``turn_timeout`` or the caller is cancelled, the history is
    exactly what it was before the turn and the session is free for the next message.

    Args:
        model: any LangChain chat model (default: :class:`~chatkit.ExtractiveChatModel`).
        store: a LangChain vector store; when given, each turn first retrieves ``retrieve_k`` chunks with
            ``store.as_retriever()`` and the model answers from them.
        checkpointer: any LangGraph ``BaseCheckpointSaver`` (default: a new ``InMemorySaver``).
        policy: what a message does when its session is busy: ``"enqueue"`` (wait, FIFO), ``"reject"``
            (raise :class:`~chatkit.SessionBusy` at once), ``"interrupt"`` (cancel the running turn but
            keep its user message, then run), ``"rollback"`` (cancel the running turn and discard it, then
            run). Queued turns are cancelled by both ``interrupt`` and ``rollback``. Per-call override.
        lock_timeout: longest wait for earlier turns, in seconds (``None``: no limit).
        turn_timeout: longest time for retrieval and the model, in seconds (``None``: no limit).
        max_message_chars: the longest accepted message.
        locking: ``False`` gives the naive service, with no per-session lock (for teaching and tests).
        session_ttl: sessions idle this many seconds expire (``None``: never).
        max_sessions: beyond this many sessions, the least recently used idle ones expire.
        retrieve_k: how many chunks to retrieve per turn.
        timeline: record ``turn``, ``model``, ``search`` spans and the lock's ``wait``/``hold`` spans.
        clock: the monotonic clock for idle-session expiry (inject a fake one in tests).

    A session never expires while a turn runs or waits on it. Expired and deleted sessions are removed
    from the checkpointer too.

    Raises:
        TypeError: a ``model``, ``store`` or ``checkpointer`` of the wrong kind, or a non-numeric limit.
        ValueError: an unknown policy, a non-positive limit, or a policy other than ``"enqueue"`` with
            ``locking=False``.

    Example:
        >>> import asyncio, chatkit
        >>> async def main():
        ...     manager = chatkit.SessionManager()
        ...     sid = manager.create_session()
        ...     await asyncio.gather(*(manager.chat(sid, q) for q in ("Hi!", "Refunds?", "Thanks!")))
        ...     return [(m.role, m.content[:22]) for m in await manager.get_history(sid)]
        >>> for row in asyncio.run(main()):
        ...     print(row)
        ('user', 'Hi!')
        ('assistant', 'Message 1: you said "H')
        ('user', 'Refunds?')
        ('assistant', 'Message 2: you said "R')
        ('user', 'Thanks!')
        ('assistant', 'Message 3: you said "T')
    """

    def __init__(
        self,
        *,
        model: BaseChatModel | None = None,
        store: VectorStore | None = None,
        checkpointer: BaseCheckpointSaver | None = None,
        policy: Policy = "enqueue",
        lock_timeout: float | None = 60.0,
        turn_timeout: float | None = None,
        max_message_chars: int = 8000,
        locking: bool = True,
        session_ttl: float | None = None,
        max_sessions: int | None = None,
        retrieve_k: int = 4,
        timeline: Timeline | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if model is None:
            model = ExtractiveChatModel()
        elif not isinstance(model, BaseChatModel):
            raise TypeError(f"model must be a LangChain BaseChatModel, got {model!r}")
        if store is not None and not callable(getattr(store, "as_retriever", None)):
            raise TypeError(f"store must be a LangChain VectorStore (with as_retriever()), got {store!r}")
        if checkpointer is None:
            checkpointer = InMemorySaver()
        elif not isinstance(checkpointer, BaseCheckpointSaver):
            raise TypeError(f"checkpointer must be a LangGraph BaseCheckpointSaver, got {checkpointer!r}")
        if not isinstance(locking, bool):
            raise TypeError(f"locking must be True or False, got {locking!r}")
        self._locking = locking
        self._policy = self._check_policy(policy)
        self._lock_timeout = check_seconds("lock_timeout", lock_timeout)
        self._turn_timeout = check_seconds("turn_timeout", turn_timeout)
        self._max_chars = _positive_int("max_message_chars", max_message_chars, allow_none=False)
        self._ttl = check_seconds("session_ttl", session_ttl)
        self._max_sessions = _positive_int("max_sessions", max_sessions, allow_none=True)
        self._retrieve_k = _positive_int("retrieve_k", retrieve_k, allow_none=False)
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock
        self._timeline = timeline
        self._model = model
        self._store = store
        self._checkpointer = checkpointer
        builder = build_chat_graph(model=model, store=store, retrieve_k=self._retrieve_k, timeline=timeline)
        # The session's thread: history, read and committed here. The runner computes a turn and
        # writes nothing (checkpointer=False: not even a parent graph's checkpointer is inherited).
        self._graph: CompiledStateGraph = builder.compile(checkpointer=checkpointer)
        self._runner: CompiledStateGraph = builder.compile(checkpointer=False)
        self._lock = KeyedLock(observer=None if timeline is None else timeline.observe_lock)

        # Bookkeeping (sessions, turns in flight, tombstones, counters), all under one threading.Lock: callers
        # may live on several event loops. The short names below are the registry's own objects.
        self._registry = Registry(ttl=self._ttl, max_sessions=self._max_sessions)
        self._guard = self._registry.guard
        self._sessions = self._registry.sessions  # least recently used first
        self._live = self._registry.live  # session id -> what is in flight; absent when nothing is
        self._tombstones = self._registry.tombstones  # removed sessions whose thread is still to be deleted
        self._counts = self._registry.counts
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ properties and introspection

    @property
    def graph(self) -> CompiledStateGraph:
        """The compiled, checkpointed chat graph (the sessions' threads live in its checkpointer)."""
        return self._graph

    @property
    def checkpointer(self) -> BaseCheckpointSaver:
        """The checkpointer holding every session's history."""
        return self._checkpointer

    @property
    def lock(self) -> KeyedLock:
        """The per-session lock (keys are session ids); ``lock.is_busy(session_id)`` and statistics."""
        return self._lock

    @property
    def model(self) -> BaseChatModel:
        """The chat model."""
        return self._model

    @property
    def locking(self) -> bool:
        """Whether turns take their session's lock (``False``: the naive service)."""
        return self._locking

    @property
    def policy(self) -> Policy:
        """The default policy for a message on a busy session."""
        return self._policy  # type: ignore[return-value]

    def statistics(self) -> SessionStatistics:
        """Live state and totals since this manager was made."""
        with self._guard:
            running, waiting = self._registry.census()
            return SessionStatistics(sessions=len(self._sessions), running=running, waiting=waiting, **self._counts)

    def __repr__(self) -> str:
        with self._guard:
            running, waiting = self._registry.census()
            sessions = len(self._sessions)
        return (
            f"<SessionManager sessions={sessions} running={running} waiting={waiting} policy={self._policy!r}"
            f" locking={self._locking} model={type(self._model).__name__}"
            f" checkpointer={type(self._checkpointer).__name__}>"
        )

    def __len__(self) -> int:
        """The number of sessions."""
        return len(self._sessions)

    def is_busy(self, session_id: str) -> bool:
        """Whether a turn is running or queued on ``session_id``."""
        live = self._live.get(session_id)
        return live is not None and bool(live.turns)

    # ------------------------------------------------------------------ sessions

    def create_session(self) -> str:
        """Create an empty session and return its id: 22 url-safe characters, 128 random bits."""
        session_id = secrets.token_urlsafe(16)
        now = self._clock()
        with self._guard:
            self._registry.add(session_id, now)
            expired = self._registry.sweep(now, keep=session_id)
        if expired:
            self._purge_in_background()
        return session_id

    def list_sessions(self) -> list[str]:
        """The ids of the existing sessions, least recently used first."""
        with self._guard:
            return list(self._sessions)

    async def get_history(self, session_id: str) -> list[ChatMessage]:
        """The session's messages in order (user and assistant), read from its latest checkpoint.

        Reading does not wait for a running turn: it sees the history before that turn, since a turn
        becomes visible all at once when it commits.

        Raises:
            SessionNotFound: unknown, deleted, expired or malformed id.
        """
        self._check_session_id(session_id)
        if session_id not in self._sessions:
            raise SessionNotFound(session_id)
        snapshot = await self._graph.aget_state(self._thread(session_id))
        values = snapshot.values or {}
        history: list[ChatMessage] = []
        for m in values.get("messages") or ():
            if isinstance(m, HumanMessage):
                role = "user"
            elif isinstance(m, AIMessage):
                role = "assistant"
            else:
                continue
            ts = m.response_metadata.get(TIMESTAMP_KEY)
            history.append(
                ChatMessage(role, m.text, None if ts is None else datetime.fromtimestamp(ts, UTC))  # type: ignore[arg-type]
            )
        return history

    async def delete_session(self, session_id: str) -> None:
        """Delete the session and its checkpoints, after the turns already queued on it.

        Turns queued behind the deletion then raise :class:`~chatkit.SessionNotFound`.

        Raises:
            SessionNotFound: unknown, already deleted, expired or malformed id.
            LockTimeout: the session's earlier turns took longer than ``lock_timeout``.
        """
        self._check_session_id(session_id)
        with self._guard:
            if session_id not in self._sessions:
                raise SessionNotFound(session_id)
            live = self._registry.in_flight(session_id)
            live.others += 1
        try:
            try:
                lock = self._lock(session_id, timeout=self._lock_timeout, label=caller_label())
                await lock.__aenter__()
            except LockTimeout as exc:
                raise self._lock_timeout_error(session_id, exc, "deleting it") from exc
            try:
                with self._guard:
                    if self._sessions.pop(session_id, None) is None:
                        raise SessionNotFound(session_id)
                    self._tombstones.add(session_id)
                    self._counts["deleted"] += 1
                await self._purge_locked(session_id)
            finally:
                await lock.__aexit__(None, None, None)
        finally:
            with self._guard:
                live.others -= 1
                self._registry.forget_if_idle(session_id, live)

    async def expire_idle(self) -> list[str]:
        """Expire idle sessions now and delete their threads; return the ids expired by this call.

        A session expires when it has been idle ``session_ttl`` seconds, or when there are more than
        ``max_sessions`` sessions and it is among the least recently used idle ones. Turns do this check
        too (it is cheap); this method also waits for the deletion of threads to finish.
        """
        with self._guard:
            expired = self._registry.sweep(self._clock())
        await self._purge_all()
        return expired

    # ------------------------------------------------------------------ chatting

    async def chat(
        self,
        session_id: str,
        message: str,
        *,
        policy: Policy | None = None,
        create_if_missing: bool = False,
    ) -> ChatResult:
        """Send ``message`` and return the reply once the turn (user message and reply) is committed.

        Args:
            session_id: an id from :meth:`create_session` (or your own, with ``create_if_missing``).
            message: the user's text, 1 to ``max_message_chars`` characters, not only whitespace.
            policy: override the manager's policy for this message.
            create_if_missing: create the session if it does not exist; the check and the creation happen
                under the session's lock, so concurrent first messages land in one session.

        Raises:
            ValueError: a bad message (the error names the limit) or policy; nothing is saved.
            SessionNotFound: unknown, deleted, expired or malformed id (without ``create_if_missing``).
            SessionBusy: policy ``"reject"`` and a turn is running or queued on the session.
            TurnInterrupted: a newer message superseded this one (policies ``"interrupt"``, ``"rollback"``).
            LockTimeout: earlier turns kept the session busy longer than ``lock_timeout``.
            TimeoutError: retrieval and the model took longer than ``turn_timeout``; nothing is saved.
            Exception: whatever the model or retriever raised; nothing is saved.
        """
        turn = self._admit(session_id, message, policy, create_if_missing, None)
        error: BaseException | None = None
        try:
            with self._span(turn):
                await self._acquire(turn)
                try:
                    return await self._run(turn)
                finally:
                    await self._release(turn)
        except asyncio.CancelledError as exc:
            error = exc
            interrupted = self._superseded_error(turn, turn.task)
            if interrupted is None:
                raise
            raise interrupted from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish(turn, error)

    async def stream(
        self,
        session_id: str,
        message: str,
        *,
        policy: Policy | None = None,
        create_if_missing: bool = False,
    ) -> AsyncIterator[str]:
        """Like :meth:`chat`, but yield the reply in chunks as the model produces them.

        The message joins its session's queue when iteration starts. The turn commits when the consumer
        has read the stream to its end; a consumer that stops early (``break`` then ``aclose()``, or
        cancellation) cancels the turn and nothing is saved. Close the iterator promptly
        (``contextlib.aclosing``): until it is closed the session stays busy.

        Raises:
            The same exceptions as :meth:`chat`, from the iteration.
        """
        sink = _StreamSink()
        turn = self._admit(session_id, message, policy, create_if_missing, sink)
        consumer = turn.task
        worker: asyncio.Task[ChatResult] | None = None
        getter: asyncio.Future[Any] | None = None
        error: BaseException | None = None
        try:
            with self._span(turn):
                try:
                    await self._acquire(turn)  # in the consumer's task: its place in the queue is its arrival
                except asyncio.CancelledError:
                    interrupted = self._superseded_error(turn, consumer)
                    if interrupted is None:
                        raise
                    raise interrupted from None
                # The turn runs in a worker task, so that cancelling it (a newer message, turn_timeout)
                # never lands in the consumer's own code between two chunks.
                worker = asyncio.get_running_loop().create_task(self._run(turn), name=f"{turn.who} (stream)")
                with self._guard:
                    turn.task = worker
                while True:
                    getter = asyncio.ensure_future(sink.queue.get())
                    await asyncio.wait((getter, worker), return_when=asyncio.FIRST_COMPLETED)
                    if worker.done():
                        break
                    item = getter.result()
                    getter = None
                    if item is _StreamSink.DONE:
                        sink.gate.set_result(None)  # read to the end: now the turn may commit
                        await asyncio.wait((worker,))
                        break
                    yield item
                if worker.cancelled():
                    if turn.superseded is not None:
                        self._mark_interrupted(turn)
                        raise TurnInterrupted(turn.session_id, turn.superseded, kept_message=turn.kept_message)
                    raise asyncio.CancelledError
                worker.result()  # raises what the turn raised
        except BaseException as exc:
            error = exc
            raise
        finally:
            cancelled_again = False
            if getter is not None:
                getter.cancel()
            if worker is not None and not worker.done():
                worker.cancel()  # the consumer stopped early or was cancelled: the turn is cancelled
                cancelled_again = await _finish_uncancellable(worker)  # its cleanup runs to the end
            await self._release(turn)
            if worker is not None and not worker.cancelled():
                worker.exception()  # retrieved: no "exception was never retrieved" noise
            self._finish(turn, error)
            if cancelled_again:
                raise asyncio.CancelledError

    # ------------------------------------------------------------------ the turn

    @staticmethod
    def _thread(session_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": session_id}}

    def _check_policy(self, policy: object) -> str:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        if not getattr(self, "_locking", True) and policy != "enqueue":
            raise ValueError(f"policy {policy!r} needs locking=True; the naive service (locking=False) only enqueues")
        return policy  # type: ignore[return-value]

    def _check_message(self, message: object) -> str:
        limit = self._max_chars
        if not isinstance(message, str):
            raise ValueError(
                f"message must be a str of 1 to {limit} characters (max_message_chars={limit}), "
                f"got {type(message).__name__} {message!r:.60}"
            )
        if not message.strip():
            raise ValueError(
                f"message is empty or only whitespace; send 1 to {limit} characters (max_message_chars={limit})"
            )
        if len(message) > limit:
            raise ValueError(
                f"message is {len(message)} characters long, over the limit of max_message_chars={limit}"
            )
        return message

    @staticmethod
    def _check_session_id(session_id: object) -> None:
        if not isinstance(session_id, str) or _SESSION_ID.fullmatch(session_id) is None:
            raise SessionNotFound(session_id)

    def _lock_timeout_error(self, session_id: str, exc: LockTimeout, what: str) -> LockTimeout:
        return LockTimeout(
            f"session {session_id!r} stayed busy answering earlier messages for {exc.waited:.3g} s, longer than "
            f"lock_timeout={self._lock_timeout:g} s, so we gave up {what}; nothing was saved, please try again",
            keys=exc.keys,
            waited=exc.waited,
        )

    def _admit(
        self, session_id: str, message: str, policy: Policy | None, create_if_missing: bool, sink: _StreamSink | None
    ) -> _Turn:
        """Validate and register a turn, apply its policy. Synchronous: nothing may overtake it meanwhile."""
        t0 = time.perf_counter()
        text = self._check_message(message)
        policy = self._policy if policy is None else self._check_policy(policy)  # type: ignore[assignment]
        self._check_session_id(session_id)
        task = asyncio.current_task()
        assert task is not None, "chat() and stream() run in an asyncio task"
        turn = _Turn(session_id, text, caller_label(), task, asyncio.get_running_loop(), create_if_missing, sink, t0)
        now = self._clock()
        with self._guard:
            expired = self._registry.sweep(now, keep=session_id)
            session = self._sessions.get(session_id)
            if session is None and not create_if_missing:
                raise SessionNotFound(session_id)
            live = self._live.get(session_id)
            if policy == "reject" and live is not None and live.turns:
                self._counts["rejected"] += 1
                raise SessionBusy(session_id)
            victims = (
                [t for t in live.turns if t.state in (WAITING, RUNNING)]
                if live is not None and policy in ("interrupt", "rollback")
                else []
            )
            live = self._registry.in_flight(session_id)
            live.turns.append(turn)
            turn.live = live
            self._registry.touch(session_id, now)
        if expired:
            self._purge_in_background()
        for victim in victims:
            self._supersede(victim, policy)  # type: ignore[arg-type]
        return turn

    def _span(self, turn: _Turn) -> contextlib.AbstractContextManager[None]:
        if self._timeline is None:
            return contextlib.nullcontext()
        return self._timeline.span("turn", who=turn.who, key=turn.session_id)

    async def _acquire(self, turn: _Turn) -> None:
        """Wait for the session's lock (not with ``locking=False``)."""
        if not self._locking:
            return
        request = self._lock(turn.session_id, timeout=self._lock_timeout, label=turn.who)
        try:
            await request.__aenter__()
            # Entered from this helper: record the caller's frame, which stays on the stack for the whole
            # turn, so the lock's re-entry check can see a turn asking again for its own session.
            request.frame = sys._getframe(1)
        except LockTimeout as exc:
            turn.lock_timed_out = True
            raise self._lock_timeout_error(turn.session_id, exc, "sending your message") from exc
        turn.request = request
        turn.waited = time.perf_counter() - turn.t0

    async def _release(self, turn: _Turn) -> None:
        request, turn.request = turn.request, None
        if request is not None:
            await request.__aexit__(None, None, None)

    def _mark_interrupted(self, turn: _Turn) -> None:
        if self._timeline is not None:
            self._timeline.mark("interrupted", who=turn.who, key=turn.session_id, detail=f"policy {turn.superseded}")

    def _superseded_error(self, turn: _Turn, task: asyncio.Task[Any]) -> TurnInterrupted | None:
        """For a CancelledError in ``task``: the TurnInterrupted to raise instead, if a newer message caused it
        and nothing else cancelled the task too."""
        if turn.superseded is None:
            return None
        self._mark_interrupted(turn)
        if task.uncancel() > 0:
            return None
        return TurnInterrupted(turn.session_id, turn.superseded, kept_message=turn.kept_message)

    def _finish(self, turn: _Turn, error: BaseException | None) -> None:
        """Bookkeeping when a turn ends, however it ends."""
        if error is None:
            outcome = "completed"
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            outcome = "interrupted" if turn.superseded is not None else "cancelled"
        elif isinstance(error, TurnInterrupted):
            outcome = "interrupted"
        elif isinstance(error, TimeoutError):
            outcome = "lock_timeouts" if turn.lock_timed_out else "timed_out"
        else:
            outcome = "failed"
        session_id = turn.session_id
        with self._guard:
            turn.state = DONE
            live = turn.live
            if live is not None:
                live.turns.remove(turn)
                self._registry.forget_if_idle(session_id, live)
            self._counts[outcome] += 1
            session = self._registry.touch(session_id, self._clock())
            if session is not None and outcome == "completed":
                session.turns += 1

    async def _run(self, turn: _Turn) -> ChatResult:
        """The turn, holding the session's lock (or not, with ``locking=False``)."""
        session_id, text, sink = turn.session_id, turn.text, turn.sink
        with self._guard:
            turn.state = RUNNING
            exists = session_id in self._sessions
            purge = session_id in self._tombstones
        if not exists:
            if not turn.create_if_missing:
                raise SessionNotFound(session_id)  # deleted or expired while this turn waited
            if purge:  # the id was removed recently and its old thread is not deleted yet
                await self._purge_locked(session_id)
            now = self._clock()
            with self._guard:
                if session_id not in self._sessions:
                    self._registry.add(session_id, now)
        thread = self._thread(session_id)
        user = HumanMessage(text, id=str(uuid.uuid4()), response_metadata={TIMESTAMP_KEY: time.time()})
        # Where the commit goes: on the checkpoint this turn reads. Under the lock nobody else writes
        # the thread, so that is the latest one and the thread config says it (LangGraph then skips a
        # check for a newer checkpoint). The naive service pins the checkpoint it read, as a
        # read-modify-write service would, and the last writer wins.
        target: RunnableConfig = thread
        try:
            history, read = await self._read_history(thread)
            if not self._locking:
                if read is None:
                    # a new thread: write an empty checkpoint to pin, as the naive service "saves" first
                    target = await self._graph.aupdate_state(thread, {"messages": []}, as_node=GENERATE)
                else:
                    target = read
            # Compute the reply; nothing is written meanwhile.
            deadline = asyncio.timeout(self._turn_timeout)
            try:
                async with deadline:
                    reply, docs = await self._compute(history, user, turn, sink)
            except TimeoutError as exc:
                if not deadline.expired():
                    raise
                raise TimeoutError(
                    f"the reply on session {session_id!r} took longer than turn_timeout={self._turn_timeout:g} s; "
                    "nothing was saved"
                ) from exc
            if sink is not None:
                await sink.finished()
        except asyncio.CancelledError:
            if turn.superseded == "interrupt":
                await self._keep_user_message(turn, target, user)
            raise
        with self._guard:
            superseded = turn.superseded
            if superseded is None:
                turn.state = COMMITTING
        if superseded is not None:  # cancelled, but something swallowed the CancelledError
            if superseded == "interrupt":
                await self._keep_user_message(turn, target, user)
            raise asyncio.CancelledError
        # Commit: the user message and the reply, together, as one new checkpoint.
        reply = _stamped(reply)
        commit = asyncio.ensure_future(self._graph.aupdate_state(target, {"messages": [user, reply]}, as_node=GENERATE))
        if await _finish_uncancellable(commit):
            # The caller went away while the turn was being written: take it out again (one more
            # checkpoint, whose messages are exactly the pre-turn ones).
            if not commit.cancelled() and commit.exception() is None:
                removal = {"messages": [RemoveMessage(id=user.id), RemoveMessage(id=reply.id)]}  # type: ignore[arg-type]
                undo = asyncio.ensure_future(self._graph.aupdate_state(thread, removal, as_node=GENERATE))
                await _finish_uncancellable(undo)
                if undo.cancelled() or undo.exception() is not None:
                    logger.error("could not take a cancelled turn out of session %r", session_id)
            raise asyncio.CancelledError
        commit.result()
        sources = tuple(dict.fromkeys(str(d.metadata.get("source", d.id)) for d in docs))
        n_user = sum(isinstance(m, HumanMessage) for m in history) + 1
        return ChatResult(
            reply=reply.text,
            session_id=session_id,
            turn=n_user,
            sources=sources,
            waited=turn.waited,
            elapsed=time.perf_counter() - turn.t0,
        )

    async def _read_history(self, thread: RunnableConfig) -> tuple[list[Any], RunnableConfig | None]:
        """The messages of the thread's latest checkpoint, and that checkpoint's config (None: no checkpoint).

        Reads the checkpoint tuple directly (the ``messages`` channel keeps whole lists in checkpoints);
        a checkpoint in an older format goes through ``aget_state``, which migrates it.
        """
        saved = await self._checkpointer.aget_tuple(thread)
        if saved is None:
            return [], None
        if saved.checkpoint.get("v", 0) < _CHECKPOINT_FORMAT:
            snapshot = await self._graph.aget_state(thread)
            return list(snapshot.values.get("messages") or ()), snapshot.config
        return list(saved.checkpoint["channel_values"].get("messages") or ()), saved.config

    async def _compute(
        self, history: list[Any], user: HumanMessage, turn: _Turn, sink: _StreamSink | None
    ) -> tuple[Any, list[Any]]:
        """Run retrieve -> generate on ``history + [user]`` without writing anything; return (reply, docs)."""
        inputs = {"messages": [*history, user]}
        config: RunnableConfig = {
            "configurable": {WHO_KEY: turn.who, SESSION_KEY: turn.session_id},
            "run_name": "chatkit turn",
        }
        if sink is None:
            out = await self._runner.ainvoke(inputs, config)
        else:
            out = None
            async for mode, payload in self._runner.astream(inputs, config, stream_mode=["messages", "values"]):
                if mode == "values":
                    out = payload
                    continue
                chunk, meta = payload
                if meta.get("langgraph_node") == GENERATE and isinstance(chunk, AIMessageChunk):
                    piece = chunk.text
                    if piece:
                        sink.queue.put_nowait(piece)
            assert out is not None
        reply = out["messages"][-1]
        if not isinstance(reply, AIMessage):
            raise TypeError(f"the model must reply with an AIMessage, got {reply!r:.80}")
        return reply, list(out.get("context") or ())

    async def _keep_user_message(self, turn: _Turn, target: RunnableConfig, user: HumanMessage) -> None:
        """Policy ``interrupt``: commit the superseded turn's user message alone (shielded)."""
        with self._guard:
            turn.state = CLEANUP
        write = asyncio.ensure_future(self._graph.aupdate_state(target, {"messages": [user]}, as_node=GENERATE))
        await _finish_uncancellable(write)
        if not write.cancelled() and write.exception() is None:
            turn.kept_message = True
        else:
            logger.error("could not keep the interrupted message on session %r", turn.session_id)

    def _supersede(self, victim: _Turn, policy: str) -> None:
        """Cancel ``victim`` on behalf of a newer message, on the victim's own event loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if victim.loop is running:
            self._deliver_cancel(victim, policy)
            return
        with contextlib.suppress(RuntimeError):  # the victim's loop is closed: nothing to cancel
            victim.loop.call_soon_threadsafe(self._deliver_cancel, victim, policy)

    def _deliver_cancel(self, victim: _Turn, policy: str) -> None:
        # Runs on the victim's loop, while the victim is suspended: if it is still waiting or running,
        # the CancelledError lands at the await it is suspended in.
        with self._guard:
            if victim.state not in (WAITING, RUNNING) or victim.superseded is not None:
                return
            victim.superseded = policy
            task = victim.task
        task.cancel(f"superseded by a newer message (policy {policy!r})")

    # ------------------------------------------------------------------ expiry and deletion

    async def _purge_locked(self, session_id: str) -> None:
        """Holding the session's lock (or as its turn): delete a removed session's thread."""
        with self._guard:
            if session_id not in self._tombstones:
                return
        try:
            await self._checkpointer.adelete_thread(session_id)
        except NotImplementedError:
            logger.warning(
                "%s cannot delete threads: the history of removed session %r stays in it",
                type(self._checkpointer).__name__,
                session_id,
            )
        with self._guard:
            self._tombstones.discard(session_id)

    async def _purge_all(self) -> None:
        """Delete the threads of every removed session (each once per call), under its session's lock."""
        me, loop = asyncio.current_task(), asyncio.get_running_loop()
        pending = [t for t in list(self._background) if not t.done() and t is not me and t.get_loop() is loop]
        if pending:
            await asyncio.wait(pending)
        tried: set[str] = set()
        while True:
            with self._guard:
                todo = sorted(self._tombstones - tried)
            if not todo:
                return
            for sid in todo:
                tried.add(sid)
                try:
                    async with self._lock(sid, label="expiry"):
                        await self._purge_locked(sid)
                except Exception:
                    logger.exception("could not delete the checkpoints of removed session %r", sid)

    def _purge_in_background(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop here: the next expire_idle() deletes the threads
        if any(not t.done() and t.get_loop() is loop for t in list(self._background)):
            return  # the running one deletes every tombstone it has not tried yet
        task = loop.create_task(self._purge_all(), name="chatkit session expiry")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
