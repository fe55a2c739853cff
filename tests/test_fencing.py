"""Fenced checkpoint savers: a stale write is refused inside the transaction that would store it.

The same tests run on the in-memory, SQLite (a temporary file) and Postgres (the session's throwaway
cluster) savers; the plain savers show the lost updates the fenced ones refuse (strict xfail).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver

from chatkit import StaleCommit
from chatkit.sessions.fencing import FencedInMemorySaver, fence, read_fence
from tests._fencing_helpers import append_message, chain, chat_graph, history

Opener = Callable[[], AbstractAsyncContextManager[Any]]


def _openers(tmp_path: Path, request: pytest.FixtureRequest, kind: str, fenced: bool) -> Opener:
    """A way to open (another connection to) the same store: each call is a new saver on the same data."""
    if kind == "memory":
        saver = FencedInMemorySaver() if fenced else InMemorySaver()

        @asynccontextmanager
        async def memory() -> AsyncIterator[Any]:
            yield saver

        return memory
    if kind == "sqlite":
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        from chatkit.sessions.fencing import FencedSqliteSaver

        path = str(tmp_path / "checkpoints.sqlite")
        cls = FencedSqliteSaver if fenced else AsyncSqliteSaver
        return lambda: cls.from_conn_string(path)
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    from chatkit.sessions.fencing import FencedPostgresSaver

    dsn = request.getfixturevalue("postgres_dsn")
    pg_cls = FencedPostgresSaver if fenced else AsyncPostgresSaver

    @asynccontextmanager
    async def postgres() -> AsyncIterator[Any]:
        async with pg_cls.from_conn_string(dsn) as saver:
            await saver.setup()
            yield saver

    return postgres


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def open_fenced(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    return _openers(tmp_path, request, request.param, fenced=True)


@pytest.fixture
def thread_id() -> str:
    return f"thread-{uuid.uuid4().hex[:12]}"


def _thread(thread_id: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}}


# ----------------------------------------------------------------------------- the races, before and after


def _baselines() -> list[Any]:
    params = []
    for kind in ("memory", "sqlite", "postgres"):
        for fenced in (False, True):
            marks = [] if fenced else [pytest.mark.xfail(strict=True, reason="the plain saver stores both: a lost update")]
            params.append(pytest.param(kind, fenced, marks=marks, id=f"{kind}-{'fenced' if fenced else 'plain'}"))
    return params


@pytest.mark.parametrize(("kind", "fenced"), _baselines())
async def test_two_writers_from_the_same_head_exactly_one_wins(
    kind: str, fenced: bool, tmp_path: Path, request: pytest.FixtureRequest, thread_id: str
) -> None:
    """Two writers computed their turn from the same head and commit at once (two connections)."""
    opener = _openers(tmp_path, request, kind, fenced)
    async with opener() as one, opener() as two:
        head = await append_message(one, fence(_thread(thread_id), token=None), "turn 1")
        results = await asyncio.gather(
            append_message(one, fence(head, token=None), "turn 2 (writer A)"),
            append_message(two, fence(head, token=None), "turn 2 (writer B)"),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, StaleCommit)]
        assert len(refused) == 1, results
        assert refused[0].reason == "head" and refused[0].expected == head["configurable"]["checkpoint_id"]
        final = await history(one, thread_id)
        assert final[0] == "turn 1" and len(final) == 2
        assert len(await chain(one, thread_id)) == 2  # nothing of the refused write was stored


async def test_stale_token_is_refused_and_history_kept(open_fenced: Opener, thread_id: str) -> None:
    async with open_fenced() as saver:
        old = await append_message(saver, fence(_thread(thread_id), token=10), "by holder 10")
        new = await append_message(saver, fence(old, token=11), "by holder 11")
        with pytest.raises(StaleCommit, match="fencing token 10 is older than 11") as caught:
            await append_message(saver, fence(new, token=10), "holder 10 again, late")  # even from the new head
        assert (caught.value.reason, caught.value.token, caught.value.newest_token) == ("token", 10, 11)
        assert caught.value.thread_id == thread_id
        assert await history(saver, thread_id) == ["by holder 10", "by holder 11"]
        assert len(await chain(saver, thread_id)) == 2


async def test_a_holder_that_lost_its_lock_cannot_overwrite(open_fenced: Opener, thread_id: str) -> None:
    """Holder 1 read the head, lost its lock; holder 2 committed; holder 1's late commit is refused."""
    async with open_fenced() as saver:
        start = await append_message(saver, fence(_thread(thread_id), token=1), "turn 1")
        await append_message(saver, fence(start, token=2), "turn 2 by holder 2")
        with pytest.raises(StaleCommit) as caught:
            await append_message(saver, fence(start, token=1), "turn 2 by holder 1, late")
        assert caught.value.reason == "token"
        assert await history(saver, thread_id) == ["turn 1", "turn 2 by holder 2"]


