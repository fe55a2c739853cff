"""Lock-protected chat sessions on LangGraph: atomic turns, double-texting policies, sessions in the checkpointer.

A session is a LangGraph thread of the checkpointer (see :mod:`chatkit.sessions.threads`); its state is the
thread's latest checkpoint. The graph is the built-in ``retrieve -> generate`` one or the caller's own
``StateGraph`` (tools, several nodes, subgraphs, custom state keys).

How a turn works (``locking=True``):

1. *Admission*, synchronously (no ``await`` before the turn joins its session's queue, so turns keep their
   arrival order): validate, apply the policy (``reject`` refuses at once, ``interrupt``/``rollback``
   cancel the session's turns in flight), record the turn in the session's queue.
2. Take the session's lock. A turn joins the lock's queue once every earlier turn of the session has
   joined it (a stream's turn runs in its own task, which may start a moment later), so the lock serves
   them in arrival order; ``lock_timeout`` counts from arrival.
3. Read the thread's latest checkpoint: no checkpoint means no session (unless ``create_if_missing``), and
   one idle past ``session_ttl`` means an expired one. With a cross-process lock, the turn first *claims*
   the thread on the fenced checkpointer (raises its newest fencing token to the turn's own).
4. Compute: run the graph on a :class:`~chatkit.sessions.sandbox.TurnSandbox` that starts from that
   checkpoint and keeps what the run saves in memory, inside ``turn_timeout``. Nothing is written while the
   graph runs, so a model or tool error, a timeout or a cancellation leaves the thread exactly as it was.
5. Commit: one write, :meth:`~chatkit.sessions.threads.ThreadStore.commit`, stores the run's final
   checkpoint (the whole state: user message, tool calls and results, reply, custom keys) as a child of
   the checkpoint read in step 3. On a fenced checkpointer this is a compare-and-set inside the database
   transaction (refused with :class:`~chatkit.StaleCommit` if the head moved or a newer lock holder claimed
   the thread). The write is shielded from cancellation; a caller cancelled during it gets
   ``CancelledError`` once it has finished, and the turn is reverted (one more checkpoint with the
   pre-turn state); a turn whose lock was lost while it was written keeps what the database decided.
6. Prune the thread's old checkpoints (``keep_checkpoints``), then release the lock.

LangGraph's own ``ainvoke`` is not atomic (it checkpoints the input message before the model runs, and
that checkpoint stays when the model fails or is cancelled), which is why a turn is computed first and
committed once. ``locking=False`` skips step 2 and commits on the checkpoint each turn read, as a
read-modify-write service does; it shows the two races: turns of one session read the same checkpoint,
each commits a branch on it, and the last commit wins (messages lost, replies computed without the
earlier turns).

A stream's turn runs in a worker task of its own, holding the lock there, and buffers its chunks: it
commits whatever the consumer's pace, a newer message interrupts it without waiting for the consumer, and
a consumer that stops early cancels it (if it has not committed yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple, get_checkpoint_id
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph

from .._labels import caller_label
from ..errors import LockLost, LockTimeout, SessionBusy, SessionNotFound, StaleCommit
from ..locks import AsyncKeyLock, KeyedLock, check_seconds
from ..models import ExtractiveChatModel
from .coordination import AT_ONCE, coordinator_for
from .fencing import fenced_alternative, is_fenced
from .graph import SESSION_KEY, WHO_KEY, build_chat_graph, check_graph
from .queue import CLEANUP, COMMITTING, RUNNING, ChunkBuffer, Entry, TurnQueue
from .registry import DONE, WAITING, Registry
from .sandbox import TurnSandbox, TurnWrite, initial_write, kept_message_write, revert_write
from .threads import LAST_USED_KEY, MARK, MARK_KEY, ThreadStore, last_used_of, thread_config
from .types import POLICIES, ChatMessage, ChatResult, Policy, SessionStatistics, TurnInterrupted
from .validate import check_config, check_message, check_session_id, positive_int

if TYPE_CHECKING:
    from langchain_core.vectorstores import VectorStore
    from langgraph.graph import StateGraph

    from ..timeline import Timeline

__all__ = ["SessionManager", "ChatResult", "ChatMessage", "SessionStatistics", "TurnInterrupted"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_NOTHING: Any = object()  # a turn's body has not returned

_CHECKPOINT_FORMAT = 4  # langgraph's checkpoint format version whose channel_values we read directly
TIMESTAMP_KEY = "chatkit_timestamp"  # in a stored message's response_metadata: when it was written (epoch s)

# (manager, session) pairs whose turn is running in this context. LangGraph runs nodes in child tasks,
# which inherit it: a model or tool that calls chat() on its own session is refused at once.
_ACTIVE_TURNS: contextvars.ContextVar[frozenset[tuple[str, str]]] = contextvars.ContextVar(
    "chatkit_active_turns", default=frozenset()
)

# Savers whose async methods raise NotImplementedError, and what to use instead.
_SYNC_ONLY = {
    "langgraph.checkpoint.sqlite.SqliteSaver": "AsyncSqliteSaver (langgraph.checkpoint.sqlite.aio)",
    "langgraph.checkpoint.postgres.PostgresSaver": "AsyncPostgresSaver (langgraph.checkpoint.postgres.aio)",
}


def _stamped(message: Any, now: float) -> Any:
    """A shallow copy of ``message`` with ``now`` in its ``response_metadata``."""
    return message.model_copy(update={"response_metadata": {**message.response_metadata, TIMESTAMP_KEY: now}})


async def _finish_uncancellable(task: asyncio.Future[Any]) -> bool:
    """Wait for ``task`` to finish even if we are cancelled meanwhile; return whether we were."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_async_saver(saver: object) -> BaseCheckpointSaver:
    if not isinstance(saver, BaseCheckpointSaver):
        raise TypeError(f"checkpointer must be a LangGraph BaseCheckpointSaver, got {saver!r:.80}")
    for cls in type(saver).__mro__:
        alternative = _SYNC_ONLY.get(f"{cls.__module__}.{cls.__qualname__}")
        if alternative is not None:
            raise TypeError(
                f"checkpointer {type(saver).__name__} is synchronous only (its async methods raise "
                f"NotImplementedError) and SessionManager is async; use {alternative} instead"
            )
    missing = [m for m in ("aget_tuple", "aput", "alist") if getattr(type(saver), m) is getattr(BaseCheckpointSaver, m)]
    if missing:
        raise TypeError(
            f"checkpointer {type(saver).__name__} does not implement {', '.join(missing)}; SessionManager needs an "
            "async saver (InMemorySaver, AsyncSqliteSaver, AsyncPostgresSaver)"
        )
    return saver


