"""CowVectorStore under concurrent load: readers that never queue, embedding that holds nothing, writes
cancelled at every await point, and loop-thread work that stays linear in the batch size.

Every test is sequenced by gates (events the code under test waits on), never by sleeping.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from chatkit import CowVectorStore, HashEmbeddings, Timeline
from chatkit.store.ordering import WriteOrder

from ._store_helpers import GATE_TIMEOUT, Gates, GatedEmbeddings, entered, make, paragraphs, texts

# ---------------------------------------------------------------------- readers never queue

READS: dict[str, Callable[[CowVectorStore], Awaitable[Any]]] = {
    "asimilarity_search": lambda s: s.asimilarity_search("seed", k=1),
    "asimilarity_search_with_score": lambda s: s.asimilarity_search_with_score("seed", k=1),
    "asimilarity_search_with_relevance_scores": lambda s: s.asimilarity_search_with_relevance_scores("seed", k=1),
    "asimilarity_search_by_vector": lambda s: s.asimilarity_search_by_vector([1.0] * 32, k=1),
    "amax_marginal_relevance_search": lambda s: s.amax_marginal_relevance_search("seed", k=1, fetch_k=2),
    "snapshot": lambda s: s.snapshot().asimilarity_search("seed", k=1),
    "retriever": lambda s: s.as_retriever(search_kwargs={"k": 1}).ainvoke("seed"),
    "retriever, mmr": lambda s: s.as_retriever(search_type="mmr", search_kwargs={"k": 1}).ainvoke("seed"),
    "retriever, threshold": lambda s: s.as_retriever(
        search_type="similarity_score_threshold", search_kwargs={"score_threshold": 0.0}
    ).ainvoke("seed"),
}


class GatedMerges:
    """Patches the segment merge so that every merge waits at the gate "merge" until the test opens it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import chatkit.store.publisher as pub

        self.gates = Gates("merge")
        real = pub.merge_segments

        def gated(segments: Any, lives: Any) -> Any:
            self.gates.pass_("merge")
            return real(segments, lives)

        monkeypatch.setattr(pub, "merge_segments", gated)


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("blocker", ["embedding", "merge"])
async def test_async_readers_never_queue_behind_embedding_or_merging(
    read: str, blocker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the application's default executor is small and busy: the store must not need it for reads
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="app-default"))
    app_gate = Gates("app")
    app_job = loop.run_in_executor(None, app_gate.pass_, "app")
    names = [f"w{i}" for i in range(6)]
    emb = GatedEmbeddings(*names)
    merges = GatedMerges(monkeypatch) if blocker == "merge" else None
    store = make(embeddings=emb, embed_workers=2, compaction="background", max_segments=2, merge_factor=2)
    writers: list[asyncio.Task[Any]] = []
    try:
        await app_gate.reached("app")
        store.add_texts(["seed"])
        if merges is None:  # every write-pool thread embeds, more embeddings queue behind them
            writers = [asyncio.create_task(store.aadd_document(n, paragraphs(n))) for n in names]
            await entered(emb, "w0")
            await entered(emb, "w1")
        else:  # writers' owed merges (the segment cap) and the background compactor are stuck merging
            emb.open()
            writers = [asyncio.create_task(store.aadd_texts([f"t{i}"])) for i in range(3)]
            await merges.gates.reached("merge")
        search = asyncio.create_task(READS[read](store))
        done, _ = await asyncio.wait({search}, timeout=GATE_TIMEOUT)
        assert search in done, f"{read} queued behind {blocker}"
        if merges is None:
            assert not any(w.done() for w in writers)
        else:
            assert not merges.gates.gates["merge"].is_set()  # still merging
        assert len(search.result()) >= 1
    finally:
        emb.open()
        if merges is not None:
            merges.gates.open()
        app_gate.open()
        await asyncio.gather(*writers, app_job)
        store.close()


async def test_the_write_pool_is_bounded() -> None:
    emb = GatedEmbeddings("a", "b", "c")
    store = make(embeddings=emb, embed_workers=2)
    writes = [asyncio.create_task(store.aadd_document(n, paragraphs(n))) for n in ("a", "b", "c")]
    await entered(emb, "a")
    await entered(emb, "b")
    assert not emb.entered["c"].is_set()  # both threads are busy: the third embedding waits for one
    assert {emb.threads["a"], emb.threads["b"]} <= {"chatkit-embed_0", "chatkit-embed_1"}
    emb.open("a")
    await entered(emb, "c")
    emb.open()
    assert sorted(r.version for r in await asyncio.gather(*writes)) == [1, 2, 3]
    store.close()


# ---------------------------------------------------------------------- nothing held while embedding


