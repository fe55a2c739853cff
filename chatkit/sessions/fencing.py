"""Checkpoint savers that refuse a stale write: commits that cannot go stale, across processes.

A lock serializes the writers of a thread while it holds. It cannot stop a writer that lost the lock
without noticing (paused past its lease, cut off) from writing late, nor a writer that never took it.
The savers here check every *fenced* write inside the database transaction that stores it, and refuse
it with :class:`~chatkit.StaleCommit` when

* its **fencing token** is older than the newest token the thread has seen (a newer lock holder has
  written since), or
* the thread's **head** (its latest checkpoint in the write's namespace) is no longer the checkpoint the
  write was computed from: a compare-and-set on the head.

A refused write stores nothing; every committed checkpoint stays.

How to fence a write: pass the config the work started from through :func:`fence`::

    read = await saver.aget_tuple(thread)                     # the head the turn starts from (or None)
    ...                                                      # compute, holding the lock
    start = read.config if read is not None else thread      # no checkpoint yet: the thread must stay empty
    await graph.aupdate_state(fence(start, token=request.token), values, as_node=...)

``fence`` records, in ``config["configurable"]`` (keys starting with ``__``, which LangGraph neither stores
in checkpoint metadata nor drops on the way to ``aput``):

* the *base*: the config's ``checkpoint_id`` (absent: the thread must have no checkpoint yet);
* the *token* (``None``: no token check, only the compare-and-set);
* the *writer*: who writes (``token:<token>``, or a random id per ``fence`` call without a token).

The rules, for a fenced write of a new checkpoint whose parent is ``P`` (the ``checkpoint_id`` LangGraph
passes to ``aput``), checked under a row lock on the thread's fence row:

1. token older than the thread's newest token: refused (``reason="token"``);
2. the thread's last fenced write came from the same writer (a run that writes several checkpoints, or
   a second commit by the same lock holder): the head must still be ``P`` (it continues its own chain);
   otherwise the head must be the base;
3. the new checkpoint's id must sort after the head (else it would not become the latest).

Unfenced writes (no :func:`fence`) behave exactly as in the plain saver. Tokens must come from one lock
shared by every writer of the thread (one :class:`~chatkit.RedisKeyedLock` namespace; the in-process
:class:`~chatkit.KeyedLock` only within one process). Pending writes (``aput_writes``) are not fenced:
they hang off a checkpoint and never move the head.

Besides fenced writes, every fenced saver implements the :class:`FencedSaver` protocol, the other
steps :class:`~chatkit.SessionManager` takes on a session, each checked against the thread's newest
token in the same transaction:

* ``aclaim_thread(thread_id, token=)``: a new lock holder raises the thread's newest token to its own
  before it reads, so a holder that lost the lock earlier is refused even if it comes back before the
  new holder has written anything;
* ``adelete_thread_fenced(thread_id, token=)``: delete the thread; its fence row stays, so a lost holder
  cannot bring the deleted thread back;
* ``aprune_thread_fenced(thread_id, keep=, token=)``: delete all but the newest ``keep`` checkpoints.

Savers: :class:`FencedInMemorySaver` (one process, for tests), ``FencedSqliteSaver`` (several processes
on one SQLite file; needs ``langgraph-checkpoint-sqlite``) and ``FencedPostgresSaver`` (needs
``chatkit[distributed]``); ``setup()`` creates their ``chatkit_fences`` table too. The SQL ones live in
:mod:`chatkit.sessions._fenced_sql` and load on first use of their names here.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import ChannelVersions, Checkpoint, CheckpointMetadata
from langgraph.checkpoint.memory import InMemorySaver

from ..errors import StaleCommit
from .pruning import prune_memory_storage

__all__ = [
    "Fence",
    "fence",
    "read_fence",
    "FencedSaver",
    "is_fenced",
    "fenced_alternative",
    "FencedInMemorySaver",
    "FencedSqliteSaver",
    "FencedPostgresSaver",
    "FENCE_TABLE",
]

TOKEN_KEY = "__chatkit_fence_token__"
BASE_KEY = "__chatkit_fence_base__"
WRITER_KEY = "__chatkit_fence_writer__"
FENCE_TABLE = "chatkit_fences"
_NO_BASE = ""  # stored in the config for "the thread has no checkpoint yet"
DELETED = "deleted"  # the fence row's writer after a fenced delete


@runtime_checkable
class FencedSaver(Protocol):
    """What a fenced checkpoint saver offers besides fenced writes (see the module docstring).

    Each step raises :class:`~chatkit.StaleCommit` (``reason="token"``) and changes nothing when ``token``
    is older than the newest token the thread has seen; ``token=None`` skips that check.
    """

    async def aclaim_thread(self, thread_id: str, *, token: int) -> None:
        """Raise the thread's newest token to ``token`` (nothing to do for a thread never written fenced)."""
        ...

    async def adelete_thread_fenced(self, thread_id: str, *, token: int | None) -> None:
        """Delete the thread's checkpoints and writes; keep (and raise) its newest token."""
        ...

    async def aprune_thread_fenced(self, thread_id: str, *, keep: int, token: int | None) -> None:
        """Delete all but the newest ``keep`` checkpoints of the thread's root namespace."""
        ...


