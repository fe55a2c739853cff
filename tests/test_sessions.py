"""SessionManager: ordering, the two races, policies, validation, expiry, streaming, instrumentation."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import threading
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import HumanMessage

import chatkit
from chatkit import (
    ExtractiveChatModel,
    LockTimeout,
    SessionBusy,
    SessionManager,
    SessionNotFound,
    Timeline,
)
from chatkit.sessions import ChatResult, SessionStatistics, TurnInterrupted
from tests._session_helpers import Gates, GatedStore, StallingModel, conversation, pairs, reply_to, until
from tests.conftest import FakeClock

NAIVE = pytest.mark.xfail(strict=True, reason="no per-session lock: turns read the same checkpoint, the last commit wins")
RAW = pytest.mark.xfail(strict=True, reason="raw graph.ainvoke: runs on one thread start from the same checkpoint")


def gated_manager(gates: Gates, **kwargs: Any) -> SessionManager:
    return SessionManager(model=ExtractiveChatModel(latency=gates), **kwargs)


def sender(manager: SessionManager, service: str, session_id: str) -> Any:
    if service == "raw graph.ainvoke":
        config = {"configurable": {"thread_id": session_id}}
        return lambda text: manager.graph.ainvoke({"messages": [HumanMessage(text)]}, config)
    return lambda text: manager.chat(session_id, text)


async def wait_until_all_admitted(manager: SessionManager, gates: Gates, service: str, texts: list[str]) -> None:
    """Serialized services: the first turn is in the model and the others queue; naive ones: all in the model."""
    if service == "SessionManager":
        await until(lambda: gates.started[-1:] == [texts[0]] and manager.statistics().waiting == len(texts) - 1)
    else:
        await until(lambda: set(texts) <= set(gates.started))


# ---------------------------------------------------------------- the classic scenario and the two races

SERVICES = [
    "SessionManager",
    pytest.param("naive service", marks=NAIVE),
    pytest.param("raw graph.ainvoke", marks=RAW),
]


@pytest.mark.parametrize("service", SERVICES)
async def test_three_concurrent_messages_are_answered_in_order(service: str) -> None:
    gates = Gates()
    manager = gated_manager(gates, locking=service != "naive service")
    sid = await manager.create_session()
    questions = ["What is chatkit?", "Does it lose messages?", "Thanks!"]
    send = sender(manager, service, sid)
    tasks = [asyncio.create_task(send(q)) for q in questions]
    await wait_until_all_admitted(manager, gates, service, questions)
    gates.release(*reversed(questions))  # the first question is the slowest
    await asyncio.gather(*tasks)
    assert pairs(await manager.get_history(sid)) == conversation(*questions)


@pytest.mark.parametrize("service", SERVICES)
async def test_checkpoints_of_a_session_form_one_line(service: str) -> None:
    """The checkpointer race: concurrent runs on one thread branch off the same checkpoint."""
    gates = Gates()
    manager = gated_manager(gates, locking=service != "naive service")
    sid = await manager.create_session()
    gates.release("warm-up")
    await manager.chat(sid, "warm-up")
    send = sender(manager, service, sid)
    tasks = [asyncio.create_task(send(q)) for q in ("a", "b", "c")]
    await wait_until_all_admitted(manager, gates, service, ["a", "b", "c"])
    gates.release("c", "b", "a")
    await asyncio.gather(*tasks)
    parents = [
        t.parent_config["configurable"]["checkpoint_id"]
        async for t in manager.checkpointer.alist({"configurable": {"thread_id": sid}})
        if t.parent_config is not None
    ]
    assert len(parents) == len(set(parents)), "two checkpoints share a parent: the thread branched"
    assert len(await manager.get_history(sid)) == 8


async def test_naive_service_shows_both_races() -> None:
    """What locking=False is for: lost messages, replies that missed earlier turns, a branched thread."""
    gates = Gates()
    manager = gated_manager(gates, locking=False)
    sid = await manager.create_session()
    tasks = [asyncio.create_task(manager.chat(sid, q)) for q in ("a", "b", "c")]
    await until(lambda: len(gates.started) == 3)
    gates.release("c", "b", "a")
    results = await asyncio.gather(*tasks)
    assert [r.turn for r in results] == [1, 1, 1]  # nobody saw the others
    assert len(await manager.get_history(sid)) == 2  # 4 of 6 messages lost: the last commit won


async def test_first_messages_with_create_if_missing_land_in_one_session() -> None:
    gates = Gates(open_all=True)
    manager = gated_manager(gates)
    texts = ["one", "two", "three"]
    await asyncio.gather(*(manager.chat("user-42", t, create_if_missing=True) for t in texts))
    assert (await manager.list_sessions()) == ["user-42"]
    assert pairs(await manager.get_history("user-42")) == conversation(*texts)


@pytest.mark.parametrize(
    "approach",
    ["create_if_missing", pytest.param("check, then create outside the lock", marks=pytest.mark.xfail(strict=True))],
)
async def test_concurrent_first_messages_share_one_session(approach: str) -> None:
    manager = SessionManager()
    sessions_of_user: dict[str, str] = {}

    async def first_message(text: str) -> ChatResult:
        if approach == "create_if_missing":
            return await manager.chat("user-7", text, create_if_missing=True)
        sid = sessions_of_user.get("user-7")
        if sid is None:
            await asyncio.sleep(0)  # any await between the check and the creation (e.g. loading a profile)
            sid = sessions_of_user["user-7"] = await manager.create_session()
        return await manager.chat(sid, text)

    await asyncio.gather(first_message("hello"), first_message("hello again"))
    assert len(await manager.list_sessions()) == 1


async def test_different_sessions_do_not_wait_for_each_other() -> None:
    gates = Gates()
    manager = gated_manager(gates)
    s1, s2 = await manager.create_session(), await manager.create_session()
    slow = asyncio.create_task(manager.chat(s1, "slow"))
    await gates.entered("slow")
    gates.release("fast")
    result = await manager.chat(s2, "fast")  # would hang if s2 waited for s1
    assert result.reply == reply_to("fast", 1)
    assert manager.is_busy(s1) and not manager.is_busy(s2)
    gates.release("slow")
    await slow


async def test_each_turn_sees_every_earlier_turn() -> None:
    manager = SessionManager()
    sid = await manager.create_session()
    results = await asyncio.gather(*(manager.chat(sid, f"q{i}") for i in range(6)))
    assert [r.turn for r in results] == [1, 2, 3, 4, 5, 6]
    assert [r.reply for r in results] == [reply_to(f"q{i}", i + 1) for i in range(6)]


# ---------------------------------------------------------------- policies


async def test_reject_raises_session_busy_at_once_and_keeps_history() -> None:
    gates = Gates()
    manager = gated_manager(gates, policy="reject")
    sid = await manager.create_session()
    first = asyncio.create_task(manager.chat(sid, "first"))
    await gates.entered("first")
    with pytest.raises(SessionBusy, match="busy"):
        await manager.chat(sid, "second")
    queued = asyncio.create_task(manager.chat(sid, "queued", policy="enqueue"))
    await until(lambda: manager.statistics().waiting == 1)
    with pytest.raises(SessionBusy):  # queued counts as busy too
        await manager.chat(sid, "third")
    gates.release("first", "queued")
    await asyncio.gather(first, queued)
    assert pairs(await manager.get_history(sid)) == conversation("first", "queued")
    gates.release("idle now")
    assert (await manager.chat(sid, "idle now")).turn == 3  # an idle session accepts
    assert manager.statistics().rejected == 2


@pytest.mark.parametrize("policy", ["interrupt", "rollback"])
async def test_interrupt_and_rollback_cancel_the_running_turn(policy: str) -> None:
    gates = Gates()
    manager = gated_manager(gates)
    sid = await manager.create_session()
    gates.release("before")
    await manager.chat(sid, "before")
    first = asyncio.create_task(manager.chat(sid, "first"))
    await gates.entered("first")
    gates.release("second")
    result = await manager.chat(sid, "second", policy=policy)
    with pytest.raises(TurnInterrupted) as info:
        await first
    assert info.value.policy == policy
    history = pairs(await manager.get_history(sid))
    if policy == "interrupt":  # the interrupted user message stays, and the new turn saw it
        assert info.value.kept_message
        assert result.turn == 3
        assert history == [*conversation("before"), ("user", "first"), ("user", "second"), ("assistant", reply_to("second", 3))]
    else:  # rollback: the interrupted turn left no trace
        assert not info.value.kept_message
        assert result.turn == 2
        assert history == conversation("before", "second")
    assert not manager.is_busy(sid) and not manager.lock.is_busy(sid)
    assert manager.statistics().interrupted == 1


@pytest.mark.parametrize("policy", ["interrupt", "rollback"])
async def test_interrupt_and_rollback_also_drop_queued_turns(policy: str) -> None:
    gates = Gates()
    manager = gated_manager(gates)
    sid = await manager.create_session()
    running = asyncio.create_task(manager.chat(sid, "running"))
    await gates.entered("running")
    queued = asyncio.create_task(manager.chat(sid, "queued"))
    await until(lambda: manager.statistics().waiting == 1)
    gates.release("new", "queued")
    await manager.chat(sid, "new", policy=policy)
    for task in (running, queued):
        with pytest.raises(TurnInterrupted):
            await task
    assert not queued.exception().kept_message  # type: ignore[union-attr]
    kept = [("user", "running")] if policy == "interrupt" else []
    n = len(kept) + 1
    assert pairs(await manager.get_history(sid)) == [*kept, ("user", "new"), ("assistant", reply_to("new", n))]
    assert "queued" not in gates.started


async def test_interrupt_on_an_idle_session_just_runs() -> None:
    manager = SessionManager(policy="interrupt")
    sid = await manager.create_session()
    assert (await manager.chat(sid, "hello")).reply == reply_to("hello", 1)


async def test_a_superseded_caller_that_is_also_cancelled_sees_cancellation() -> None:
    gates = Gates()
    manager = gated_manager(gates)
    sid = await manager.create_session()
    first = asyncio.create_task(manager.chat(sid, "first"))
    await gates.entered("first")
    first.cancel()  # the client left ...
    gates.release("second")
    await manager.chat(sid, "second", policy="rollback")  # ... and a newer message superseded it
    with pytest.raises(asyncio.CancelledError):
        await first
    assert pairs(await manager.get_history(sid)) == conversation("second")


# ---------------------------------------------------------------- lock timeout


async def test_lock_timeout_raises_a_readable_lock_timeout(loop_clock: FakeClock) -> None:
    gates = Gates()
    manager = gated_manager(gates, lock_timeout=5)
    sid = await manager.create_session()
    first = asyncio.create_task(manager.chat(sid, "first"))
    await gates.entered("first")
    second = asyncio.create_task(manager.chat(sid, "second"))
    await until(lambda: manager.statistics().waiting == 1)
    await loop_clock.advance_and_settle(6)
    with pytest.raises(LockTimeout, match=r"busy answering earlier messages.*lock_timeout=5 s") as info:
        await second
    assert isinstance(info.value, TimeoutError)
    gates.release("first")
    await first
    assert pairs(await manager.get_history(sid)) == conversation("first")
    assert manager.statistics().lock_timeouts == 1


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("message", "error", "pattern"),
    [
        (123, TypeError, r"must be a str .*max_message_chars=20.*got int 123"),
        (None, TypeError, r"must be a str .*max_message_chars=20.*got NoneType"),
        (b"bytes", TypeError, r"must be a str.*got bytes"),
        ("", ValueError, r"empty or only whitespace.*max_message_chars=20"),
        ("  \n\t ", ValueError, r"empty or only whitespace"),
        ("x" * 21, ValueError, r"21 characters long, over the limit of max_message_chars=20"),
        ("a\x00b", ValueError, r"U\+0000 \(NUL\) at position 1"),
        ("red \x1b[31m", ValueError, r"U\+001B \(ESC, which starts ANSI escape sequences\) at position 4"),
        ("csi \x9b31m", ValueError, r"U\+009B \(CSI"),
        ("bell \x07", ValueError, r"U\+0007"),
        ("lone \ud800 half", ValueError, r"U\+D800 \(a lone surrogate\) at position 5"),
    ],
)
async def test_bad_messages_raise_naming_the_value(message: Any, error: type[Exception], pattern: str) -> None:
    manager = SessionManager(max_message_chars=20)
    sid = await manager.create_session()
    await manager.chat(sid, "x" * 20)  # exactly at the limit is fine
    await manager.chat(sid, "tab\tand\nnewline ok")  # ordinary whitespace is fine
    before = await manager.get_history(sid)
    with pytest.raises(error, match=pattern):
        await manager.chat(sid, message)
    with pytest.raises(error, match=pattern):
        async for _ in manager.stream(sid, message):
            pass
    assert await manager.get_history(sid) == before
    assert not manager.is_busy(sid)


@pytest.mark.parametrize("session_id", ["no-such-session", "", "../../etc/passwd", "a b", "x" * 129, 42, None])
async def test_unknown_or_malformed_session_ids_raise_session_not_found(session_id: Any) -> None:
    manager = SessionManager()
    await manager.create_session()
    with pytest.raises(SessionNotFound) as info:
        await manager.chat(session_id, "hello")
    assert isinstance(info.value, LookupError)
    with pytest.raises(SessionNotFound):
        await manager.get_history(session_id)
    with pytest.raises(SessionNotFound):
        await manager.delete_session(session_id)
    with pytest.raises(SessionNotFound):
        async for _ in manager.stream(session_id, "hello"):
            pass
    assert len(await manager.list_sessions()) == 1


async def test_malformed_id_is_refused_even_with_create_if_missing() -> None:
    manager = SessionManager()
    with pytest.raises(SessionNotFound):
        await manager.chat("not/valid", "hello", create_if_missing=True)
    assert (await manager.list_sessions()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"policy": "drop"}, ValueError, "policy must be one of"),
        ({"policy": "reject", "locking": False}, ValueError, "needs locking=True"),
        ({"lock_timeout": 0}, ValueError, "lock_timeout"),
        ({"turn_timeout": -1}, ValueError, "turn_timeout"),
        ({"max_message_chars": 0}, ValueError, "max_message_chars"),
        ({"max_sessions": 0}, ValueError, "max_sessions"),
        ({"session_ttl": "1h"}, TypeError, "session_ttl"),
        ({"model": "gpt"}, TypeError, "chat model or chat Runnable.*'gpt'"),
        ({"checkpointer": {}}, TypeError, "BaseCheckpointSaver"),
        ({"store": object()}, TypeError, "VectorStore"),
        ({"lock": object()}, TypeError, "AsyncKeyLock"),
        ({"keep_checkpoints": 0}, ValueError, "keep_checkpoints must be at least 1, got 0"),
        ({"keep_checkpoints": 2.5}, TypeError, "keep_checkpoints must be an int or None, got 2.5"),
        ({"retrieve_k": 0}, ValueError, "retrieve_k"),
        ({"clock": 5}, TypeError, "clock"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        SessionManager(**kwargs)


async def test_bad_per_call_policy_is_refused() -> None:
    manager = SessionManager()
    sid = await manager.create_session()
    with pytest.raises(ValueError, match="policy must be one of"):
        await manager.chat(sid, "hi", policy="later")  # type: ignore[arg-type]
    assert await manager.get_history(sid) == []


# ---------------------------------------------------------------- sessions: ids, listing, deletion


async def test_session_ids_are_unguessable() -> None:
    manager = SessionManager()
    ids = {await manager.create_session() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)  # 22 url-safe chars = 132 bits >= 128


async def test_delete_session_waits_for_running_turns_and_removes_the_thread() -> None:
    gates = Gates()
    manager = gated_manager(gates)
    sid, other = await manager.create_session(), await manager.create_session()
    running = asyncio.create_task(manager.chat(sid, "running"))
    await gates.entered("running")
    deleting = asyncio.create_task(manager.delete_session(sid))
    queued = asyncio.create_task(manager.chat(sid, "after the deletion"))
    await until(lambda: manager.lock.waiters(sid) == 2)
    gates.release("running")
    assert (await running).turn == 1
    await deleting
    with pytest.raises(SessionNotFound):
        await queued
    assert (await manager.list_sessions()) == [other]
    assert await manager.checkpointer.aget_tuple({"configurable": {"thread_id": sid}}) is None
    with pytest.raises(SessionNotFound):
        await manager.delete_session(sid)
    assert manager.statistics().deleted == 1


# ---------------------------------------------------------------- expiry (fake clock)


async def test_idle_sessions_expire_after_the_ttl(fake_clock: FakeClock) -> None:
    manager = SessionManager(session_ttl=60, clock=fake_clock)
    old, recent = await manager.create_session(), await manager.create_session()
    await manager.chat(old, "hello")
    fake_clock.advance(30)
    await manager.chat(recent, "hello")
    fake_clock.advance(40)  # old: idle 70 s, recent: idle 40 s
    assert await manager.expire_idle() == [old]
    assert (await manager.list_sessions()) == [recent]
    with pytest.raises(SessionNotFound):
        await manager.chat(old, "are you there?")
    assert await manager.checkpointer.aget_tuple({"configurable": {"thread_id": old}}) is None
    fake_clock.advance(21)
    with pytest.raises(SessionNotFound):  # a turn checks expiry too: recent is now 61 s idle
        await manager.chat(recent, "hello?")
    assert await manager.expire_idle() == []
    assert manager.statistics().expired == 2


async def test_a_session_never_expires_while_a_turn_runs_or_waits(fake_clock: FakeClock) -> None:
    gates = Gates()
    manager = gated_manager(gates, session_ttl=60, clock=fake_clock)
    sid = await manager.create_session()
    running = asyncio.create_task(manager.chat(sid, "slow"))
    await gates.entered("slow")
    waiting = asyncio.create_task(manager.chat(sid, "queued"))
    await until(lambda: manager.statistics().waiting == 1)
    fake_clock.advance(1000)
    assert await manager.expire_idle() == []
    gates.release("slow")
    await running
    fake_clock.advance(1000)
    assert await manager.expire_idle() == []  # the queued turn is running now
    gates.release("queued")
    await waiting
    fake_clock.advance(59)
    assert await manager.expire_idle() == []  # idle 59 s since the last turn ended
    fake_clock.advance(1)
    assert await manager.expire_idle() == [sid]


async def test_max_sessions_expires_the_least_recently_used_idle_sessions(fake_clock: FakeClock) -> None:
    gates = Gates(open_all=True)
    manager = gated_manager(gates, max_sessions=2, clock=fake_clock)
    s1 = await manager.create_session()
    fake_clock.advance(1)
    s2 = await manager.create_session()
    fake_clock.advance(1)
    await manager.chat(s1, "s1 is used again")  # now s2 is the least recently used
    fake_clock.advance(1)
    s3 = await manager.create_session()
    assert (await manager.list_sessions()) == [s1, s3]
    await manager.expire_idle()
    assert await manager.checkpointer.aget_tuple({"configurable": {"thread_id": s2}}) is None


async def test_max_sessions_skips_busy_sessions(fake_clock: FakeClock) -> None:
    gates = Gates()
    manager = gated_manager(gates, max_sessions=1, clock=fake_clock)
    busy = await manager.create_session()
    running = asyncio.create_task(manager.chat(busy, "busy"))
    await gates.entered("busy")
    fake_clock.advance(1)
    new = await manager.create_session()
    assert (await manager.list_sessions()) == [busy, new]  # over the limit, but busy can't go
    gates.release("busy")
    await running
    fake_clock.advance(1)
    newest = await manager.create_session()
    assert (await manager.list_sessions()) == [newest]
    assert await manager.expire_idle() == []


async def test_create_if_missing_reuses_an_expired_id_with_a_fresh_history(fake_clock: FakeClock) -> None:
    manager = SessionManager(session_ttl=10, clock=fake_clock)
    await manager.chat("kiosk-1", "first visitor", create_if_missing=True)
    fake_clock.advance(11)
    result = await manager.chat("kiosk-1", "second visitor", create_if_missing=True)
    assert result.turn == 1
    assert pairs(await manager.get_history("kiosk-1")) == conversation("second visitor")
    await manager.expire_idle()
    assert pairs(await manager.get_history("kiosk-1")) == conversation("second visitor")


# ---------------------------------------------------------------- streaming


async def test_stream_yields_the_reply_and_commits_it() -> None:
    manager = SessionManager()
    sid = await manager.create_session()
    chunks = [c async for c in manager.stream(sid, "stream me")]
    assert len(chunks) > 3
    assert "".join(chunks) == reply_to("stream me", 1)
    assert pairs(await manager.get_history(sid)) == conversation("stream me")


async def test_concurrent_streams_and_chats_stay_in_order() -> None:
    manager = SessionManager()
    sid = await manager.create_session()

    async def collect(text: str) -> str:
        return "".join([c async for c in manager.stream(sid, text)])

    streamed = asyncio.create_task(collect("streamed"))
    await until(lambda: manager.is_busy(sid))
    chatted = asyncio.create_task(manager.chat(sid, "chatted"))
    assert await streamed == reply_to("streamed", 1)
    assert (await chatted).turn == 2


@pytest.mark.parametrize("how", ["break and aclose", "break without closing", "cancel the consumer"])
async def test_a_consumer_that_stops_early_cancels_the_turn(how: str) -> None:
    go = asyncio.Event()  # never set: the model stalls after its first chunk
    manager = SessionManager(model=StallingModel(go=go))
    sid = await manager.create_session()
    go.set()
    await manager.chat(sid, "before")
    go.clear()
    before = await manager.get_history(sid)
    got: list[str] = []
    first_chunk = asyncio.Event()
    hold = asyncio.Event()

    async def consume() -> None:
        if how == "break without closing":  # the event loop's async-generator hook closes it
            async for chunk in manager.stream(sid, "stop early"):
                got.append(chunk)
                break
            return
        async with contextlib.aclosing(manager.stream(sid, "stop early")) as chunks:
            async for chunk in chunks:
                got.append(chunk)
                first_chunk.set()
                if how == "break and aclose":
                    break
                await hold.wait()

    consumer = asyncio.create_task(consume())
    if how == "cancel the consumer":
        await first_chunk.wait()
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
    else:
        await consumer
    await until(lambda: not manager.is_busy(sid))
    assert got == ["first "]
    assert await manager.get_history(sid) == before
    assert not manager.lock.is_busy(sid)
    go.set()
    assert (await manager.chat(sid, "next")).turn == 2
    assert manager.statistics().cancelled == 1


async def test_a_stream_commits_whatever_the_consumers_pace() -> None:
    """Streams are decoupled from their consumers: the turn runs to its commit while the consumer pauses,
    its chunks wait in a buffer, and the next turn of the session does not wait for the consumer."""
    manager = SessionManager()
    sid = await manager.create_session()
    resume = asyncio.Event()
    got: list[str] = []

    async def consume() -> str:
        async for chunk in manager.stream(sid, "slow reader"):
            got.append(chunk)
            if len(got) == 1:
                await resume.wait()  # a consumer that is slow to ask for the next chunk
        return "".join(got)

    consumer = asyncio.create_task(consume())
    await until(lambda: manager.statistics().completed == 1)  # committed while the consumer pauses
    assert got == ["Message "]
    assert (await manager.chat(sid, "next")).turn == 2  # the session is free
    resume.set()
    assert await consumer == reply_to("slow reader", 1)  # every buffered chunk arrives
    assert pairs(await manager.get_history(sid)) == conversation("slow reader", "next")


async def test_a_consumer_that_stops_after_the_commit_keeps_the_turn() -> None:
    manager = SessionManager()
    sid = await manager.create_session()
    resume = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(manager.stream(sid, "committed")) as chunks:
            async for _ in chunks:
                await resume.wait()

    consumer = asyncio.create_task(consume())
    await until(lambda: manager.statistics().completed == 1)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert pairs(await manager.get_history(sid)) == conversation("committed")
    assert manager.statistics().cancelled == 0


async def test_stream_raises_the_model_error() -> None:
    gates = Gates(open_all=True)
    gates.fail("boom")
    manager = gated_manager(gates)
    sid = await manager.create_session()
    with pytest.raises(RuntimeError, match="model failed"):
        async for _ in manager.stream(sid, "boom"):
            pass
    assert await manager.get_history(sid) == []


async def test_a_streaming_turn_can_be_interrupted() -> None:
    gates = Gates()
    manager = gated_manager(gates)
    sid = await manager.create_session()

    async def consume() -> list[str]:
        return [c async for c in manager.stream(sid, "streaming")]

    consumer = asyncio.create_task(consume())
    await gates.entered("streaming")
    gates.release("newer")
    await manager.chat(sid, "newer", policy="interrupt")
    with pytest.raises(TurnInterrupted):
        await consumer
    assert pairs(await manager.get_history(sid)) == [("user", "streaming"), ("user", "newer"), ("assistant", reply_to("newer", 2))]


# ---------------------------------------------------------------- retrieval


async def test_with_a_store_the_reply_comes_from_the_best_chunk_and_names_its_source() -> None:
    store = GatedStore()
    store.add_documents(
        [
            Document("Refunds are paid within 14 days. Keep your receipt.", metadata={"source": "refunds.md"}),
            Document("Shipping is free above 50 euros.", metadata={"source": "shipping.md"}),
        ]
    )
    manager = SessionManager(store=store, retrieve_k=2)
    sid = await manager.create_session()
    result = await manager.chat(sid, "When are refunds paid?")
    assert result.reply == "According to refunds.md: Refunds are paid within 14 days."
    assert set(result.sources) == {"refunds.md", "shipping.md"}
    assert result.sources[0] == "refunds.md"
    # the context system message is not stored
    assert [m.role for m in await manager.get_history(sid)] == ["user", "assistant"]


# ---------------------------------------------------------------- instrumentation, introspection


async def test_timeline_records_turns_models_and_lock_spans() -> None:
    timeline = Timeline()
    gates = Gates()
    manager = gated_manager(gates, timeline=timeline)
    sid = await manager.create_session()
    a = asyncio.create_task(manager.chat(sid, "a"), name="A")
    await gates.entered("a")
    b = asyncio.create_task(manager.chat(sid, "b"), name="B")
    await until(lambda: manager.statistics().waiting == 1)
    gates.release("a", "b")
    await asyncio.gather(a, b)
    rows = timeline.rows()
    spans = {(r.who, r.phase): r for r in rows}
    assert {("A", p) for p in ("turn", "wait", "hold", "model")} | {("B", p) for p in ("turn", "wait", "hold", "model")} <= set(spans)
    assert all(r.key == sid and r.outcome == "ok" for r in rows)
    assert spans["A", "hold"].end <= spans["B", "wait"].end  # B waited for A
    assert spans["A", "model"].end <= spans["B", "model"].start  # the models never overlapped
    assert spans["B", "turn"].start <= spans["A", "model"].end  # B arrived while A was answering


async def test_timeline_marks_interrupted_turns() -> None:
    timeline = Timeline()
    gates = Gates()
    manager = gated_manager(gates, timeline=timeline)
    sid = await manager.create_session()
    first = asyncio.create_task(manager.chat(sid, "first"), name="first")
    await gates.entered("first")
    gates.release("second")
    await manager.chat(sid, "second", policy="rollback")
    with pytest.raises(TurnInterrupted):
        await first
    marks = [(r.who, r.phase) for r in timeline.rows() if r.end is None]
    assert marks == [("first", "interrupted")]
    turn = next(r for r in timeline.rows() if (r.who, r.phase) == ("first", "turn"))
    assert turn.outcome == "cancelled"


async def test_repr_and_statistics_show_live_state() -> None:
    gates = Gates()
    manager = gated_manager(gates)
    sid = await manager.create_session()
    running = asyncio.create_task(manager.chat(sid, "a"))
    await gates.entered("a")
    waiting = asyncio.create_task(manager.chat(sid, "b"))
    await until(lambda: manager.statistics().waiting == 1)
    assert repr(manager).startswith("<SessionManager sessions=1 running=1 waiting=1 policy='enqueue' locking=True")
    stats = manager.statistics()
    assert isinstance(stats, SessionStatistics)
    assert (stats.sessions, stats.running, stats.waiting) == (1, 1, 1)
    with pytest.raises(AttributeError):
        stats.running = 0  # type: ignore[misc]
    gates.release("a", "b")
    await asyncio.gather(running, waiting)
    stats = manager.statistics()
    assert (stats.sessions, stats.running, stats.waiting, stats.completed, stats.created) == (1, 0, 0, 2, 1)


async def test_results_and_messages_are_frozen_records() -> None:
    manager = SessionManager()
    sid = await manager.create_session()
    result = await manager.chat(sid, "hello")
    assert (result.session_id, result.turn, result.sources) == (sid, 1, ())
    assert result.elapsed >= result.waited >= 0
    message = (await manager.get_history(sid))[0]
    assert message.timestamp is not None and message.timestamp.tzinfo is not None
    for record, attr in ((result, "reply"), (message, "content")):
        with pytest.raises(AttributeError):
            setattr(record, attr, "changed")


async def test_any_checkpointer_and_any_chat_model_work() -> None:
    from langchain_core.language_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.memory import InMemorySaver

    class Saver(InMemorySaver):
        pass

    model = GenericFakeChatModel(messages=iter([AIMessage("first reply"), AIMessage("second reply")]))
    manager = SessionManager(model=model, checkpointer=Saver())
    sid = await manager.create_session()
    assert (await manager.chat(sid, "a")).reply == "first reply"
    assert "".join([c async for c in manager.stream(sid, "b")]) == "second reply"
    assert [m.content for m in await manager.get_history(sid)] == ["a", "first reply", "b", "second reply"]


def test_public_names_are_exported_lazily() -> None:
    assert chatkit.SessionManager is SessionManager
    assert chatkit.ChatResult is ChatResult
    assert chatkit.ExtractiveChatModel is ExtractiveChatModel
    assert issubclass(chatkit.SessionNotFound, LookupError)


# ---------------------------------------------------------------- several event loops (a notebook and a web server)


def run_in_thread(coro_fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``asyncio.run(coro_fn())`` in a new thread; the outcome lands in the returned dict."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro_fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


class CrossLoopGate:
    """A model latency that waits, on its own loop, until another thread opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def __call__(self, text: str) -> Any:
        if not text.startswith("A"):
            return None
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self.entered.set()
        return self._event.wait()

    def open(self) -> None:
        assert self._loop is not None and self._event is not None
        self._loop.call_soon_threadsafe(self._event.set)


