"""SessionManager across real worker processes: RedisKeyedLock + FencedPostgresSaver on throwaway servers.

Four worker processes (``tests/_session_workers.py``) share one Redis namespace and one PostgreSQL database
for the module; the SIGKILL and SIGSTOP tests add a victim worker with a short lease, the Redis restart test
runs two workers on a Redis server of its own. Every step waits for an event a worker reports (a model call
entered, a commit on its way, a message queued in Redis, a result), never for time to pass; the only
waits on the clock are the ones the scenarios are about (a dead or paused worker's lease running out).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests._session_helpers import conversation, reply_to
from tests._session_workers import WorkerProcess, start_workers

pytest.importorskip("redis")
pytest.importorskip("psycopg")

LEASE = 0.5  # the victims' lease: how long their sessions stay locked after they die or stop
ROUNDS = 1  # bursts per worker and session in the many-sessions test (400 turns per round)


@pytest.fixture(scope="module")
def database(postgres_dsn: str) -> str:
    """The Postgres DSN, with LangGraph's and chatkit's tables set up once, before any worker starts."""
    from chatkit import FencedPostgresSaver

    async def setup() -> None:
        async with FencedPostgresSaver.from_conn_string(postgres_dsn) as saver:
            await saver.setup()

    asyncio.run(setup())
    return postgres_dsn


@dataclass
class Pool:
    workers: list[WorkerProcess]
    namespace: str
    redis_url: str
    database: str

    def victim(self, name: str) -> WorkerProcess:
        """One more worker on the same Redis namespace and database, with a short lease."""
        (worker,) = start_workers(
            [name], redis_url=self.redis_url, namespace=self.namespace, store="postgres", store_url=self.database, lease=LEASE
        )
        return worker


@pytest.fixture(scope="module")
def pool(redis_url: str, database: str) -> Iterator[Pool]:
    namespace = f"test:{uuid.uuid4().hex[:12]}"
    workers = start_workers(
        ["w0", "w1", "w2", "w3"], redis_url=redis_url, namespace=namespace, store="postgres", store_url=database, lease=5.0
    )
    try:
        yield Pool(workers, namespace, redis_url, database)
    finally:
        for w in workers:
            w.close()


def new_session(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def ok(outcome: Any) -> tuple[int, str]:
    """The (turn, reply) of a committed turn; fails with the error otherwise."""
    assert outcome[0] == "ok", outcome
    return outcome[1], outcome[2]


def error(outcome: Any) -> str:
    """The exception's type name of a failed turn."""
    assert outcome[0] == "error", outcome
    return str(outcome[1])


# ------------------------------------------------------------------ many workers, many sessions


def test_four_workers_fifty_sessions_bursts_of_double_texts_lose_and_reorder_nothing(pool: Pool) -> None:
    """Each of 4 workers sends 2 messages at once to each of 50 sessions (created by
    whichever first message gets there: ``create_if_missing``). Every session's history holds every message
    once, each worker's messages in the order it sent them, each at the turn its worker was told, each
    followed by its own reply."""
    tag = uuid.uuid4().hex[:6]
    sessions = [f"bulk-{tag}-{i:02d}" for i in range(50)]
    sent: dict[tuple[str, str], list[str]] = {}
    told: dict[str, tuple[str, int]] = {}
    for r in range(ROUNDS):
        pending = []
        for w in pool.workers:
            messages = [(sid, f"{w.name} {sid[-2:]} r{r} m{k}") for sid in sessions for k in range(2)]
            for sid, text in messages:
                sent.setdefault((w.name, sid), []).append(text)
            pending.append((w, messages, w.burst(messages, create_if_missing=True)))
        for w, messages, rid in pending:
            for (sid, text), outcome in zip(messages, w.result(rid), strict=True):
                told[text] = (sid, ok(outcome)[0])
    reader = pool.workers[0]
    for sid in sessions:
        history = reader.history(sid)
        users = [content for role, content in history[::2]]
        assert [role for role, _ in history] == ["user", "assistant"] * len(users)
        expected = [t for w in pool.workers for t in sent[(w.name, sid)]]
        assert sorted(users) == sorted(expected)  # nothing lost, nothing twice
        for w in pool.workers:
            assert [u for u in users if u.startswith(f"{w.name} ")] == sent[(w.name, sid)]  # nothing reordered
        for text in expected:
            turn = told[text][1]
            assert history[2 * turn - 2 : 2 * turn] == [("user", text), ("assistant", reply_to(text, turn))]
    assert not any(reader.busy(sid) for sid in sessions[:3])


# ------------------------------------------------------------------ the policies across workers


@pytest.mark.parametrize("policy", ["interrupt", "rollback"])
def test_a_message_to_one_worker_supersedes_the_turns_on_the_others(pool: Pool, policy: str) -> None:
    w0, w1, w2 = pool.workers[:3]
    sid = new_session(policy)
    running, queued, newer = (f"{what} ({sid})" for what in ("running on w0", "queued on w2", "newer on w1"))
    ok(w0.result(w0.chat(sid, "first", create_if_missing=True)))
    r_running = w0.chat(sid, running, gated=True)
    w0.wait_for("entered", running)
    r_queued = w2.chat(sid, queued, watch=True)
    w2.wait_for("requested", queued)
    r_newer = w1.chat(sid, newer, policy=policy)
    first, second = w0.result(r_running), w2.result(r_queued)
    assert error(first) == "TurnInterrupted" and error(second) == "TurnInterrupted"
    kept = policy == "interrupt"
    assert ("its message was kept" in first[2]) is kept and "nothing of it was kept" in second[2]
    turn, _ = ok(w1.result(r_newer))
    expected = [("user", "first"), ("assistant", reply_to("first", 1))]
    expected += [("user", running)] if kept else []
    expected += [("user", newer), ("assistant", reply_to(newer, turn))]
    assert turn == (3 if kept else 2) and w1.history(sid) == expected


