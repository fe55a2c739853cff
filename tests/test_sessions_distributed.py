"""SessionManager on a cross-process lock, in one process: fenced commits, policies and busy checks via Redis.

Two managers with a ``RedisKeyedLock`` each (as two worker processes would have, same Redis namespace) share
one fenced checkpointer. The same scenarios with real OS processes are in ``test_sessions_processes.py``;
here every step is driven by gates and lock events on one event loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from chatkit import ExtractiveChatModel, KeyedLock, LockLost, SessionBusy, SessionManager, StaleCommit
from chatkit.sessions import TurnInterrupted
from chatkit.sessions.fencing import FencedInMemorySaver
from tests._lock_helpers import WAIT, Watch
from tests._session_helpers import Gates, conversation, pairs, reply_to

pytest.importorskip("redis")

from chatkit import RedisKeyedLock  # noqa: E402

LEASE = 2.0  # renewed every 0.67 s: the lost-holder tests wait for one renewal


class HeldSaver(FencedInMemorySaver):
    """A FencedInMemorySaver whose next write can be held before it is checked and stored."""

    def __init__(self) -> None:
        super().__init__()
        self._hold: tuple[asyncio.Event, asyncio.Event] | None = None

    def hold_next_write(self) -> tuple[asyncio.Event, asyncio.Event]:
        self._hold = (asyncio.Event(), asyncio.Event())
        return self._hold

    async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        hold, self._hold = self._hold, None
        if hold is not None:
            hold[0].set()
            await hold[1].wait()
        return await super().aput(config, checkpoint, metadata, new_versions)


class Worker:
    """What one worker process would run: a RedisKeyedLock and a SessionManager on the shared saver."""

    def __init__(self, name: str, url: str, namespace: str, saver: Any, *, lease: float = 5.0, **kw: Any) -> None:
        self.name = name
        self.gates = Gates()
        self.watch = Watch()
        self.lock = RedisKeyedLock(url, namespace=namespace, lease=lease, observer=self.watch)
        self.manager = SessionManager(model=ExtractiveChatModel(latency=self.gates), checkpointer=saver, lock=self.lock, **kw)

    def chat(self, sid: str, text: str, **kw: Any) -> asyncio.Task[Any]:
        """Send ``text`` in a task named after it (the lock's label)."""
        return asyncio.create_task(self.manager.chat(sid, text, **kw), name=text)

    async def aclose(self) -> None:
        await self.manager.aclose()
        await self.lock.aclose()


@pytest.fixture
def namespace() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def pair(redis_url: str, namespace: str) -> AsyncIterator[tuple[Worker, Worker]]:
    saver = HeldSaver()
    a, b = (Worker(n, redis_url, namespace, saver, lease=LEASE) for n in "AB")
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def finished(task: asyncio.Task[Any]) -> Any:
    """The task's outcome (its result, or the exception it raised), within the generous bound."""
    done, _ = await asyncio.wait({task}, timeout=WAIT)
    assert done, "the turn did not finish"
    return task.exception() or task.result()


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
async def test_a_cross_process_lock_needs_a_fenced_checkpointer(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A RedisKeyedLock with a plain saver could lose a turn silently (a holder that lost its lease writes
    late): refused at construction, naming the fenced saver to use."""
    lock = RedisKeyedLock("redis://127.0.0.1:1/0")  # never connects: construction only
    if kind == "memory":
        plain: Any = InMemorySaver()
        with pytest.raises(TypeError, match=r"InMemorySaver .*not fenced.*chatkit\.FencedInMemorySaver"):
            SessionManager(lock=lock, checkpointer=plain)
        SessionManager(lock=lock, checkpointer=FencedInMemorySaver())
        SessionManager(lock=lock, checkpointer=plain, locking=False)  # the naive service takes no lock
        return
    if kind == "sqlite":
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        from chatkit import FencedSqliteSaver

        path = str(tmp_path / "s.sqlite")
        async with AsyncSqliteSaver.from_conn_string(path) as plain, FencedSqliteSaver.from_conn_string(path) as fenced:
            with pytest.raises(TypeError, match=r"AsyncSqliteSaver .*chatkit\.FencedSqliteSaver"):
                SessionManager(lock=lock, checkpointer=plain)
            SessionManager(lock=lock, checkpointer=fenced)
        return
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    from chatkit import FencedPostgresSaver

    dsn = request.getfixturevalue("postgres_dsn")
    async with AsyncPostgresSaver.from_conn_string(dsn) as plain, FencedPostgresSaver.from_conn_string(dsn) as fenced:
        with pytest.raises(TypeError, match=r"AsyncPostgresSaver .*chatkit\.FencedPostgresSaver"):
            SessionManager(lock=lock, checkpointer=plain)
        SessionManager(lock=lock, checkpointer=fenced)


# ------------------------------------------------------------------ commits that cannot go stale


def _two_locks() -> list[Any]:
    return [
        pytest.param(False, marks=pytest.mark.xfail(strict=True, reason="a plain saver keeps one turn, both callers told 'turn 2'")),
        pytest.param(True),
    ]


@pytest.mark.parametrize("fenced", _two_locks())
async def test_two_managers_with_their_own_locks_never_lose_a_turn_silently(fenced: bool) -> None:
    """The issue's reproduction, in one process: two managers (each its own KeyedLock, as two processes
    would have) share a checkpointer and get one message each at once. On a fenced saver one commit is
    refused with StaleCommit (its caller knows; the history keeps the other turn); on a plain one both
    callers are told "turn 2" and one turn is gone."""
    saver: Any = FencedInMemorySaver() if fenced else InMemorySaver()
    gates = Gates()
    managers = [SessionManager(model=ExtractiveChatModel(latency=gates), checkpointer=saver, lock=KeyedLock()) for _ in "AB"]
    sid = await managers[0].create_session()
    gates.release("first")
    await managers[0].chat(sid, "first")
    tasks = [asyncio.create_task(m.chat(sid, text)) for m, text in zip(managers, ("from A", "from B"))]
    await gates.entered("from A")
    await gates.entered("from B")  # both read the history with one turn
    gates.release("from A", "from B")
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    told = [o.turn for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, StaleCommit)]
    history = [m.content for m in await managers[0].get_history(sid) if m.role == "user"]
    assert history[0] == "first" and len(history) == 1 + len(told)  # every turn a caller was told of is kept
    assert told == [2] and len(refused) == 1
    assert refused[0].reason == "head" and sid in str(refused[0]) and "not saved" in str(refused[0])
    assert managers[0].statistics().refused + managers[1].statistics().refused == 1


@pytest.mark.parametrize("comes_back", ["after the new holder committed", "while the new holder computes"])
async def test_a_holder_that_lost_its_lock_mid_commit_is_refused(
    pair: tuple[Worker, Worker], namespace: str, redis_url: str, comes_back: str
) -> None:
    """A's turn is writing its commit when its lease is gone (its ticket deleted, as a paused process's
    would expire); B takes the session, claims it and runs a turn. A's late commit is refused (StaleCommit),
    whether it arrives before or after B's commit; the history keeps B's turn."""
    a, b = pair
    saver: HeldSaver = a.manager.checkpointer  # type: ignore[assignment]
    sid = await a.manager.create_session()
    first = a.chat(sid, "from A")
    await a.gates.entered("from A")
    entered, go = saver.hold_next_write()
    a.gates.release("from A")
    await asyncio.wait_for(entered.wait(), WAIT)  # A's commit is on its way to the database
    (ticket,) = await a.lock.tickets(sid)
    await _expire(redis_url, namespace, ticket)
    second = b.chat(sid, "from B")
    await b.gates.entered("from B")  # B holds the session: it claimed it and read the history
    if comes_back == "after the new holder committed":
        b.gates.release("from B")
        assert (await finished(second)).turn == 1
        go.set()
    else:
        go.set()
        outcome = await finished(first)
        assert isinstance(outcome, StaleCommit)
        b.gates.release("from B")
        assert (await finished(second)).turn == 1
    outcome = await finished(first)
    assert isinstance(outcome, StaleCommit) and outcome.reason == "token", outcome
    assert f"session {sid!r}" in str(outcome) and "not saved" in str(outcome)
    assert pairs(await b.manager.get_history(sid)) == conversation("from B")
    assert a.manager.statistics().refused == 1 and a.manager.statistics().completed == 0


async def _expire(url: str, namespace: str, ticket: str) -> None:
    """End a ticket's lease now (what a paused process's ticket does when its lease runs out)."""
    import redis.asyncio

    r = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        assert await r.delete(f"{namespace}:t:{ticket}") == 1
    finally:
        await r.aclose()


async def test_a_holder_that_lost_its_lock_while_computing_is_told_and_saves_nothing(
    pair: tuple[Worker, Worker], namespace: str, redis_url: str
) -> None:
    a, b = pair
    sid = await a.manager.create_session()
    first = a.chat(sid, "from A")
    await a.gates.entered("from A")
    (ticket,) = await a.lock.tickets(sid)
    await _expire(redis_url, namespace, ticket)
    outcome = await finished(first)  # cancelled at its next lease renewal
    assert isinstance(outcome, LockLost), outcome
    assert f"session {sid!r}" in str(outcome) and "not saved" in str(outcome)
    b.gates.open_all = True
    assert (await b.manager.chat(sid, "from B")).turn == 1
    assert pairs(await a.manager.get_history(sid)) == conversation("from B")
    assert a.manager.statistics().refused == 1


# ------------------------------------------------------------------ the four policies across workers


@pytest.mark.parametrize("policy", ["interrupt", "rollback"])
async def test_a_message_to_worker_b_supersedes_the_turns_on_worker_a(pair: tuple[Worker, Worker], policy: str) -> None:
    """A runs one turn and has another queued; a message with ``policy`` sent to B cancels both (the
    running one keeps its user message with ``interrupt``), then runs and sees what was kept."""
    a, b = pair
    sid = await a.manager.create_session()
    running = a.chat(sid, "running on A")
    await a.gates.entered("running on A")
    queued = a.chat(sid, "queued on A")
    await a.watch.until("queued on A", "requested")
    b.gates.open_all = True
    newer = b.chat(sid, "newer on B", policy=policy)
    first, second = await finished(running), await finished(queued)
    assert isinstance(first, TurnInterrupted) and first.policy == policy, first
    assert first.kept_message is (policy == "interrupt")
    assert isinstance(second, TurnInterrupted) and not second.kept_message, second
    result = await finished(newer)
    kept = ["running on A"] if policy == "interrupt" else []
    assert result.turn == len(kept) + 1
    expected = [("user", t) for t in kept] + [("user", "newer on B"), ("assistant", reply_to("newer on B", len(kept) + 1))]
    assert pairs(await b.manager.get_history(sid)) == expected
    assert a.manager.statistics().interrupted == 2 and b.manager.statistics().completed == 1


async def test_a_superseding_message_leaves_later_turns_alone(pair: tuple[Worker, Worker]) -> None:
    """Only the turns that reached the session's queue before the superseding message are cancelled."""
    a, b = pair
    sid = await a.manager.create_session()
    running = a.chat(sid, "running on A")
    await a.gates.entered("running on A")
    newer = b.chat(sid, "newer on B", policy="rollback")
    await b.watch.until("newer on B", "requested")
    outcome = await finished(running)
    assert isinstance(outcome, TurnInterrupted)
    later = a.chat(sid, "later on A")  # after the rollback message: it waits behind it
    await a.watch.until("later on A", "requested")
    b.gates.release("newer on B")
    a.gates.release("later on A")
    assert (await finished(newer)).turn == 1 and (await finished(later)).turn == 2
    assert pairs(await a.manager.get_history(sid)) == conversation("newer on B", "later on A")