async def test_the_writer_holds_nothing_while_it_embeds_and_waits_only_for_its_turn() -> None:
    tl = Timeline()
    emb = GatedEmbeddings("first", "second")
    store = make(embeddings=emb, timeline=tl)
    w1 = asyncio.create_task(store.aadd_document("doc", paragraphs("first")), name="writer-1")
    w2 = asyncio.create_task(store.aadd_document("doc", paragraphs("second")), name="writer-2")
    await entered(emb, "first")
    await entered(emb, "second")  # both embed at once, for the same source
    emb.open("second")
    emb.open("first")
    await asyncio.gather(w1, w2)
    rows = {(r.who, r.phase): r for r in tl.rows() if r.key == "doc"}
    for who in ("writer-1", "writer-2"):
        embed, wait, hold, publish = (rows[(who, p)] for p in ("embed", "wait", "hold", "publish"))
        assert embed.end is not None and wait.end is not None and hold.end is not None
        assert embed.end <= wait.start <= wait.end <= hold.start <= publish.start  # no hold around the embed
        assert publish.end is not None and publish.end <= hold.end
    # the second write waited for the first one's publish, not for its embedding
    assert rows[("writer-2", "wait")].end >= rows[("writer-1", "hold")].end  # type: ignore[operator]
    assert sorted(r.phase for r in tl.rows() if r.phase in ("hold", "publish")) == ["hold", "hold", "publish", "publish"]


# ---------------------------------------------------------------------- cancellation at every await point


async def healthy(store: CowVectorStore, directory: Path, source: str = "doc") -> None:
    """After a cancellation: nothing pending, merges can finish and run, saves work, the source is free."""
    assert not store._order.busy()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        assert await loop.run_in_executor(pool, store.wait_for_compaction, GATE_TIMEOUT)
        await loop.run_in_executor(pool, store.compact)
        assert not store._pub._busy
        await loop.run_in_executor(pool, store.save, directory)
    version = store.version
    record = await store.aadd_document(source, paragraphs("after"))
    assert record.version == version + 1 and "after" in texts(store.snapshot().documents(source))
    assert CowVectorStore.load(directory, HashEmbeddings(dim=32), compaction="off").version == version


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelled_while_its_embedding_is_queued(tmp_path: Path) -> None:
    emb = GatedEmbeddings("busy", "queued")
    store = make(embeddings=emb, embed_workers=1)
    busy = asyncio.create_task(store.aadd_document("other", paragraphs("busy")))
    await entered(emb, "busy")
    queued = asyncio.create_task(store.aadd_document("doc", paragraphs("queued")))
    await asyncio.sleep(0)  # it took its ticket and queued its job
    assert store._order.pending("doc") == 1
    await cancel(queued)
    emb.open()
    await busy
    assert not emb.entered["queued"].is_set()  # the queued job was dropped, never embedded
    assert store.sources() == ["other"]
    await healthy(store, tmp_path)


@pytest.mark.parametrize("call", ["aadd_document", "aadd_sources", "aadd_texts"])
async def test_cancelled_while_embedding(call: str, tmp_path: Path) -> None:
    emb = GatedEmbeddings("slow")
    store = make(embeddings=emb)
    coro = {
        "aadd_document": lambda: store.aadd_document("doc", paragraphs("slow")),
        "aadd_sources": lambda: store.aadd_sources({"doc": paragraphs("slow"), "two": paragraphs("slow")}),
        "aadd_texts": lambda: store.aadd_texts(["slow text"], ids=["x"]),
    }[call]()
    write = asyncio.create_task(coro)
    await entered(emb, "slow")
    await cancel(write)
    emb.open()  # the embedding finishes on the pool; its result is dropped
    assert store.version == 0 and len(store) == 0
    await healthy(store, tmp_path)


@pytest.mark.parametrize("call", ["aadd_document", "aremove_document"])
async def test_cancelled_while_waiting_for_its_turn(call: str, tmp_path: Path) -> None:
    emb = GatedEmbeddings("first")
    store = make(embeddings=emb)
    first = asyncio.create_task(store.aadd_document("doc", paragraphs("first")))
    await entered(emb, "first")
    later = asyncio.create_task(
        store.aadd_document("doc", paragraphs("second")) if call == "aadd_document" else store.aremove_document("doc")
    )
    await asyncio.sleep(0)
    assert store._order.pending("doc") == 2
    await cancel(later)
    emb.open()
    assert (await first).version == 1
    assert texts(store.snapshot().documents("doc")) == ["first"] and store.version == 1
    await healthy(store, tmp_path)


async def test_a_writer_cancelled_while_its_owed_merge_is_queued_leaves_merging_possible(tmp_path: Path) -> None:
    """The defect: the writer marked segments busy for a merge job that never ran, so no merge could ever
    pick them again (``wait_for_compaction`` False, ``compact()`` blocked)."""
    emb = GatedEmbeddings("first", "second")
    store = make(embeddings=emb, embed_workers=1, compaction="background", max_segments=2, merge_factor=8)
    store.add_texts(["a"])
    store.add_texts(["b"])
    w1 = asyncio.create_task(store.aadd_document("one", paragraphs("first")))
    w2 = asyncio.create_task(store.aadd_document("two", paragraphs("second")))
    await entered(emb, "first")
    emb.open("first")
    await entered(emb, "second")  # the only pool thread embeds w2, so w1's merge job queues behind it
    while store.version < 3:  # w1 publishes (3 segments > max_segments 2) and queues the merge it owes
        await asyncio.sleep(0)
    assert store._pub._busy
    await cancel(w1)
    emb.open("second")
    await w2
    await healthy(store, tmp_path, source="one")
    assert len(store.snapshot().segments) <= 2


