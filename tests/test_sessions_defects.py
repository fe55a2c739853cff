"""Defects of issue 9 in SessionManager, each shown by a test that failed on the code before the fix:

* 4: a model or tool that calls ``chat()`` on its own session waited ``lock_timeout`` (forever with ``None``)
  for the lock its own turn holds; now it fails at once.
* 7: ``stream()`` depended on its consumer's pace: under ``interrupt`` it raised ``InvalidStateError`` when the
  newer message arrived while the stream waited for its consumer and the checkpoint write was slow, and a
  slow consumer delayed an interrupt (the stream's lock was released only when the consumer came back).
* 8: a session past its TTL stayed readable until something called ``expire_idle()``.
* 9 (non-str messages, NUL, ANSI escapes, lone surrogates) is ``test_bad_messages_raise_naming_the_value`` in
  ``test_sessions.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from chatkit import ExtractiveChatModel, SessionManager, SessionNotFound
from chatkit.sessions import TurnInterrupted
from tests._session_helpers import GatedSaver, StallingModel, conversation, pairs, reply_to, until
from tests.conftest import FakeClock

# ---------------------------------------------------------------- defect 4: a turn that waits for itself


@pytest.mark.parametrize("call", ["chat", "stream", "delete_session", "chat with create_if_missing"])
async def test_a_model_that_calls_its_own_session_fails_at_once(call: str) -> None:
    seen: list[BaseException] = []

    async def latency(text: str) -> None:  # runs inside the model, in a task LangGraph started
        if text != "outer":
            return
        try:
            if call == "chat":
                await manager.chat(sid, "inner")
            elif call == "chat with create_if_missing":
                await manager.chat(sid, "inner", create_if_missing=True)
            elif call == "stream":
                async for _ in manager.stream(sid, "inner"):
                    pass
            else:
                await manager.delete_session(sid)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            seen.append(exc)

    manager = SessionManager(model=ExtractiveChatModel(latency=latency), lock_timeout=None)
    sid = await manager.create_session()
    outer = asyncio.create_task(manager.chat(sid, "outer"))
    try:
        await until(outer.done)  # before the fix: the inner call waited for the lock forever
    finally:
        outer.cancel()
    assert (await outer).reply == reply_to("outer", 1)
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError)
    assert f"on session {sid!r} from inside a turn of that same session" in str(seen[0])
    assert pairs(await manager.get_history(sid)) == conversation("outer")
    assert manager.statistics().running == manager.statistics().waiting == 0


async def test_a_model_may_call_another_session() -> None:
    replies: list[str] = []

    async def latency(text: str) -> None:
        if text == "outer":
            replies.append((await manager.chat(other, "from the other session")).reply)

    manager = SessionManager(model=ExtractiveChatModel(latency=latency))
    sid, other = await manager.create_session(), await manager.create_session()
    await manager.chat(sid, "outer")
    assert replies == [reply_to("from the other session", 1)]
    assert pairs(await manager.get_history(other)) == conversation("from the other session")


# ---------------------------------------------------------------- defect 7: streams and their consumers


async def test_an_interrupt_while_the_consumer_pauses_and_the_write_is_slow() -> None:
    """Before: the stream's turn waited for its consumer before committing; an interrupt cancelled it there,
    its cleanup write was slow, the consumer came back, read the end of the stream and set the result of the
    cancelled gate: ``InvalidStateError``. Now the turn commits at its own pace (here while the consumer
    pauses, held only by the slow write), so the newer message finds it committing and queues behind it."""
    saver = GatedSaver()
    manager = SessionManager(checkpointer=saver)
    sid = await manager.create_session()
    entered, release = saver.hold("write")
    resume = asyncio.Event()
    got: list[str] = []

    async def consume() -> str:
        async for chunk in manager.stream(sid, "streaming"):
            got.append(chunk)
            if len(got) == 1:
                await resume.wait()
        return "".join(got)

    consumer = asyncio.create_task(consume())
    await until(lambda: len(got) == 1)
    await until(entered.is_set)  # the turn reached its (slow) commit while its consumer pauses
    newer = asyncio.create_task(manager.chat(sid, "newer", policy="interrupt"))
    await until(lambda: manager.statistics().waiting == 1)
    resume.set()
    await until(lambda: len(got) > 1)
    release.set()
    assert (await newer).reply == reply_to("newer", 2)
    assert await consumer == reply_to("streaming", 1)
    assert pairs(await manager.get_history(sid)) == conversation("streaming", "newer")


async def test_an_interrupt_is_not_delayed_by_a_slow_consumer() -> None:
    """Before: the stream's consumer held the lock, and released it only when it asked for the next chunk."""
    go = asyncio.Event()
    manager = SessionManager(model=StallingModel(go=go))
    sid = await manager.create_session()
    resume = asyncio.Event()
    got: list[str] = []

    async def consume() -> list[str]:
        async for chunk in manager.stream(sid, "streaming"):
            got.append(chunk)
            await resume.wait()  # a consumer that is slow to ask for the next chunk
        return got

    consumer = asyncio.create_task(consume())
    await until(lambda: got == ["first "])  # the model stalls after its first chunk
    go.set()  # the newer turn's model must not stall
    newer = asyncio.create_task(manager.chat(sid, "newer", policy="interrupt"))
    try:
        await until(newer.done)  # before the fix: never, while the consumer pauses
    finally:
        resume.set()
    assert (await newer).turn == 2
    with pytest.raises(TurnInterrupted) as info:
        await consumer
    assert info.value.kept_message
    assert pairs(await manager.get_history(sid)) == [
        ("user", "streaming"),
        ("user", "newer"),
        ("assistant", "first rest of the reply"),
    ]