class SessionManager:
    """Chat sessions whose turns are serialized per session, atomic, and stored as LangGraph checkpoints.

    Each session is a LangGraph thread of ``checkpointer``; its state is the thread's latest checkpoint
    (one source of truth, which another manager given the same checkpointer sees too, after a restart or
    in another process). Turns of one session run one at a time in arrival order and each sees every
    earlier turn; different sessions never wait for each other. A turn commits its whole result at once
    (the user message, any tool calls and results, the reply): if the model or a tool raises, the turn
    exceeds ``turn_timeout`` or the caller is cancelled, the thread is exactly what it was before the turn
    and the session is free for the next message.

    Args:
        graph: your own LangGraph ``StateGraph``, uncompiled (or a function of no arguments returning one),
            whose state has a ``messages`` channel: a tool-calling agent, several nodes, subgraphs, custom
            state keys. Each user message goes in as ``{"messages": [HumanMessage]}``; the turn must end with
            an ``AIMessage`` (the reply) as the last message. Default: the built-in graph (``retrieve`` from
            ``store`` when given, then ``generate`` with ``model``).
        model: the built-in graph's chat model: any LangChain chat model or chat Runnable (``bind_tools``,
            ``with_retry()``, ``with_fallbacks(...)``, ``prompt | model``), called with the message list
            (default: :class:`~chatkit.ExtractiveChatModel`).
        store: a LangChain vector store; the built-in graph then first retrieves ``retrieve_k`` chunks with
            ``store.as_retriever()`` and the model answers from them.
        checkpointer: any async LangGraph ``BaseCheckpointSaver`` (default: a new ``InMemorySaver``).
        lock: any lock implementing :class:`~chatkit.locks.AsyncKeyLock` (default: a new
            :class:`~chatkit.KeyedLock`). A :class:`~chatkit.RedisKeyedLock` shared by several processes
            serializes their turns and carries the policies across them (see
            :mod:`chatkit.sessions.coordination`); it needs a fenced ``checkpointer``
            (:mod:`chatkit.sessions.fencing`), whose commits a worker that lost its lock cannot overwrite.
        policy: what a message does when its session is busy: ``"enqueue"`` (wait, FIFO), ``"reject"``
            (raise :class:`~chatkit.SessionBusy` at once), ``"interrupt"`` (cancel the running turn but
            keep its user message, then run), ``"rollback"`` (cancel the running turn and discard it, then
            run). Queued turns are cancelled by both ``interrupt`` and ``rollback``. Per-call override.
        lock_timeout: longest wait for earlier turns, in seconds (``None``: no limit).
        turn_timeout: longest time for the graph run, in seconds (``None``: no limit).
        max_message_chars: the longest accepted message.
        locking: ``False`` gives the naive service, with no per-session lock (for teaching and tests).
        session_ttl: sessions idle this many seconds (since their last saved turn) expire (``None``: never).
        max_sessions: beyond this many sessions, the least recently used idle ones expire.
        keep_checkpoints: the newest checkpoints kept per session after each turn (older ones are deleted,
            so storage grows linearly with a session's length); ``None`` keeps all, and so does the naive
            service (``locking=False``: nothing orders its writes). Savers other than
            ``InMemorySaver``, ``AsyncSqliteSaver`` and ``AsyncPostgresSaver`` are pruned with their own
            ``aprune`` (keep_latest) if they have one, else not at all.
        retrieve_k: how many chunks the built-in graph retrieves per turn (default 4).
        timeline: record ``turn`` spans, the built-in graph's ``model`` and ``search`` spans and the lock's
            ``wait``/``hold`` spans.
        clock: the clock of idle-session expiry, in seconds (default ``time.time``; the time of a session's
            last use is stored in its checkpoints, so it must mean the same to every manager that shares them).

    A session never expires while a turn runs or waits on it. Expired and deleted sessions are removed
    from the checkpointer too. Close the manager (``aclose()``, ``close()``, ``async with`` / ``with``) to
    finish deleting expired sessions before the event loop ends.

    Raises:
        TypeError: a ``graph``, ``model``, ``store``, ``checkpointer`` (a sync-only saver such as
            ``SqliteSaver`` included) or ``lock`` of the wrong kind, a non-numeric limit, or a cross-process
            lock with a checkpointer that is not fenced (the message names the fenced saver to use).
        ValueError: an unknown policy, a non-positive limit, a policy other than ``"enqueue"`` with
            ``locking=False``, ``model``/``store``/``retrieve_k`` together with ``graph``, or a graph
            without a ``messages`` channel.

    Example:
        >>> import asyncio, chatkit
        >>> async def main():
        ...     async with chatkit.SessionManager() as manager:
        ...         sid = await manager.create_session()
        ...         await asyncio.gather(*(manager.chat(sid, q) for q in ("Hi!", "Refunds?", "Thanks!")))
        ...         return [(m.role, m.content[:22]) for m in await manager.get_history(sid)]
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
        graph: StateGraph | Callable[[], StateGraph] | None = None,
        model: Runnable[Any, Any] | None = None,
        store: VectorStore | None = None,
        checkpointer: BaseCheckpointSaver | None = None,
        lock: AsyncKeyLock | None = None,
        policy: Policy = "enqueue",
        lock_timeout: float | None = 60.0,
        turn_timeout: float | None = None,
        max_message_chars: int = 8000,
        locking: bool = True,
        session_ttl: float | None = None,
        max_sessions: int | None = None,
        keep_checkpoints: int | None = 4,
        retrieve_k: int | None = None,
        timeline: Timeline | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(locking, bool):
            raise TypeError(f"locking must be True or False, got {locking!r}")
        self._locking = locking
        self._policy = self._check_policy(policy)
        self._lock_timeout = check_seconds("lock_timeout", lock_timeout)
        self._turn_timeout = check_seconds("turn_timeout", turn_timeout)
        self._max_chars = positive_int("max_message_chars", max_message_chars, allow_none=False)
        self._ttl = check_seconds("session_ttl", session_ttl)
        self._max_sessions = positive_int("max_sessions", max_sessions, allow_none=True)
        self._keep = positive_int("keep_checkpoints", keep_checkpoints, allow_none=True)
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock
        self._timeline = timeline
        if graph is not None:
            given = [n for n, v in (("model", model), ("store", store), ("retrieve_k", retrieve_k)) if v is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} configure the built-in graph; with graph= build your model and retrieval "
                    "into your own graph"
                )
            builder = check_graph(graph)
            self._model: Runnable[Any, Any] | None = None
        else:
            if model is None:
                model = ExtractiveChatModel()
            elif not isinstance(model, Runnable):
                raise TypeError(
                    f"model must be a LangChain chat model or chat Runnable (e.g. model.bind_tools(...), "
                    f"model.with_retry(), prompt | model), got {model!r:.80}"
                )
            if store is not None and not callable(getattr(store, "as_retriever", None)):
                raise TypeError(f"store must be a LangChain VectorStore (with as_retriever()), got {store!r:.80}")
            k = positive_int("retrieve_k", 4 if retrieve_k is None else retrieve_k, allow_none=False)
            builder = build_chat_graph(model=model, store=store, retrieve_k=k or 4, timeline=timeline)
            self._model = model
        if checkpointer is None:
            checkpointer = InMemorySaver()
        self._checkpointer = _check_async_saver(checkpointer)
        if lock is None:
            lock = KeyedLock(observer=None if timeline is None else timeline.observe_lock)
        elif not isinstance(lock, AsyncKeyLock):
            raise TypeError(f"lock must implement chatkit.locks.AsyncKeyLock (e.g. a KeyedLock), got {lock!r:.80}")
        elif timeline is not None:
            lock.add_observer(timeline.observe_lock)
        self._lock: AsyncKeyLock = lock
        # How the policies reach turns on other processes, chosen from the lock's type (no-ops in-process).
        self._coordinator = coordinator_for(lock, on_supersede=self._supersede_tickets)
        if locking and self._coordinator.distributed and not is_fenced(checkpointer):
            raise TypeError(
                f"checkpointer {type(checkpointer).__name__} is not fenced, and the lock ({type(lock).__name__}) is "
                "shared by processes: a worker that lost the lock without noticing in time (paused, cut off from "
                "the lock's server) could then overwrite a newer turn, and nobody would know. Use "
                f"{fenced_alternative(checkpointer)} instead: it refuses such a write (StaleCommit)"
            )
        # The sessions' threads live in `checkpointer`; `graph` is the graph compiled with it (for
        # inspection: aget_state, aget_state_history). A turn runs `_runner` on a TurnSandbox.
        self._graph: CompiledStateGraph = builder.compile(checkpointer=checkpointer)
        self._runner: CompiledStateGraph = builder.compile()
        self._messages = self._runner.channels["messages"]
        self._threads = ThreadStore(
            checkpointer, keep=self._keep, fence_writes=locking, shared_tokens=self._coordinator.shared_tokens
        )
        self._uid = secrets.token_hex(8)
        self._closed = False

        # Bookkeeping (work in flight, the session cache, tombstones, counters) under one threading.Lock:
        # callers may live on several event loops.
        self._registry = Registry(ttl=self._ttl, max_sessions=self._max_sessions)
        self._guard = self._registry.guard
        self._counts = self._registry.counts
        # KeyedLock and RedisKeyedLock join their queue in the first step of the awaiting task: a later turn
        # on the same event loop may follow as soon as the earlier one starts to wait. Other locks (or
        # loops): once it holds.
        self._queue = TurnQueue(self._guard, early_join=self._coordinator.early_join)
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ properties and introspection

    @property
    def graph(self) -> CompiledStateGraph:
        """The graph compiled with the checkpointer (for ``aget_state``, ``aget_state_history`` of a session)."""
        return self._graph

    @property
    def checkpointer(self) -> BaseCheckpointSaver:
        """The checkpointer holding every session."""
        return self._checkpointer

    @property
    def lock(self) -> AsyncKeyLock:
        """The per-session lock (keys are session ids)."""
        return self._lock

    @property
    def model(self) -> Runnable[Any, Any] | None:
        """The built-in graph's chat model (``None`` with ``graph=``)."""
        return self._model

    @property
    def locking(self) -> bool:
        """Whether turns take their session's lock (``False``: the naive service)."""
        return self._locking

    @property
    def policy(self) -> Policy:
        """The default policy for a message on a busy session."""
        return self._policy  # type: ignore[return-value]

    @property
    def keep_checkpoints(self) -> int | None:
        """The newest checkpoints kept per session (``None``: all)."""
        return self._keep

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` or :meth:`close` was called."""
        return self._closed

    def statistics(self) -> SessionStatistics:
        """Live state and totals since this manager was made."""
        with self._guard:
            running, waiting = self._registry.census()
            return SessionStatistics(
                sessions=len(self._registry.sessions), running=running, waiting=waiting, **self._counts
            )

    def __repr__(self) -> str:
        with self._guard:
            running, waiting = self._registry.census()
            sessions = len(self._registry.sessions)
        graph = "built-in" if self._model is not None else "custom"
        return (
            f"<SessionManager sessions={sessions} running={running} waiting={waiting} policy={self._policy!r}"
            f" locking={self._locking} graph={graph} checkpointer={type(self._checkpointer).__name__}"
            f"{' closed' if self._closed else ''}>"
        )

    def is_busy(self, session_id: str) -> bool:
        """Whether a turn of this manager is running or queued on ``session_id`` (no round trip).

        With a lock shared by processes, other workers' turns are not seen: :meth:`ais_busy` asks the lock.
        """
        live = self._registry.live.get(session_id)
        return live is not None and any(e.kind == "turn" for e in list(live.entries))

    async def ais_busy(self, session_id: str) -> bool:
        """Whether a turn is running or queued on ``session_id`` here or, with a ``RedisKeyedLock``, in any
        process using the lock's namespace (one round trip to Redis when nothing runs here).

        Raises:
            LockServerUnavailable: the lock's Redis server could not be reached.
        """
        return self.is_busy(session_id) or await self._coordinator.ais_busy(session_id)

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Refuse new turns and sessions, and finish deleting the threads of expired sessions.

        Turns already in flight run to their end. Reads (``get_history``, ``list_sessions``) keep working.
        With a ``RedisKeyedLock``, it also stops listening for other workers' supersede requests (close the
        lock yourself, after the manager). Idempotent.
        """
        self._closed = True
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        for task in list(self._background):
            if task is me or task.done():
                continue
            other = task.get_loop()
            if other is loop:
                await _finish_uncancellable(task)
            elif other.is_running():
                waiter = asyncio.run_coroutine_threadsafe(_finish_uncancellable(task), other)
                await asyncio.wrap_future(waiter)
        await self._purge_all()
        await self._coordinator.aclose()

    def close(self) -> None:
        """:meth:`aclose` from synchronous code (no event loop may run in this thread).

        Raises:
            RuntimeError: called from a running event loop (use ``await manager.aclose()`` there).
        """
        if _running_loop() is not None:
            raise RuntimeError(
                "SessionManager.close() was called from a running event loop, which it would block; "
                "use 'await manager.aclose()' or 'async with' there"
            )
        asyncio.run(self.aclose())

    async def __aenter__(self) -> SessionManager:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __enter__(self) -> SessionManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this SessionManager is closed; it refuses new turns and sessions")

    # ------------------------------------------------------------------ sessions

    async def create_session(self) -> str:
        """Create an empty session and return its id: 22 url-safe characters, 128 random bits.

        The session's first checkpoint is written at once: it exists for every manager sharing the
        checkpointer.

        Raises:
            RuntimeError: the manager is closed.
        """
        self._check_open()
        session_id = secrets.token_urlsafe(16)
        now = self._clock()
        await self._threads.commit(session_id, start=None, write=initial_write(self._metadata(now)), token=None)
        if self._max_sessions is not None and not self._registry.loaded:
            await self._load()
        with self._guard:
            self._registry.learn(session_id, now)
            self._counts["created"] += 1
            expired = self._registry.sweep(now, keep=session_id)
        if expired:
            self._purge_in_background()
        return session_id

    async def list_sessions(self) -> list[str]:
        """The ids of the existing sessions, least recently used first, read from the checkpointer.

        Reads the newest checkpoints of every session (a checkpointer lists checkpoints, not threads).
        """
        heads = await self._threads.scan()
        now = self._clock()
        with self._guard:
            alive = [h for h in heads if self._registry.is_alive(h.session_id, h.last_used, now)]
            names = {h.session_id for h in alive}
            buried = [h for h in heads if h.session_id not in names and self._registry.bury(h.session_id, h.last_used)]
            self._registry.replace((h.session_id, h.last_used) for h in alive)
        if buried:
            self._purge_in_background()
        alive.sort(key=lambda h: (h.last_used, h.checkpoint_id))
        return [h.session_id for h in alive]

    async def get_history(self, session_id: str) -> list[ChatMessage]:
        """The session's messages in order (user and assistant), read from its latest checkpoint.

        Reading does not wait for a running turn: it sees the history before that turn, since a turn
        becomes visible all at once when it commits. Tool calls without text and tool results are left out.

        Raises:
            SessionNotFound: unknown, deleted, expired or malformed id.
        """
        sid = check_session_id(session_id)
        saved = await self._threads.read(sid)
        if saved is None or not self._alive_now(sid, saved):
            raise SessionNotFound(sid)
        if saved.checkpoint.get("v", 0) < _CHECKPOINT_FORMAT:
            values = (await self._graph.aget_state(thread_config(sid))).values or {}
        else:
            values = saved.checkpoint["channel_values"]
        history: list[ChatMessage] = []
        for m in values.get("messages") or ():
            if isinstance(m, HumanMessage):
                role = "user"
            elif isinstance(m, AIMessage) and m.text:
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
            RuntimeError: the manager is closed, or called from a turn of this very session.
        """
        self._check_open()
        sid = check_session_id(session_id)
        self._check_not_own_turn(sid, "delete_session")
        entry = self._enter(
            Entry("delete", sid, caller_label(), asyncio.current_task(), asyncio.get_running_loop(),
                   time.perf_counter(), self._clock())
        )
        try:
            await self._execute(entry, lambda token: self._run_delete(entry, token))
        finally:
            self._finish(entry, None)

    async def expire_idle(self) -> list[str]:
        """Expire idle sessions now and delete their threads; return the ids expired by this call.

        A session expires when it has been idle ``session_ttl`` seconds, or when there are more than
        ``max_sessions`` sessions and it is among the least recently used idle ones. Readers already
        treat an expired session as gone; this method also deletes the threads, and waits for it.
        """
        heads = await self._threads.scan()
        now = self._clock()
        with self._guard:
            alive = [h for h in heads if self._registry.is_alive(h.session_id, h.last_used, now)]
            names = {h.session_id for h in alive}
            expired = [
                h.session_id
                for h in sorted(heads, key=lambda h: h.last_used)
                if h.session_id not in names and self._registry.bury(h.session_id, h.last_used)
            ]
            self._registry.replace((h.session_id, h.last_used) for h in alive)
            expired += self._registry.sweep(now)
        await self._purge_all()
        return expired

    async def _load(self) -> None:
        """Fill the session cache from the checkpointer (once, for ``max_sessions``)."""
        heads = await self._threads.scan()
        now = self._clock()
        with self._guard:
            if not self._registry.loaded:
                self._registry.replace(
                    (h.session_id, h.last_used) for h in heads if self._registry.is_alive(h.session_id, h.last_used, now)
                )

    def _metadata(self, now: float) -> dict[str, Any]:
        return {MARK_KEY: MARK, LAST_USED_KEY: now}

    def _gone_at(self, session_id: str, last_used: float, when: float) -> bool:
        """Guard held: whether a session last used at ``last_used`` was gone (expired, or found expired
        since) at ``when``, the arrival of the turn or deletion that asks, whatever is in flight."""
        if self._ttl is not None and last_used + self._ttl <= when:
            return True
        mark = self._registry.tombstones.get(session_id)
        return mark is not None and last_used <= mark

    def _alive_now(self, session_id: str, saved: CheckpointTuple) -> bool:
        """Whether the session whose latest checkpoint is ``saved`` exists now (else it is buried)."""
        last_used = last_used_of(saved)
        now = self._clock()
        with self._guard:
            if self._registry.is_alive(session_id, last_used, now):
                return True
            buried = self._registry.bury(session_id, last_used)
        if buried:
            self._purge_in_background()
        return False

    # ------------------------------------------------------------------ chatting

    async def chat(
        self,
        session_id: str,
        message: str,
        *,
        policy: Policy | None = None,
        create_if_missing: bool = False,
        config: RunnableConfig | None = None,
    ) -> ChatResult:
        """Send ``message`` and return the reply once the turn is committed.

        Args:
            session_id: an id from :meth:`create_session` (or your own, with ``create_if_missing``).
            message: the user's text, 1 to ``max_message_chars`` characters, not only whitespace, without
                control characters (NUL, ANSI escapes) or lone surrogates.
            policy: override the manager's policy for this message.
            create_if_missing: create the session if it does not exist; the check and the creation happen
                under the session's lock, so concurrent first messages land in one session.
            config: a LangChain ``RunnableConfig`` for the graph run: ``callbacks`` (tracing), ``tags``,
                ``metadata``, ``recursion_limit``, ``run_name``, ``max_concurrency``, ``configurable``
                (not the thread: the session is the thread).

        Raises:
            TypeError: a message that is not a str, or a config that is not a dict.
            ValueError: a bad message (the error names the limit or the character) or policy, or a config
                that names the thread; nothing is saved.
            SessionNotFound: unknown, deleted, expired or malformed id (without ``create_if_missing``).
            SessionBusy: policy ``"reject"`` and a turn is running or queued on the session (in any process,
                with a cross-process lock).
            TurnInterrupted: a newer message superseded this one (policies ``"interrupt"``, ``"rollback"``).
            LockTimeout: earlier turns kept the session busy longer than ``lock_timeout``.
            TimeoutError: the graph run took longer than ``turn_timeout``; nothing is saved.
            StaleCommit: a fenced checkpointer refused the turn's commit (another writer committed first,
                or this worker lost the session's lock); nothing is saved, every committed turn stays.
            LockLost: (cross-process lock) the session's lock was lost before the turn committed; nothing
                is saved.
            LockServerUnavailable: (cross-process lock) its Redis server could not be reached.
            RuntimeError: the manager is closed, the call comes from a turn of this very session (its
                model, a tool, a node), or the graph stopped at ``interrupt()``.
            Exception: whatever the graph (model, tool, retriever) raised; nothing is saved.
        """
        return await self._run_entry(self._admit(session_id, message, policy, create_if_missing, config, None))

    async def stream(
        self,
        session_id: str,
        message: str,
        *,
        policy: Policy | None = None,
        create_if_missing: bool = False,
        config: RunnableConfig | None = None,
    ) -> AsyncIterator[str]:
        """Like :meth:`chat`, but yield the reply's text in chunks as the graph's chat models produce them.

        The message joins its session's queue when iteration starts. The turn runs in a task of its own
        and buffers its chunks, so it commits whatever the consumer's pace. A consumer that stops early
        (``break`` then ``aclose()``, or cancellation) cancels the turn, and nothing is saved, unless it
        had already committed. Close the iterator promptly (``contextlib.aclosing``).

        Raises:
            The same exceptions as :meth:`chat`, from the iteration.
        """
        buffer = ChunkBuffer()
        entry = self._admit(session_id, message, policy, create_if_missing, config, buffer)
        worker = entry.loop.create_task(self._run_entry(entry), name=f"{entry.who} (stream)")
        with self._guard:
            entry.task = worker
        worker.add_done_callback(lambda _: self._stream_done(entry))
        try:
            while True:
                chunk = await buffer.get()
                if chunk is None:
                    break
                yield chunk
            if worker.cancelled() and entry.superseded is not None:  # cancelled before it ever ran
                self._mark_interrupted(entry)
                raise TurnInterrupted(entry.session_id, entry.superseded, kept_message=entry.kept_message)
            worker.result()  # raises what the turn raised
        finally:
            cancelled_again = False
            if not worker.done():
                worker.cancel()  # the consumer stopped early or was cancelled: the turn is cancelled
                cancelled_again = await _finish_uncancellable(worker)  # its cleanup runs to the end
            if not worker.cancelled():
                worker.exception()  # retrieved: no "exception was never retrieved" noise
            if cancelled_again:
                raise asyncio.CancelledError

    def _stream_done(self, entry: Entry) -> None:
        """A stream's worker ended: if it was cancelled before it ever ran, its bookkeeping is done here."""
        if entry.state != DONE:
            self._finish(entry, asyncio.CancelledError())
        assert entry.buffer is not None
        entry.buffer.close()

    async def _run_entry(self, entry: Entry) -> ChatResult:
        """Run an admitted turn to its end in the current task (the caller's for :meth:`chat`, a stream's
        worker for :meth:`stream`); a cancellation by a newer message becomes :class:`TurnInterrupted`."""
        error: BaseException | None = None
        try:
            with self._span(entry):
                if entry.superseded is not None:  # superseded before this task existed
                    raise asyncio.CancelledError
                return await self._execute(entry, lambda token: self._run_turn(entry, token))
        except asyncio.CancelledError as exc:
            error = exc
            task = asyncio.current_task()
            assert task is not None
            interrupted = self._superseded_error(entry, task)
            if interrupted is None:
                raise
            raise interrupted from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish(entry, error)

    # ------------------------------------------------------------------ admission and the session's queue

    def _check_policy(self, policy: object) -> str:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        if not getattr(self, "_locking", True) and policy != "enqueue":
            raise ValueError(f"policy {policy!r} needs locking=True; the naive service (locking=False) only enqueues")
        return policy  # type: ignore[return-value]

    def _check_not_own_turn(self, session_id: str, what: str) -> None:
        if (self._uid, session_id) in _ACTIVE_TURNS.get():
            raise RuntimeError(
                f"{what}() was called on session {session_id!r} from inside a turn of that same session (its "
                "model, a tool or a node): the call would wait for the turn, which waits for the call. Send "
                "the next message after the turn has returned"
            )

    def _lock_timeout_error(self, entry: Entry, exc: LockTimeout) -> LockTimeout:
        what = "sending your message" if entry.kind == "turn" else "deleting it"
        return LockTimeout(
            f"session {entry.session_id!r} stayed busy answering earlier messages for {exc.waited:.3g} s, longer "
            f"than lock_timeout={self._lock_timeout:g} s, so we gave up {what}; nothing was saved, please try again",
            keys=exc.keys,
            waited=exc.waited,
        )

    def _admit(
        self,
        session_id: str,
        message: str,
        policy: Policy | None,
        create_if_missing: bool,
        config: RunnableConfig | None,
        buffer: ChunkBuffer | None,
    ) -> Entry:
        """Validate and register a turn, apply its policy. Synchronous: nothing may overtake it meanwhile."""
        t0 = time.perf_counter()
        self._check_open()
        text = check_message(message, self._max_chars)  # type: ignore[arg-type]
        policy = self._policy if policy is None else self._check_policy(policy)  # type: ignore[assignment]
        sid = check_session_id(session_id)
        run_config = check_config(config)
        if not isinstance(create_if_missing, bool):
            raise TypeError(f"create_if_missing must be True or False, got {create_if_missing!r}")
        self._check_not_own_turn(sid, "chat" if buffer is None else "stream")
        loop = asyncio.get_running_loop()
        entry = Entry(
            "turn", sid, caller_label(), None if buffer is not None else asyncio.current_task(), loop, t0,
            self._clock(), text, create_if_missing, run_config, buffer,
        )
        with self._guard:
            live = self._registry.live.get(sid)
            if not create_if_missing and live is None and sid in self._registry.tombstones:
                raise SessionNotFound(sid)  # known to be gone
            turns = live.turns() if live is not None else []
            if policy == "reject" and turns:
                self._counts["rejected"] += 1
                raise SessionBusy(sid)
            victims = [t for t in turns if t.state in (WAITING, RUNNING)] if policy in ("interrupt", "rollback") else []
            if self._coordinator.distributed and self._locking:  # and on the other workers, through the lock
                if policy == "reject":
                    entry.at_once = True
                elif policy in ("interrupt", "rollback"):
                    entry.announce = policy
            live = self._registry.in_flight(sid)
            live.entries.append(entry)
            entry.live = live
        for victim in victims:
            self._supersede(victim, policy)  # type: ignore[arg-type]
        return entry

    def _enter(self, entry: Entry) -> Entry:
        """Register a deletion in its session's queue."""
        with self._guard:
            live = self._registry.in_flight(entry.session_id)
            live.entries.append(entry)
            entry.live = live
        return entry

    async def _execute(self, entry: Entry, body: Callable[[int | None], Awaitable[T]]) -> T:
        """Run ``body(fencing token)`` holding the session's lock (or without it, with ``locking=False``).

        Raises:
            SessionBusy: policy ``reject`` and, on a cross-process lock, another worker holds or queues the
                session.
            LockTimeout: waited longer than ``lock_timeout``.
            StaleCommit: the turn's commit (or claim) was refused: its lock was lost, or another writer
                committed first; nothing of it was saved.
            LockLost: the lock was lost (lease ran out) before the turn committed; nothing was saved.
        """
        if not self._locking:
            with self._guard:
                entry.state = RUNNING
            return await body(None)
        loop = entry.loop
        deadline = None if self._lock_timeout is None else loop.time() + self._lock_timeout
        result: Any = _NOTHING
        try:
            await self._coordinator.ready()
            await self._queue.wait(entry, deadline)
            if entry.at_once:
                timeout: float | None = AT_ONCE
            else:
                timeout = None if deadline is None else max(deadline - loop.time(), 1e-6)
            request = self._lock(entry.session_id, timeout=timeout, label=entry.who)
            entry.request = request
            self._queue.progress(entry, joining=True)
            if entry.announce is not None:
                self._coordinator.supersede(entry.session_id, request, entry.announce)
            async with request:
                self._queue.progress(entry, acquired=True)
                entry.waited = time.perf_counter() - entry.t0
                result = await body(request.token)
            return result  # type: ignore[no-any-return]
        except LockTimeout as exc:
            if entry.acquired:
                raise  # e.g. the lock's max_hold: not a wait
            if entry.at_once:
                raise SessionBusy(entry.session_id) from None  # another worker holds or queues it
            entry.lock_timed_out = True
            raise self._lock_timeout_error(entry, exc) from exc
        except LockLost as exc:
            if result is not _NOTHING:  # committed while the lease was good; lost during the cleanup
                logger.warning("session %r: a turn committed, then its lock was lost: %s", entry.session_id, exc)
                return result  # type: ignore[no-any-return]
            if isinstance(exc.__cause__, StaleCommit):
                raise exc.__cause__  # the refused commit says it best (and that nothing was saved)
            if not entry.acquired:
                raise
            lost = LockLost(
                f"your message on session {entry.session_id!r} was not saved: this worker lost the session's lock "
                f"before the turn committed ({exc}); send it again",
                keys=exc.keys,
                url=exc.url,
                held=exc.held,
            )
            raise lost from exc

    def _span(self, entry: Entry) -> contextlib.AbstractContextManager[None]:
        if self._timeline is None:
            return contextlib.nullcontext()
        return self._timeline.span("turn", who=entry.who, key=entry.session_id)

    def _mark_interrupted(self, entry: Entry) -> None:
        if self._timeline is not None:
            self._timeline.mark("interrupted", who=entry.who, key=entry.session_id, detail=f"policy {entry.superseded}")

    def _superseded_error(self, entry: Entry, task: asyncio.Task[Any]) -> TurnInterrupted | None:
        """For a CancelledError in ``task``: the TurnInterrupted to raise instead, if a newer message caused it
        and nothing else cancelled the task too."""
        if entry.superseded is None:
            return None
        self._mark_interrupted(entry)
        if task.uncancel() > 0:
            return None
        return TurnInterrupted(entry.session_id, entry.superseded, kept_message=entry.kept_message)

    def _finish(self, entry: Entry, error: BaseException | None) -> None:
        """Bookkeeping when an entry ends, however it ends."""
        if entry.kind != "turn":
            outcome = None
        elif error is None or entry.committed:
            outcome = "completed"
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            outcome = "interrupted" if entry.superseded is not None else "cancelled"
        elif isinstance(error, TurnInterrupted):
            outcome = "interrupted"
        elif isinstance(error, SessionBusy):
            outcome = "rejected"
        elif isinstance(error, (StaleCommit, LockLost)):
            outcome = "refused"
        elif isinstance(error, TimeoutError):
            outcome = "lock_timeouts" if entry.lock_timed_out else "timed_out"
        else:
            outcome = "failed"
        with self._guard:
            entry.state = DONE
            live = entry.live
            if live is not None and entry in live.entries:
                live.entries.remove(entry)
                self._registry.forget_if_idle(entry.session_id, live)
            if outcome is not None:
                self._counts[outcome] += 1
        if live is not None:
            self._queue.wake(live)

    def _supersede(self, victim: Entry, policy: str) -> None:
        """Cancel ``victim`` on behalf of a newer message, on the victim's own event loop."""
        if victim.loop is _running_loop():
            self._deliver_cancel(victim, policy)
            return
        with contextlib.suppress(RuntimeError):  # the victim's loop is closed: nothing to cancel
            victim.loop.call_soon_threadsafe(self._deliver_cancel, victim, policy)

    def _deliver_cancel(self, victim: Entry, policy: str) -> None:
        # Runs on the victim's loop, while the victim is suspended: if it is still waiting or running,
        # the CancelledError lands at the await it is suspended in.
        with self._guard:
            if victim.state not in (WAITING, RUNNING) or victim.superseded is not None:
                return
            victim.superseded = policy
            task = victim.task
        if task is not None:  # else a stream whose worker is about to start: it sees `superseded`
            task.cancel(f"superseded by a newer message (policy {policy!r})")

    def _supersede_tickets(self, session_id: str, tickets: frozenset[str], policy: str) -> None:
        """A worker (maybe this one) asks to cancel the turns whose lock tickets are ``tickets``: the turns of
        ``session_id`` that were in the lock's queue when its superseding message joined it."""
        with self._guard:
            live = self._registry.live.get(session_id)
            victims = [
                e
                for e in (live.turns() if live is not None else ())
                if e.state in (WAITING, RUNNING) and getattr(e.request, "ticket", None) in tickets
            ]
        for victim in victims:
            self._supersede(victim, policy)

    # ------------------------------------------------------------------ the turn

    async def _run_turn(self, entry: Entry, token: int | None) -> ChatResult:
        """The turn, holding the session's lock (or not, with ``locking=False``)."""
        sid = entry.session_id
        with self._guard:
            entry.state = RUNNING
        user = HumanMessage(entry.text, id=str(uuid.uuid4()), response_metadata={TIMESTAMP_KEY: time.time()})
        start: CheckpointTuple | None = None
        try:
            start = await self._open_session(entry, token)
            deadline = asyncio.timeout(self._turn_timeout)
            try:
                async with deadline:
                    write = await self._compute(entry, start, user)
            except TimeoutError as exc:
                if not deadline.expired():
                    raise
                raise TimeoutError(
                    f"the reply on session {sid!r} took longer than turn_timeout={self._turn_timeout:g} s; "
                    "nothing was saved"
                ) from exc
        except asyncio.CancelledError:
            if entry.superseded == "interrupt":
                await self._keep_user_message(entry, start, user, token)
            raise
        with self._guard:
            superseded = entry.superseded
            if superseded is None:
                entry.state = COMMITTING
        if superseded is not None:  # cancelled, but something swallowed the CancelledError
            if superseded == "interrupt":
                await self._keep_user_message(entry, start, user, token)
            raise asyncio.CancelledError
        reply, turn_number, sources = self._finalize(write, start, user)
        # Commit: the whole state after the turn, as one new checkpoint on top of `start`.
        commit = asyncio.ensure_future(
            self._threads.commit(sid, start=get_checkpoint_id(start.config), write=write, token=token)
        )
        cancelled = await _finish_uncancellable(commit)
        failure = None if commit.cancelled() else commit.exception()
        # Cancelled by the lock (its lease ran out while the commit was on its way): the database decided,
        # so a commit it accepted stands, and one it refused says so.
        lost = cancelled and self._coordinator.lost(entry.request)
        if cancelled and not lost:
            # The caller went away while the turn was being written: revert it (one more checkpoint,
            # whose state is exactly the pre-turn one).
            if failure is None and not commit.cancelled():
                await self._revert(entry, start, write, token)
            raise asyncio.CancelledError
        if isinstance(failure, StaleCommit):
            raise self._refused(entry, failure) from failure
        commit.result()
        entry.committed = True
        with self._guard:
            self._registry.learn(sid, write.metadata[LAST_USED_KEY])  # type: ignore[typeddict-item]
        if self._locking and not lost:  # pruning deletes stored values no kept checkpoint refers to: only under the lock
            prune = asyncio.ensure_future(self._prune(sid, token))
            if await _finish_uncancellable(prune) and not self._coordinator.lost(entry.request):
                raise asyncio.CancelledError  # after the commit: the turn stays
        return ChatResult(
            reply=reply,
            session_id=sid,
            turn=turn_number,
            sources=sources,
            waited=entry.waited,
            elapsed=time.perf_counter() - entry.t0,
        )

    def _refused(self, entry: Entry, exc: StaleCommit) -> StaleCommit:
        """The session-level StaleCommit for a write of ``entry``'s turn that a fenced checkpointer refused."""
        why = {
            "token": "this worker lost the session's lock (its lease ran out: paused, or cut off from the lock's "
            "server) and a newer holder has taken the session since",
            "head": "another writer committed on the session first (its history moved on since this turn read it)",
            "order": "its checkpoint id does not sort after the session's latest (are the writers' clocks out of step?)",
        }.get(exc.reason, exc.reason)
        return StaleCommit(
            f"your message on session {entry.session_id!r} was not saved: {why}. The session keeps every turn "
            "committed so far; send the message again",
            thread_id=exc.thread_id,
            reason=exc.reason,
            token=exc.token,
            newest_token=exc.newest_token,
            expected=exc.expected,
            head=exc.head,
        )

    async def _open_session(self, entry: Entry, token: int | None) -> CheckpointTuple:
        """The session's latest checkpoint; a new session's first one with ``create_if_missing``.

        Raises:
            SessionNotFound: no such session, or it expired before the turn arrived.
        """
        sid = entry.session_id
        try:
            await self._threads.claim(sid, token)  # a lock holder that lost its lease is refused from now on
        except StaleCommit as exc:
            raise self._refused(entry, exc) from exc
        start = await self._threads.read(sid)
        if start is not None:
            last_used = last_used_of(start)
            with self._guard:
                if not self._gone_at(sid, last_used, entry.admitted):
                    return start
                self._registry.bury(sid, last_used)
            if self._locking:
                await self._purge_locked(sid, token)  # we hold its lock: delete the expired thread now
            else:
                self._purge_in_background()
            start = None
        if not entry.create_if_missing:
            raise SessionNotFound(sid)
        if self._locking:
            await self._purge_locked(sid, token)  # a removed id whose old thread is not deleted yet
        now = self._clock()
        write = initial_write(self._metadata(now))
        try:
            checkpoint_id = await self._threads.commit(sid, start=None, write=write, token=token)
        except StaleCommit as exc:
            raise self._refused(entry, exc) from exc
        with self._guard:
            self._registry.learn(sid, now)
            self._counts["created"] += 1
        config = thread_config(sid)
        config["configurable"]["checkpoint_id"] = checkpoint_id
        return CheckpointTuple(config, write.checkpoint, write.metadata, None, [])

    def _run_config(self, entry: Entry) -> RunnableConfig:
        given = entry.config or {}
        configurable = {
            **(given.get("configurable") or {}),
            "thread_id": entry.session_id,
            WHO_KEY: entry.who,
            SESSION_KEY: entry.session_id,
        }
        config: RunnableConfig = {"run_name": "chatkit turn", **given, "configurable": configurable}  # type: ignore[typeddict-item]
        return config

    async def _compute(self, entry: Entry, start: CheckpointTuple, user: HumanMessage) -> TurnWrite:
        """Run the graph from ``start`` with the user message, writing nothing; return the state to commit."""
        sandbox = TurnSandbox(self._checkpointer, start)
        runner = self._runner.copy(update={"checkpointer": sandbox})
        config = self._run_config(entry)
        inputs = {"messages": [user]}
        active = _ACTIVE_TURNS.set(_ACTIVE_TURNS.get() | {(self._uid, entry.session_id)})
        try:
            buffer = entry.buffer
            if buffer is None:
                await runner.ainvoke(inputs, config, durability="exit")
            else:
                async for _namespace, (chunk, _meta) in runner.astream(
                    inputs, config, stream_mode="messages", subgraphs=True, durability="exit"
                ):
                    if isinstance(chunk, AIMessage):
                        text = chunk.text
                        if text:
                            buffer.put(text)
        finally:
            _ACTIVE_TURNS.reset(active)
        return sandbox.result(self._metadata(self._clock()))

    @staticmethod
    def _finalize(write: TurnWrite, start: CheckpointTuple, user: HumanMessage) -> tuple[str, int, tuple[str, ...]]:
        """Stamp the turn's new messages with the time, check the reply; return (reply, turn number, sources).

        Raises:
            TypeError: the turn did not end with an ``AIMessage``.
        """
        values = write.checkpoint["channel_values"]
        before = {getattr(m, "id", None) for m in start.checkpoint["channel_values"].get("messages") or ()}
        now = time.time()
        messages = [
            m
            if getattr(m, "id", None) in before or TIMESTAMP_KEY in getattr(m, "response_metadata", {TIMESTAMP_KEY: 0})
            else _stamped(m, now)
            for m in values.get("messages") or ()
        ]
        values["messages"] = messages
        reply = messages[-1] if messages else None
        if not isinstance(reply, AIMessage):
            raise TypeError(
                f"the graph must end a turn with an AIMessage (the reply) as its last message, got {reply!r:.80}; "
                "nothing was saved"
            )
        turn_number = 0
        for m in messages:
            if isinstance(m, HumanMessage):
                turn_number += 1
                if m.id == user.id:
                    break
        docs = values.get("context")
        sources: tuple[str, ...] = ()
        if isinstance(docs, list):
            sources = tuple(
                dict.fromkeys(str(d.metadata.get("source", d.id)) for d in docs if hasattr(d, "metadata"))
            )
        return reply.text, turn_number, sources

    async def _keep_user_message(
        self, entry: Entry, start: CheckpointTuple | None, user: HumanMessage, token: int | None
    ) -> None:
        """Policy ``interrupt``: commit the superseded turn's user message alone (shielded)."""
        with self._guard:
            entry.state = CLEANUP
        sid = entry.session_id

        async def write() -> None:
            base = start if start is not None else await self._threads.read(sid)
            if base is None:
                raise SessionNotFound(sid)
            now = self._clock()
            kept = kept_message_write(base, self._messages, user, self._checkpointer, self._metadata(now))
            await self._threads.commit(sid, start=get_checkpoint_id(base.config), write=kept, token=token)
            with self._guard:
                self._registry.learn(sid, now)

        task = asyncio.ensure_future(write())
        await _finish_uncancellable(task)
        if not task.cancelled() and task.exception() is None:
            entry.kept_message = True
        else:
            logger.error("could not keep the interrupted message on session %r", sid)

    async def _revert(self, entry: Entry, start: CheckpointTuple, committed: TurnWrite, token: int | None) -> None:
        """Put the pre-turn state back on top of a commit whose caller went away (shielded)."""
        sid = entry.session_id
        undo = revert_write(start, committed, self._checkpointer, self._metadata(last_used_of(start)))
        task = asyncio.ensure_future(
            self._threads.commit(sid, start=committed.checkpoint_id, write=undo, token=token)
        )
        await _finish_uncancellable(task)
        if task.cancelled() or task.exception() is not None:
            logger.error("could not take a cancelled turn out of session %r", sid)

    async def _prune(self, session_id: str, token: int | None) -> None:
        try:
            await self._threads.prune(session_id, token=token)
        except StaleCommit:
            logger.warning("did not prune session %r: its lock passed on to a newer holder meanwhile", session_id)
        except Exception:
            logger.exception("could not prune the old checkpoints of session %r", session_id)

    async def _run_delete(self, entry: Entry, token: int | None) -> None:
        sid = entry.session_id
        saved = await self._threads.read(sid)
        if saved is not None:
            last_used = last_used_of(saved)
            with self._guard:
                gone = self._gone_at(sid, last_used, entry.admitted)
                if gone:
                    self._registry.bury(sid, last_used)
            if gone:
                if self._locking:
                    await self._purge_locked(sid, token)
                else:
                    self._purge_in_background()
                saved = None
        if saved is None:
            raise SessionNotFound(sid)
        try:
            await self._threads.delete(sid, token=token)
        except NotImplementedError:
            logger.warning(
                "%s cannot delete threads: the history of deleted session %r stays in it",
                type(self._checkpointer).__name__,
                sid,
            )
            with self._guard:
                self._registry.tombstones[sid] = last_used_of(saved)
        with self._guard:
            self._registry.forget(sid)
            self._counts["deleted"] += 1

    # ------------------------------------------------------------------ expiry and deletion

    async def _purge_locked(self, session_id: str, token: int | None) -> None:
        """Holding the session's lock (or as its turn; ``token`` its fencing token): delete an expired
        session's thread.

        Raises:
            StaleCommit: (fenced checkpointer) the lock passed on to a newer holder meanwhile.
        """
        with self._guard:
            mark = self._registry.tombstones.get(session_id)
        if mark is None:
            return
        saved = await self._threads.read(session_id)
        if saved is not None and last_used_of(saved) > mark:
            pass  # used again since it was found expired (by another manager): it stays
        elif saved is not None:
            try:
                await self._threads.delete(session_id, token=token)
            except NotImplementedError:
                logger.warning(
                    "%s cannot delete threads: the history of expired session %r stays in it",
                    type(self._checkpointer).__name__,
                    session_id,
                )
                return
        with self._guard:
            if self._registry.tombstones.get(session_id) == mark:
                del self._registry.tombstones[session_id]

    async def _purge_all(self) -> None:
        """Delete the threads of every expired session (each once per call), under its session's lock."""
        me, loop = asyncio.current_task(), asyncio.get_running_loop()
        pending = [t for t in list(self._background) if not t.done() and t is not me and t.get_loop() is loop]
        if pending:
            await asyncio.wait(pending)
        tried: set[str] = set()
        while True:
            with self._guard:
                todo = sorted(set(self._registry.tombstones) - tried)
            if not todo:
                return
            for sid in todo:
                tried.add(sid)
                try:
                    request = self._lock(sid, timeout=self._lock_timeout, label="expiry")
                    async with request:
                        await self._purge_locked(sid, request.token)
                except Exception:
                    logger.exception("could not delete the checkpoints of expired session %r", sid)

    def _purge_in_background(self) -> None:
        loop = _running_loop()
        if loop is None:
            return  # no event loop here: the next expire_idle() or aclose() deletes the threads
        if any(not t.done() and t.get_loop() is loop for t in list(self._background)):
            return  # the running one deletes every tombstone it has not tried yet
        task = loop.create_task(self._purge_all(), name="chatkit session expiry")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