async def test_a_writer_cancelled_while_its_owed_merge_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    merges = GatedMerges(monkeypatch)
    store = make(compaction="background", max_segments=2, merge_factor=8)
    store._pub._compaction = "off"
    store.add_texts(["a"])
    store.add_texts(["b"])
    store._pub._compaction = "background"
    writer = asyncio.create_task(store.aadd_texts(["c"]))
    await merges.gates.reached("merge")
    await cancel(writer)
    merges.gates.open()
    assert store.version == 3 and len(store) == 3  # the write was published before the merge began
    await healthy(store, tmp_path)


async def test_cancelling_a_compaction_or_a_save_leaves_the_store_able_to_merge_and_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merges = GatedMerges(monkeypatch)
    store = make()
    for n in range(3):
        await store.aadd_document(f"s{n}", paragraphs(f"w{n}"))
    compacting = asyncio.create_task(store.acompact())
    await merges.gates.reached("merge")
    await cancel(compacting)
    merges.gates.open()  # the merge itself runs to its end in its thread
    saving = asyncio.create_task(store.asave(tmp_path))
    await asyncio.sleep(0)
    await cancel(saving)
    await healthy(store, tmp_path)


# ---------------------------------------------------------------------- loop-thread work stays linear


def loop_thread_lines(n: int) -> int:
    """Python lines executed on the event loop's thread while ``aadd_sources`` indexes ``n`` documents
    (the write pool's threads are not traced)."""
    store = make(chunk_size=200)
    docs = {f"d{i}": f"text {i}" for i in range(n)}
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        count += 1
        return trace

    async def main() -> None:
        sys.settrace(trace)
        try:
            records = await store.aadd_sources(docs)
        finally:
            sys.settrace(None)
        assert len(records) == n and records[-1].source == f"d{n - 1}"

    asyncio.run(main())
    store.close()
    return count


def test_the_loop_thread_work_of_a_batch_grows_linearly_with_its_size() -> None:
    """The defect: building each ``DocumentRecord`` scanned every row of the batch, on the loop
    (quadratic: a 4,000-document batch stalled the loop for 1.9 s). Counting executed lines instead of
    timing them makes the test deterministic; ``benchmarks/bench_vectorstore.py`` measures the stall."""
    small, large = loop_thread_lines(200), loop_thread_lines(800)
    assert large <= 6 * small, f"4x the documents cost {large / small:.1f}x the loop-thread work"


# ---------------------------------------------------------------------- the write order itself


def test_tickets_over_several_keys_keep_one_order_and_never_deadlock() -> None:
    order = WriteOrder()
    ab, b, gone, a, ba = (order.take(k) for k in (["a", "b"], ["b"], ["a"], ["a"], ["b", "a", "b"]))
    assert [t.turn for t in (ab, b, gone, a, ba)] == [True, False, False, False, False] and ba.keys == ("b", "a")
    done: list[str] = []

    def write(ticket: Any, name: str) -> None:
        order.wait(ticket)
        done.append(name)
        order.finish(ticket)

    threads = [threading.Thread(target=write, args=(t, n)) for t, n in ((ba, "ba"), (a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    order.finish(gone)  # a ticket that is not at the head leaves (a cancelled write): nobody is woken
    assert not a.turn and not ba.turn and not b.turn
    order.finish(ab)
    for t in threads:
        t.join(GATE_TIMEOUT)
    assert done[-1] == "ba" and sorted(done) == ["a", "b", "ba"] and not order.busy()
    order.finish(ab)  # idempotent
    assert repr(ab).endswith("finished>")


def test_a_waiter_whose_event_loop_closed_passes_its_turn_on() -> None:
    order = WriteOrder()
    first = order.take(["k"])
    stranded = order.take(["k"])
    last = order.take(["k"])
    loop = asyncio.new_event_loop()
    waiting = loop.create_task(order.wait_async(stranded))
    loop.run_until_complete(asyncio.sleep(0))  # it waits for its turn on this loop ...
    loop.close()  # ... which is closed without ever resuming it
    order.finish(first)
    assert stranded.finished and last.turn  # nobody is left to publish for it: the turn passes on
    assert not waiting.done()


async def test_sync_writers_wait_for_their_turn_behind_async_ones() -> None:
    emb = GatedEmbeddings("loop")
    store = make(embeddings=emb)
    on_loop = asyncio.create_task(store.aadd_document("doc", paragraphs("loop")))
    await entered(emb, "loop")
    in_thread = asyncio.create_task(asyncio.to_thread(store.add_document, "doc", paragraphs("thread")))
    while store._order.pending("doc") < 2:  # the thread took its ticket
        await asyncio.sleep(0)
    emb.open()
    assert (await on_loop).version == 1
    assert (await in_thread).version == 2
    assert texts(store.snapshot().documents("doc")) == ["thread"]