async def test_an_abandoned_stream_whose_consumer_was_never_resumed_is_cancelled_cleanly() -> None:
    go = asyncio.Event()
    manager = SessionManager(model=StallingModel(go=go))
    sid = await manager.create_session()
    chunks = manager.stream(sid, "abandoned")
    assert await anext(chunks) == "first "
    await chunks.aclose()  # the turn is still in the model: it is cancelled, nothing is saved
    assert await manager.get_history(sid) == []
    assert not manager.is_busy(sid) and not manager.lock.is_busy(sid)
    assert manager.statistics().cancelled == 1


# ---------------------------------------------------------------- defect 8: expiry is immediate for readers


async def test_an_expired_session_is_gone_for_every_reader_at_once(fake_clock: FakeClock) -> None:
    manager = SessionManager(session_ttl=60, clock=fake_clock)
    sid, other = await manager.create_session(), await manager.create_session()
    await manager.chat(sid, "hello")
    fake_clock.advance(30)
    await manager.chat(other, "still here")
    fake_clock.advance(31)  # sid: idle 61 s; other: idle 31 s; nobody called expire_idle()
    with pytest.raises(SessionNotFound):
        await manager.get_history(sid)  # before the fix: the old history
    assert await manager.list_sessions() == [other]
    assert manager.statistics().sessions == 1
    with pytest.raises(SessionNotFound):
        await manager.chat(sid, "are you there?")
    with pytest.raises(SessionNotFound):
        async for _ in manager.stream(sid, "are you there?"):
            pass
    with pytest.raises(SessionNotFound):
        await manager.delete_session(sid)
    await manager.aclose()  # finishes deleting the expired thread
    assert await manager.checkpointer.aget_tuple({"configurable": {"thread_id": sid}}) is None
    assert manager.statistics().expired == 1


async def test_expiry_takes_effect_at_the_ttl_exactly(fake_clock: FakeClock) -> None:
    manager = SessionManager(session_ttl=60, clock=fake_clock)
    sid = await manager.create_session()
    fake_clock.advance(59.999)
    assert await manager.list_sessions() == [sid]
    assert await manager.get_history(sid) == []
    fake_clock.advance(0.001)
    assert await manager.list_sessions() == []
    with pytest.raises(SessionNotFound):
        await manager.get_history(sid)


async def test_a_session_is_readable_while_a_turn_keeps_it_alive_past_the_ttl(fake_clock: FakeClock) -> None:
    go = asyncio.Event()
    manager = SessionManager(model=StallingModel(go=go), session_ttl=60, clock=fake_clock)
    sid = await manager.create_session()
    task = asyncio.create_task(manager.chat(sid, "slow"))
    await until(lambda: manager.statistics().running == 1)
    fake_clock.advance(1000)
    assert await manager.get_history(sid) == []  # a turn runs on it: it cannot expire
    assert await manager.list_sessions() == [sid]
    go.set()
    await task
    fake_clock.advance(59)
    assert len(await manager.get_history(sid)) == 2
    fake_clock.advance(1)
    with pytest.raises(SessionNotFound):  # 60 s after its last turn
        await manager.get_history(sid)


@pytest.mark.parametrize("by", ["the event loop", "a newer message"])
async def test_a_stream_whose_turn_is_cancelled_before_it_ran_leaves_nothing_in_flight(by: str) -> None:
    manager = SessionManager()
    sid = await manager.create_session()
    reader = asyncio.create_task(anext(manager.stream(sid, "never runs")))
    await asyncio.sleep(0)  # the consumer was admitted; its turn's task is scheduled but has not run yet
    (worker,) = [t for t in asyncio.all_tasks() if t.get_name().endswith("(stream)")]
    if by == "the event loop":
        worker.cancel()  # its coroutine never starts: no finally of its own runs
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert worker.cancelled() and manager.statistics().cancelled == 1
    else:
        newer = asyncio.create_task(manager.chat(sid, "newer", policy="rollback"))
        with pytest.raises(TurnInterrupted):
            await reader
        assert (await newer).turn == 1
        assert manager.statistics().interrupted == 1
    await until(lambda: not manager.is_busy(sid))
    assert (await manager.chat(sid, "next")).reply.startswith("Message")