def is_fenced(saver: object) -> bool:
    """Whether ``saver`` refuses stale fenced writes (it implements :class:`FencedSaver`).

    Example:
        >>> from langgraph.checkpoint.memory import InMemorySaver
        >>> is_fenced(FencedInMemorySaver()), is_fenced(InMemorySaver())
        (True, False)
    """
    return isinstance(saver, FencedSaver)


def fenced_alternative(saver: object) -> str:
    """The fenced saver to use instead of ``saver`` (for error messages).

    Example:
        >>> from langgraph.checkpoint.memory import InMemorySaver
        >>> fenced_alternative(InMemorySaver())
        'chatkit.FencedInMemorySaver (one process only)'
    """
    for cls in type(saver).__mro__:
        name, module = cls.__name__, cls.__module__
        if name == "InMemorySaver" and module.startswith("langgraph.checkpoint.memory"):
            return "chatkit.FencedInMemorySaver (one process only)"
        if name == "AsyncSqliteSaver" and module.startswith("langgraph.checkpoint.sqlite"):
            return "chatkit.FencedSqliteSaver (same constructor and from_conn_string)"
        if name == "AsyncPostgresSaver" and module.startswith("langgraph.checkpoint.postgres"):
            return "chatkit.FencedPostgresSaver (same constructor and from_conn_string)"
    return "a saver implementing chatkit.sessions.fencing.FencedSaver, such as chatkit.FencedPostgresSaver"


def stale_token(thread_id: str, *, token: int, newest: int, doing: str) -> StaleCommit:
    """The refusal of a step (``doing``: "claim", "delete", "prune") whose token is older than the thread's newest."""
    return StaleCommit(
        f"refused to {doing} thread {thread_id!r}: its fencing token {token} is older than {newest}, the newest this "
        "thread has seen (a newer lock holder has claimed it since: this writer lost its lock); nothing was changed",
        thread_id=thread_id,
        reason="token",
        token=token,
        newest_token=newest,
    )


def is_stale(token: int | None, newest: int | None) -> bool:
    """Whether a step with ``token`` must be refused when the thread's newest token is ``newest``."""
    return token is not None and newest is not None and token < newest


@dataclass(frozen=True, slots=True)
class Fence:
    """What a fenced write carries (see :func:`fence`).

    Attributes:
        token: the lock's fencing token (``None``: compare-and-set only).
        base: the checkpoint id the work started from (``None``: the thread had no checkpoint).
        writer: who writes: ``token:<token>``, or a random id.
    """

    token: int | None
    base: str | None
    writer: str