async def test_first_writes_of_a_new_thread_race_and_one_wins(open_fenced: Opener, thread_id: str) -> None:
    """Both writers saw no checkpoint (create_if_missing racing): the second must not write on top."""
    async with open_fenced() as saver:
        await append_message(saver, fence(_thread(thread_id), token=None), "created by A")
        with pytest.raises(StaleCommit, match="computed from a thread with no checkpoint") as caught:
            await append_message(saver, fence(_thread(thread_id), token=None), "created by B")
        assert caught.value.expected is None and caught.value.head is not None
        assert await history(saver, thread_id) == ["created by A"]


async def test_same_holder_continues_its_own_chain(open_fenced: Opener, thread_id: str) -> None:
    """A run that writes several checkpoints, then a second commit by the same holder, are accepted."""
    async with open_fenced() as saver:
        graph = chat_graph(saver)
        result = await graph.ainvoke({"messages": [HumanMessage("hi")]}, fence(_thread(thread_id), token=5))
        assert [m.content for m in result["messages"]] == ["hi", "reply to hi"]
        assert len(await chain(saver, thread_id)) >= 2  # several checkpoints, one writer
        # the same holder writes again, on the thread's latest checkpoint (no checkpoint_id: "the latest")
        await graph.aupdate_state(fence(_thread(thread_id), token=5), {"messages": [HumanMessage("more")]}, as_node="reply")
        assert await history(saver, thread_id) == ["hi", "reply to hi", "more"]
        # ... but a new holder that does not name the head it started from is refused
        with pytest.raises(StaleCommit, match="head"):
            await graph.aupdate_state(fence(_thread(thread_id), token=6), {"messages": [HumanMessage("x")]}, as_node="reply")


async def test_checkpoints_form_one_chain(open_fenced: Opener, thread_id: str) -> None:
    async with open_fenced() as saver:
        config = fence(_thread(thread_id), token=1)
        for i in range(5):
            head = await append_message(saver, config, f"m{i}")
            config = fence(head, token=1 + i)
        rows = await chain(saver, thread_id)
        assert [parent for _, parent in rows] == [None, *(cid for cid, _ in rows[:-1])]


async def test_unfenced_writes_behave_as_the_plain_saver(open_fenced: Opener, thread_id: str) -> None:
    """Without fence(), a write on an older checkpoint is stored (a fork), as LangGraph's savers do."""
    async with open_fenced() as saver:
        first = await append_message(saver, _thread(thread_id), "one")
        await append_message(saver, first, "two")
        await append_message(saver, first, "two, forked")
        assert len(await chain(saver, thread_id)) == 3


async def test_refusal_keeps_the_thread_writable(open_fenced: Opener, thread_id: str) -> None:
    async with open_fenced() as saver:
        head = await append_message(saver, fence(_thread(thread_id), token=1), "one")
        with pytest.raises(StaleCommit):
            await append_message(saver, fence(_thread(thread_id), token=2), "stale")
        head = await append_message(saver, fence(head, token=2), "two")
        assert await history(saver, thread_id) == ["one", "two"]