def test_reject_sees_a_turn_running_on_another_worker(pool: Pool) -> None:
    w0, w1 = pool.workers[:2]
    sid = new_session("reject")
    running = f"running on w0 ({sid})"
    ok(w0.result(w0.chat(sid, "first", create_if_missing=True)))
    r_running = w0.chat(sid, running, gated=True)
    w0.wait_for("entered", running)
    assert w1.busy(sid)
    assert error(w1.result(w1.chat(sid, "rejected on w1", policy="reject"))) == "SessionBusy"
    w0.release(running)
    assert ok(w0.result(r_running))[0] == 2
    assert not w1.busy(sid)
    assert ok(w1.result(w1.chat(sid, "accepted on w1", policy="reject")))[0] == 3
    assert w1.history(sid) == conversation("first", running, "accepted on w1")


def test_create_if_missing_on_four_workers_lands_in_one_session(pool: Pool) -> None:
    sid = new_session("created")
    created = sum(w.statistics().created for w in pool.workers)
    requests = [(w, w.chat(sid, f"hello from {w.name}", create_if_missing=True)) for w in pool.workers]
    assert sorted(ok(w.result(rid))[0] for w, rid in requests) == [1, 2, 3, 4]
    users = [content for role, content in pool.workers[0].history(sid) if role == "user"]
    assert sorted(users) == sorted(f"hello from {w.name}" for w in pool.workers)
    assert sum(w.statistics().created for w in pool.workers) == created + 1


# ------------------------------------------------------------------ failures


def test_a_killed_worker_frees_its_session_after_the_lease_with_the_history_intact(pool: Pool) -> None:
    w0 = pool.workers[0]
    sid = new_session("killed")
    ok(w0.result(w0.chat(sid, "first", create_if_missing=True)))
    victim = pool.victim("victim-killed")
    try:
        victim.chat(sid, "dies with its worker", gated=True)  # (each victim is a new worker: texts are its own)
        victim.wait_for("entered", "dies with its worker")  # it holds the session
        victim.signal(signal.SIGKILL)
        victim.process.join(60)
        assert ok(w0.result(w0.chat(sid, "after the kill")))[0] == 2  # once the victim's lease ran out
    finally:
        victim.close()
    assert w0.history(sid) == conversation("first", "after the kill")


def test_a_paused_workers_late_commit_is_refused_and_the_history_keeps_the_other_turns(pool: Pool) -> None:
    """The victim's commit is on its way to the database when it is stopped (SIGSTOP) past its lease; w0
    takes the session and commits a turn; the victim, continued (SIGCONT), finishes its write: refused."""
    w0 = pool.workers[0]
    sid = new_session("paused")
    ok(w0.result(w0.chat(sid, "first", create_if_missing=True)))
    victim = pool.victim("victim-paused")
    try:
        late = victim.chat(sid, "from the paused worker", hold_commit=True)
        victim.wait_for("committing", "from the paused worker")
        victim.signal(signal.SIGSTOP)
        try:
            assert ok(w0.result(w0.chat(sid, "while it was paused")))[0] == 2
        finally:
            victim.signal(signal.SIGCONT)
        victim.release_commit("from the paused worker")
        outcome = victim.result(late)
        assert error(outcome) == "StaleCommit" and outcome[3] == "token", outcome
        assert f"session {sid!r} was not saved" in outcome[2] and "lost the session's lock" in outcome[2]
        assert victim.statistics().refused == 1
    finally:
        victim.close()
    assert w0.history(sid) == conversation("first", "while it was paused")


def test_redis_restarted_mid_run_gives_clear_errors_and_loses_no_committed_turn(own_redis: Any, database: str) -> None:
    namespace = f"test:{uuid.uuid4().hex[:12]}"
    a, b = start_workers(["a", "b"], redis_url=own_redis.url, namespace=namespace, store="postgres", store_url=database, lease=LEASE)
    try:
        sid = new_session("restart")  # (new workers: the texts below are theirs alone)
        ok(a.result(a.chat(sid, "first", create_if_missing=True)))
        ok(b.result(b.chat(sid, "second")))
        running = a.chat(sid, "running during the restart", gated=True)
        a.wait_for("entered", "running during the restart")
        queued = b.chat(sid, "queued during the restart", watch=True)
        b.wait_for("requested", "queued during the restart")
        own_redis.restart()  # empty: every ticket is gone
        lost, dropped = a.result(running), b.result(queued)
        assert error(lost) == "LockLost" and "not saved" in lost[2] and own_redis.url in lost[2], lost
        assert error(dropped) in ("LockLost", "LockServerUnavailable") and own_redis.url in dropped[2], dropped
        assert ok(a.result(a.chat(sid, "after the restart, on a")))[0] == 3
        assert ok(b.result(b.chat(sid, "after the restart, on b")))[0] == 4
        assert b.history(sid) == conversation("first", "second", "after the restart, on a", "after the restart, on b")
    finally:
        a.close()
        b.close()