async def test_reject_sees_a_turn_running_on_another_worker(pair: tuple[Worker, Worker]) -> None:
    a, b = pair
    sid = await a.manager.create_session()
    assert not await b.manager.ais_busy(sid)
    running = a.chat(sid, "running on A")
    await a.gates.entered("running on A")
    assert await b.manager.ais_busy(sid) and not b.manager.is_busy(sid)  # the local view does not know
    with pytest.raises(SessionBusy, match="busy"):
        await b.manager.chat(sid, "rejected on B", policy="reject")
    assert b.manager.statistics().rejected == 1
    a.gates.release("running on A")
    assert (await finished(running)).turn == 1
    assert not await b.manager.ais_busy(sid)
    b.gates.open_all = True
    assert (await b.manager.chat(sid, "accepted on B", policy="reject")).turn == 2
    assert pairs(await a.manager.get_history(sid)) == conversation("running on A", "accepted on B")


async def test_create_if_missing_on_two_workers_lands_in_one_session(pair: tuple[Worker, Worker]) -> None:
    a, b = pair
    a.gates.open_all = b.gates.open_all = True
    sid = f"chosen-{uuid.uuid4().hex[:8]}"
    results = await asyncio.gather(a.chat(sid, "hi from A", create_if_missing=True), b.chat(sid, "hi from B", create_if_missing=True))
    assert sorted(r.turn for r in results) == [1, 2]
    texts = [m.content for m in await a.manager.get_history(sid) if m.role == "user"]
    assert sorted(texts) == ["hi from A", "hi from B"]
    assert a.manager.statistics().created + b.manager.statistics().created == 1