def test_fence_records_what_it_needs() -> None:
    cfg = fence({"configurable": {"thread_id": "t", "checkpoint_id": "c1"}, "tags": ["x"]}, token=3)
    assert cfg["tags"] == ["x"] and cfg["configurable"]["checkpoint_id"] == "c1"
    assert read_fence(cfg) == read_fence(fence(cfg, token=3))
    f = read_fence(fence({"configurable": {"thread_id": "t"}}, token=None))
    assert f is not None and f.token is None and f.base is None and f.writer.startswith("once:")
    assert read_fence({"configurable": {"thread_id": "t"}}) is None
    with pytest.raises(TypeError, match="thread_id"):
        fence({"configurable": {}}, token=1)
    with pytest.raises(TypeError, match="token"):
        fence({"configurable": {"thread_id": "t"}}, token="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="token"):
        fence({"configurable": {"thread_id": "t"}}, token=True)


async def test_setup_creates_the_fence_table(tmp_path: Path) -> None:
    import aiosqlite

    from chatkit.sessions.fencing import FENCE_TABLE, FencedSqliteSaver

    path = str(tmp_path / "c.sqlite")
    async with FencedSqliteSaver.from_conn_string(path) as saver:
        await saver.setup()
    async with aiosqlite.connect(path) as conn:
        async with conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cur:
            tables = {row[0] async for row in cur}
    assert {"checkpoints", "writes", FENCE_TABLE} <= tables


def test_missing_packages_name_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import chatkit.sessions.fencing as fencing

    for name in ("FencedSqliteSaver", "FencedPostgresSaver"):
        monkeypatch.delitem(fencing.__dict__, name, raising=False)
    monkeypatch.setitem(sys.modules, "langgraph.checkpoint.postgres.aio", None)
    monkeypatch.setitem(sys.modules, "langgraph.checkpoint.sqlite.aio", None)
    with pytest.raises(ImportError, match=r"chatkit\[distributed\]"):
        fencing.FencedPostgresSaver  # noqa: B018
    with pytest.raises(ImportError, match=r"chatkit\[sqlite\]"):
        fencing.FencedSqliteSaver  # noqa: B018
    assert os.path.basename(fencing.__file__) == "fencing.py"


# ----------------------------------------------------------------------------- claim, delete, prune (FencedSaver)


async def test_a_claim_refuses_the_lost_holder_before_the_new_one_writes(open_fenced: Opener, thread_id: str) -> None:
    """Holder 1 read the head and lost its lock; holder 2 claimed the thread and is still computing: holder 1's
    commit, on the unchanged head, is refused by the claim alone."""
    from chatkit.sessions.fencing import is_fenced

    async with open_fenced() as saver:
        assert is_fenced(saver)
        start = await append_message(saver, fence(_thread(thread_id), token=1), "turn 1")
        await saver.aclaim_thread(thread_id, token=2)  # holder 2 starts its turn
        with pytest.raises(StaleCommit, match="fencing token 1 is older than 2") as caught:
            await append_message(saver, fence(start, token=1), "turn 2 by holder 1, late")
        assert caught.value.reason == "token"
        await append_message(saver, fence(start, token=2), "turn 2 by holder 2")  # from the head it read
        assert await history(saver, thread_id) == ["turn 1", "turn 2 by holder 2"]
        with pytest.raises(StaleCommit, match="refused to claim") as claimed:
            await saver.aclaim_thread(thread_id, token=1)
        assert (claimed.value.reason, claimed.value.token, claimed.value.newest_token) == ("token", 1, 2)
        await saver.aclaim_thread(thread_id, token=2)  # the holder itself, again: fine
        await saver.aclaim_thread("never-written", token=1)  # nothing to claim: no row is made


async def test_a_stale_delete_or_prune_changes_nothing(open_fenced: Opener, thread_id: str) -> None:
    async with open_fenced() as saver:
        config = fence(_thread(thread_id), token=1)
        for i in range(4):
            config = fence(await append_message(saver, config, f"m{i}"), token=5)
        await saver.aclaim_thread(thread_id, token=7)
        for stale in (saver.aprune_thread_fenced(thread_id, keep=1, token=6), saver.adelete_thread_fenced(thread_id, token=6)):
            with pytest.raises(StaleCommit, match=r"refused to (prune|delete) thread .* token 6 is older than 7"):
                await stale
        assert len(await chain(saver, thread_id)) == 4 and await history(saver, thread_id) == ["m0", "m1", "m2", "m3"]
        await saver.aprune_thread_fenced(thread_id, keep=2, token=7)
        assert len(await chain(saver, thread_id)) == 2 and await history(saver, thread_id) == ["m0", "m1", "m2", "m3"]
        await saver.adelete_thread_fenced(thread_id, token=7)
        assert await chain(saver, thread_id) == []


async def test_a_deleted_thread_cannot_be_brought_back_by_a_lost_holder(open_fenced: Opener, thread_id: str) -> None:
    async with open_fenced() as saver:
        await append_message(saver, fence(_thread(thread_id), token=3), "turn 1")
        await saver.adelete_thread_fenced(thread_id, token=4)
        with pytest.raises(StaleCommit) as caught:  # holder 3 creates it again, late
            await append_message(saver, fence(_thread(thread_id), token=3), "late")
        assert caught.value.reason == "token"
        assert await chain(saver, thread_id) == []
        await append_message(saver, fence(_thread(thread_id), token=5), "a new session with that id")
        assert await history(saver, thread_id) == ["a new session with that id"]


def test_which_saver_to_use_instead() -> None:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from chatkit.sessions.fencing import fenced_alternative, is_fenced

    assert "FencedInMemorySaver" in fenced_alternative(InMemorySaver())
    assert "FencedSqliteSaver" in fenced_alternative(AsyncSqliteSaver.__new__(AsyncSqliteSaver))
    assert "FencedSaver" in fenced_alternative(object())
    assert not is_fenced(InMemorySaver()) and is_fenced(FencedInMemorySaver())