@pytest.mark.parametrize("policy", ["enqueue", "interrupt"])
def test_turns_from_two_event_loops_in_two_threads(policy: str) -> None:
    gate = CrossLoopGate()
    manager = SessionManager(model=ExtractiveChatModel(latency=gate))
    sid = asyncio.run(manager.create_session())
    b_queued = threading.Event()
    manager.lock.add_observer(lambda e: b_queued.set() if e.kind == "requested" and e.label == "B" else None)

    async def turn_a() -> ChatResult:
        asyncio.current_task().set_name("A")  # type: ignore[union-attr]
        return await manager.chat(sid, "A from the notebook")

    async def turn_b() -> ChatResult:
        asyncio.current_task().set_name("B")  # type: ignore[union-attr]
        return await manager.chat(sid, "B from the web server", policy=policy)  # type: ignore[arg-type]

    thread_a, box_a = run_in_thread(turn_a)
    assert gate.entered.wait(30)
    thread_b, box_b = run_in_thread(turn_b)
    assert b_queued.wait(30)
    if policy == "enqueue":
        gate.open()
    thread_a.join(30)
    thread_b.join(30)
    assert not thread_a.is_alive() and not thread_b.is_alive()
    history = asyncio.run(manager.get_history(sid))
    if policy == "enqueue":
        assert box_a["result"].turn == 1 and box_b["result"].turn == 2
        assert pairs(history) == conversation("A from the notebook", "B from the web server")
    else:
        assert isinstance(box_a["error"], TurnInterrupted)
        assert box_b["result"].turn == 2
        assert pairs(history) == [
            ("user", "A from the notebook"),
            ("user", "B from the web server"),
            ("assistant", reply_to("B from the web server", 2)),
        ]
    assert not manager.lock.is_busy()


def test_importing_sessions_and_models_stays_light() -> None:
    code = (
        "import sys, chatkit, chatkit.sessions, chatkit.models; "
        "heavy = {'torch', 'transformers', 'sentence_transformers', 'gradio', 'faiss', 'langchain_huggingface'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