def fence(config: RunnableConfig, *, token: int | None) -> RunnableConfig:
    """A copy of ``config`` whose checkpoint writes a fenced saver checks (see the module docstring).

    Args:
        config: the config the work started from: a checkpoint's config (``aget_tuple(...).config``,
            with its ``checkpoint_id``), or a thread config without one when the thread had no checkpoint.
        token: the lock request's fencing token (``request.token``), or ``None``.

    Raises:
        TypeError: ``config`` has no ``configurable`` mapping with a ``thread_id``, or ``token`` is not an
            int or None.

    Example:
        >>> cfg = fence({"configurable": {"thread_id": "t1", "checkpoint_id": "abc"}}, token=7)
        >>> read_fence(cfg)
        Fence(token=7, base='abc', writer='token:7')
    """
    configurable = config.get("configurable") if isinstance(config, dict) else None
    if not isinstance(configurable, dict) or "thread_id" not in configurable:
        raise TypeError(f"fence() needs a LangGraph config with configurable.thread_id, got {config!r}")
    if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
        raise TypeError(f"token must be an int (a lock request's token) or None, got {token!r}")
    base = configurable.get("checkpoint_id")
    writer = f"token:{token}" if token is not None else f"once:{secrets.token_hex(8)}"
    return {
        **config,
        "configurable": {
            **configurable,
            TOKEN_KEY: token,
            BASE_KEY: base if base else _NO_BASE,
            WRITER_KEY: writer,
        },
    }


def read_fence(config: RunnableConfig) -> Fence | None:
    """The :class:`Fence` a write's config carries, or ``None`` for an unfenced write."""
    configurable = config.get("configurable") or {}
    writer = configurable.get(WRITER_KEY)
    if writer is None:
        return None
    base = configurable.get(BASE_KEY)
    return Fence(token=configurable.get(TOKEN_KEY), base=base or None, writer=str(writer))


def judge(
    f: Fence,
    *,
    thread_id: str,
    parent: str | None,
    new_id: str,
    head: str | None,
    newest_token: int | None,
    last_writer: str | None,
) -> StaleCommit | None:
    """Apply the rules to one write; return the refusal, or ``None`` to accept it.

    Example:
        >>> f = Fence(token=3, base="b", writer="token:3")
        >>> judge(f, thread_id="t", parent="b", new_id="c", head="b", newest_token=5, last_writer="token:5").reason
        'token'
        >>> judge(f, thread_id="t", parent="b", new_id="c", head="b", newest_token=2, last_writer="token:2") is None
        True
    """
    if f.token is not None and newest_token is not None and f.token < newest_token:
        return StaleCommit(
            f"refused a stale write to thread {thread_id!r}: its fencing token {f.token} is older than {newest_token}, "
            "the newest this thread has seen (a newer lock holder has written since: this writer lost its lock); "
            "nothing of it was stored",
            thread_id=thread_id,
            reason="token",
            token=f.token,
            newest_token=newest_token,
            expected=f.base,
            head=head,
        )
    expected = parent if last_writer == f.writer else f.base
    if head != expected:
        where = "a thread with no checkpoint" if expected is None else f"checkpoint {expected!r}"
        now = "has no checkpoint" if head is None else f"is {head!r}"
        return StaleCommit(
            f"refused a stale write to thread {thread_id!r}: it was computed from {where} but the thread's head now "
            f"{now} (another writer committed first); nothing of it was stored",
            thread_id=thread_id,
            reason="head",
            token=f.token,
            newest_token=newest_token,
            expected=expected,
            head=head,
        )
    if head is not None and new_id <= head:
        return StaleCommit(
            f"refused a write to thread {thread_id!r}: its checkpoint id {new_id!r} does not sort after the head "
            f"{head!r}, so it would not become the latest (are the writers' clocks out of step?)",
            thread_id=thread_id,
            reason="order",
            token=f.token,
            newest_token=newest_token,
            expected=expected,
            head=head,
        )
    return None


def _newest(old: int | None, new: int | None) -> int | None:
    if old is None:
        return new
    if new is None:
        return old
    return max(old, new)


def _write_ids(config: RunnableConfig, checkpoint: Checkpoint) -> tuple[str, str, str | None, str]:
    c = config["configurable"]
    return str(c["thread_id"]), str(c.get("checkpoint_ns", "")), c.get("checkpoint_id"), str(checkpoint["id"])


# --------------------------------------------------------------------------------------------- in memory


class FencedInMemorySaver(InMemorySaver):
    """LangGraph's ``InMemorySaver`` that refuses stale fenced writes (one process; for tests and teaching).

    Raises:
        StaleCommit: from ``put``/``aput`` of a fenced write that is stale, and from the :class:`FencedSaver`
            steps with a stale token (see :mod:`chatkit.sessions.fencing`).

    Example:
        >>> from chatkit import StaleCommit
        >>> from chatkit.sessions.fencing import FencedInMemorySaver, fence
        >>> from langgraph.checkpoint.base import empty_checkpoint
        >>> saver = FencedInMemorySaver()
        >>> thread = {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}
        >>> first = saver.put(fence(thread, token=1), empty_checkpoint(), {}, {})
        >>> try:  # a second writer that also started from the empty thread
        ...     saver.put(fence(thread, token=2), empty_checkpoint(), {}, {})
        ... except StaleCommit as exc:
        ...     print(exc.reason, exc.expected, exc.head == first["configurable"]["checkpoint_id"])
        head None True
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fence_guard = threading.Lock()
        self._fences: dict[str, tuple[int | None, str]] = {}  # thread -> (newest token, last fenced writer)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        f = read_fence(config)
        if f is None:
            return super().put(config, checkpoint, metadata, new_versions)
        thread_id, ns, parent, new_id = _write_ids(config, checkpoint)
        raw_thread = config["configurable"]["thread_id"]  # InMemorySaver keys its storage by the id as given
        with self._fence_guard:
            saved = self.storage.get(raw_thread, {}).get(ns) or {}
            head = max(saved) if saved else None
            newest, writer = self._fences.get(thread_id, (None, None))
            refusal = judge(f, thread_id=thread_id, parent=parent, new_id=new_id, head=head, newest_token=newest, last_writer=writer)
            if refusal is not None:
                raise refusal
            result = super().put(config, checkpoint, metadata, new_versions)
            self._fences[thread_id] = (_newest(newest, f.token), f.writer)
            return result

    async def aclaim_thread(self, thread_id: str, *, token: int) -> None:
        """Raise the thread's newest token to ``token`` (see :class:`FencedSaver`).

        Raises:
            StaleCommit: ``token`` is older than the thread's newest.
        """
        with self._fence_guard:
            known = self._fences.get(thread_id)
            if known is None:
                return  # never written fenced: the first fenced write sets the token
            newest, writer = known
            if is_stale(token, newest):
                raise stale_token(thread_id, token=token, newest=newest, doing="claim")  # type: ignore[arg-type]
            self._fences[thread_id] = (_newest(newest, token), writer)

    async def adelete_thread_fenced(self, thread_id: str, *, token: int | None) -> None:
        """Delete the thread, keeping its newest token (see :class:`FencedSaver`).

        Raises:
            StaleCommit: ``token`` is older than the thread's newest.
        """
        with self._fence_guard:
            newest, _ = self._fences.get(thread_id, (None, ""))
            if is_stale(token, newest):
                raise stale_token(thread_id, token=token, newest=newest, doing="delete")  # type: ignore[arg-type]
            self.delete_thread(thread_id)
            self._fences[thread_id] = (_newest(newest, token), DELETED)

    async def aprune_thread_fenced(self, thread_id: str, *, keep: int, token: int | None) -> None:
        """Keep the newest ``keep`` root checkpoints of the thread (see :class:`FencedSaver`).

        Raises:
            StaleCommit: ``token`` is older than the thread's newest.
        """
        with self._fence_guard:
            newest, _ = self._fences.get(thread_id, (None, ""))
            if is_stale(token, newest):
                raise stale_token(thread_id, token=token, newest=newest, doing="prune")  # type: ignore[arg-type]
            prune_memory_storage(self, thread_id, keep)


# --------------------------------------------------------------------------------------------- SQLite and Postgres
# In chatkit.sessions._fenced_sql, built on first use of their names: their base classes live in optional packages.

_SQL_SAVERS = {"FencedSqliteSaver": "build_sqlite", "FencedPostgresSaver": "build_postgres"}


def __getattr__(name: str) -> Any:
    builder = _SQL_SAVERS.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import _fenced_sql

    cls = getattr(_fenced_sql, builder)()
    globals()[name] = cls
    return cls
