"""CowVectorStore: the document API (sync and async), the LangChain API, write ordering, off-loop
embedding, compaction, add-time validation."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

import chatkit
from chatkit import CowVectorStore, HashEmbeddings, StoreSnapshot, Timeline
from chatkit.store import CompactionResult, StoreStatistics
from chatkit.store.ordering import WriteOrder

from ._store_helpers import GATE_TIMEOUT, GatedEmbeddings, entered, make, paragraphs, texts

class FixedEmbeddings(Embeddings):
    """Each text's vector is given by the test."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.table[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.table[text]


# ---------------------------------------------------------------------- the document API


def test_add_document_publishes_all_chunks_with_stamped_metadata() -> None:
    store = make()
    record = store.add_document("pets.md", paragraphs("cats", "dogs", "fish"), metadata={"lang": "en"})
    assert isinstance(record, chatkit.DocumentRecord)
    assert (record.source, record.chunks, record.version, record.replaced) == ("pets.md", 3, 1, 0)
    docs = store.similarity_search("cats", k=10)
    assert texts(docs)[0] == "cats"
    assert sorted(d.metadata["chunk"] for d in docs) == [0, 1, 2]
    assert all(d.metadata == {"lang": "en", "source": "pets.md", "chunk": d.metadata["chunk"], "version": 1} for d in docs)
    assert {d.id for d in docs} == set(record.ids)
    assert store.sources() == ["pets.md"] and store.version == 1 and len(store) == 3
    with pytest.raises(AttributeError):
        record.version = 2  # type: ignore[misc]


@pytest.mark.parametrize("form", ["sync", "async"])
async def test_replacing_a_source_swaps_every_chunk_in_one_version(form: str) -> None:
    store = make()
    if form == "sync":  # the sync form from a plain thread: no event loop there
        await asyncio.to_thread(store.add_document, "a", paragraphs("old1", "old2", "old3"))
        record = await asyncio.to_thread(store.add_document, "a", paragraphs("new1", "new2"))
    else:
        await store.aadd_document("a", paragraphs("old1", "old2", "old3"))
        record = await store.aadd_document("a", paragraphs("new1", "new2"))
    assert (record.version, record.chunks, record.replaced) == (2, 2, 3)
    assert sorted(texts(store.similarity_search("x", k=10))) == ["new1", "new2"]
    assert {d.metadata["version"] for d in store.similarity_search("x", k=10)} == {2}


async def test_remove_document_reports_whether_it_existed_and_bumps_version_only_then() -> None:
    store = make()
    await store.aadd_document("a", paragraphs("one"))
    await store.aadd_document("b", paragraphs("two"))
    assert await store.aremove_document("a") is True
    assert store.version == 3 and store.sources() == ["b"]
    assert await store.aremove_document("a") is False
    assert await asyncio.to_thread(store.remove_document, "never") is False
    assert store.version == 3
    assert await asyncio.to_thread(store.remove_document, "b") is True
    assert store.version == 4 and store.sources() == []


async def test_add_sources_publishes_several_sources_in_one_step() -> None:
    store = make()
    await store.aadd_document("a", paragraphs("old"))
    records = await store.aadd_sources({"a": paragraphs("a1", "a2"), "b": paragraphs("b1")}, metadata={"b": {"k": 1}})
    assert [(r.source, r.chunks, r.version) for r in records] == [("a", 2, 2), ("b", 1, 2)]
    assert records[0].replaced == 1
    assert store.version == 2 and store.sources() == ["a", "b"]
    assert [d.metadata for d in store.snapshot().documents("b")] == [{"k": 1, "source": "b", "chunk": 0, "version": 2}]
    assert await store.aadd_sources({}) == ()
    records = await asyncio.to_thread(store.add_sources, {"c": paragraphs("c1"), "b": paragraphs("b2")})
    assert [(r.source, r.version, r.replaced) for r in records] == [("c", 3, 0), ("b", 3, 1)]
    assert await asyncio.to_thread(store.add_sources, {}) == () and store.version == 3
    with pytest.raises(ValueError, match="not being added"):
        await store.aadd_sources({"a": "x"}, metadata={"zz": {}})
    with pytest.raises(TypeError, match="map sources to contents"):
        await store.aadd_sources([("a", "x")])  # type: ignore[arg-type]


async def test_snapshot_is_pinned_whatever_is_published_later() -> None:
    store = make(compaction="inline", merge_factor=2)
    await store.aadd_document("a", paragraphs("a1", "a2"))
    ids = store.add_texts(["loose text"], ids=["t1"])
    snap = store.snapshot()
    before = [(d.id, d.page_content, d.metadata) for d in snap.similarity_search("a1", k=10)]
    await store.aadd_document("a", paragraphs("a3"))
    await store.aadd_document("b", paragraphs("b1"))
    store.delete(ids)
    await store.aremove_document("a")
    store.compact()
    assert isinstance(snap, StoreSnapshot) and snap.version == 2 and store.version == 6
    assert [(d.id, d.page_content, d.metadata) for d in snap.similarity_search("a1", k=10)] == before
    assert [d.id for d in snap.get_by_ids(["t1"])] == ["t1"] and store.get_by_ids(["t1"]) == []
    assert snap.sources() == ["a"] and store.sources() == ["b"]


@pytest.mark.parametrize(
    ("source", "content", "metadata", "error", "fragment"),
    [
        (1, "text", None, TypeError, "source must be a str"),
        ("", "text", None, ValueError, "non-empty"),
        ("   ", "text", None, ValueError, "non-empty"),
        ("a", b"bytes", None, TypeError, "must be a str"),
        ("a", "", None, ValueError, "empty or whitespace"),
        ("a", " \n\t ", None, ValueError, "empty or whitespace"),
        ("a", "text", ["not", "a", "dict"], TypeError, "metadata"),
        ("a", "text", {1: "x"}, TypeError, "keys must be str"),
        ("a", "text", {"version": 3}, ValueError, "set by the store"),
        ("a", "text", {"chunk": 0}, ValueError, "set by the store"),
        ("a", "text", {"source": "b"}, ValueError, "metadata says source"),
    ],
)
async def test_bad_document_input_is_rejected_and_nothing_is_published(
    source: Any, content: Any, metadata: Any, error: type[Exception], fragment: str
) -> None:
    store = make()
    await store.aadd_document("keep", paragraphs("kept"))
    with pytest.raises(error, match=fragment):
        await store.aadd_document(source, content, metadata)
    with pytest.raises(error, match=fragment):
        await store.aadd_sources({source: content}, metadata={source: metadata} if metadata is not None else None)
    with pytest.raises(error, match=fragment):
        await asyncio.to_thread(store.add_document, source, content, metadata)
    assert store.version == 1 and store.sources() == ["keep"] and len(store) == 1
    assert not store._order.busy()


async def test_matching_source_metadata_is_accepted() -> None:
    store = make()
    record = await store.aadd_document("a.md", "text", {"source": "a.md"})
    assert record.chunks == 1


async def test_bad_search_arguments_are_rejected() -> None:
    store = make()
    await store.aadd_document("a", paragraphs("one"))
    for k, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="k must"):
            store.similarity_search("one", k=k)
    with pytest.raises(TypeError, match="query must be a str"):
        store.similarity_search(b"one")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 dimensions but the store holds 32-d"):
        store.similarity_search_by_vector([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        store.similarity_search_by_vector([float("nan")] * 32)
    with pytest.raises(ValueError, match="fetch_k must"):
        store.max_marginal_relevance_search("one", k=1, fetch_k=0)
    with pytest.raises(ValueError, match="lambda_mult"):
        store.max_marginal_relevance_search("one", lambda_mult=1.5)
    with pytest.raises(TypeError, match="filter"):
        store.similarity_search("one", filter=42)
    with pytest.raises(ValueError, match="must be at least 1"):
        await store.asimilarity_search("one", k=0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"chunk_size": 0}, ValueError),
        ({"chunk_size": 10, "chunk_overlap": 10}, ValueError),
        ({"chunk_overlap": -1}, ValueError),
        ({"compaction": "sometimes"}, ValueError),
        ({"merge_factor": 1}, ValueError),
        ({"max_segments": 1}, ValueError),
        ({"embed_batch_size": "8"}, TypeError),
        ({"embeddings": "not a model"}, TypeError),
    ],
)
def test_bad_options_are_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        make(**kwargs)


class WrongDimension(HashEmbeddings):
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [v[:16] for v in super().embed_documents(texts)] if "short" in texts[0] else super().embed_documents(texts)


class Broken(HashEmbeddings):
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        raise RuntimeError("model crashed")


async def test_vectors_of_the_wrong_dimension_or_a_failing_model_publish_nothing() -> None:
    store = make(embeddings=WrongDimension(dim=32))
    await store.aadd_document("a", paragraphs("fine"))
    with pytest.raises(ValueError, match="16-d vectors but the store holds 32-d"):
        await store.aadd_document("a", paragraphs("short"))
    with pytest.raises(ValueError, match="16-d"):
        store.add_texts(["short text"])
    assert store.version == 1 and texts(store.similarity_search("fine")) == ["fine"]
    broken = make(embeddings=Broken(dim=32))
    with pytest.raises(RuntimeError, match="model crashed"):
        await broken.aadd_document("a", "text")
    assert broken.version == 0 and not broken._order.busy()


# ---------------------------------------------------------------------- search semantics


async def test_relevance_scores_are_in_unit_interval_and_thresholds_work() -> None:
    table = {"q": [1.0, 0.0], "same": [2.0, 0.0], "orth": [0.0, 1.0], "opposite": [-1.0, 0.0], "mid": [1.0, 1.0]}
    store = make(embeddings=FixedEmbeddings(table))
    store.add_texts(["same", "orth", "opposite", "mid"], ids=["s", "o", "x", "m"])
    scored = store.similarity_search_with_score("q", k=4)
    assert [d.id for d, _ in scored] == ["s", "m", "o", "x"]
    assert [round(s, 4) for _, s in scored] == [1.0, 0.7071, 0.0, -1.0]
    rel = store.similarity_search_with_relevance_scores("q", k=4)
    assert [round(s, 4) for _, s in rel] == [1.0, 0.7071, 0.0, 0.0]
    assert all(0.0 <= s <= 1.0 for _, s in rel)
    assert [d.id for d, _ in store.similarity_search_with_relevance_scores("q", k=4, score_threshold=0.5)] == ["s", "m"]
    assert [d.id for d, _ in await store.asimilarity_search_with_relevance_scores("q", k=4, score_threshold=0.5)] == ["s", "m"]
    assert [d.id for d in store.similarity_search_by_vector([0.0, 3.0], k=1)] == ["o"]
    assert [d.id for d in await store.asimilarity_search_by_vector([0.0, 3.0], k=1)] == ["o"]


async def test_mmr_trades_relevance_for_diversity() -> None:
    table = {"q": [1.0, 0.0, 0.0], "a": [1.0, 0.05, 0.0], "a2": [1.0, 0.06, 0.0], "b": [0.7, 0.0, 0.7]}
    store = make(embeddings=FixedEmbeddings(table))
    store.add_texts(["a", "a2", "b"], ids=["a", "a2", "b"])
    assert [d.id for d in store.similarity_search("q", k=2)] == ["a", "a2"]
    assert [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=3, lambda_mult=0.3)] == ["a", "b"]
    assert [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=3, lambda_mult=1.0)] == ["a", "a2"]
    assert [d.id for d in await store.amax_marginal_relevance_search("q", k=2, fetch_k=3, lambda_mult=0.3)] == ["a", "b"]
    by_vec = await store.amax_marginal_relevance_search_by_vector([1.0, 0.0, 0.0], k=2, fetch_k=3, lambda_mult=0.3)
    assert [d.id for d in by_vec] == ["a", "b"]
    assert make().max_marginal_relevance_search("q") == []


async def test_filters_by_metadata_dict_or_callable() -> None:
    store = make()
    await store.aadd_document("a", paragraphs("apple", "apricot"), {"fruit": True})
    await store.aadd_document("b", paragraphs("apple", "brick"), {"fruit": False})
    got = store.similarity_search("apple", k=5, filter={"fruit": True})
    assert {d.metadata["source"] for d in got} == {"a"} and len(got) == 2
    got = store.similarity_search("apple", k=1, filter=lambda md: md["source"] == "b" and md["chunk"] == 1)
    assert texts(got) == ["brick"]
    assert store.similarity_search("apple", filter={"fruit": "maybe"}) == []


async def test_empty_store_answers_empty_lists() -> None:
    store = make()
    assert store.similarity_search("x") == [] and await store.asimilarity_search("x") == []
    assert store.similarity_search_by_vector([0.5] * 7) == []  # dimension unknown until the first add
    assert store.get_by_ids(["nope"]) == [] and store.sources() == [] and len(store) == 0
    assert store.delete() is False and store.version == 0  # nothing was there to delete


# ---------------------------------------------------------------------- the LangChain write API


async def test_add_texts_stores_documents_as_given_and_isolated_from_the_caller() -> None:
    store = make()
    metadata = {"nested": {"n": 1}}
    ids = store.add_texts(["alpha", "beta"], [metadata, {}], ids=["x", None])
    assert ids[0] == "x" and isinstance(ids[1], str) and len(ids[1]) == 32
    metadata["nested"]["n"] = 99  # the caller's dict changes: the store's copy does not
    (got,) = store.get_by_ids(["x"])
    assert got == Document(id="x", page_content="alpha", metadata={"nested": {"n": 1}})
    got.metadata["nested"]["n"] = 7  # nor does a result the caller mutates
    assert store.get_by_ids(["x"])[0].metadata == {"nested": {"n": 1}}
    store.add_texts(["alpha two"], ids=["x"])  # same id: replaced
    assert [d.page_content for d in store.get_by_ids(["x", "x", "missing"])] == ["alpha two"]
    assert store.sources() == [] and len(store) == 2
    with pytest.raises(ValueError, match="appears twice"):
        store.add_texts(["a", "b"], ids=["d", "d"])
    with pytest.raises(ValueError, match="metadatas"):
        store.add_texts(["a", "b"], [{}])
    with pytest.raises(TypeError, match="ids must be str"):
        store.add_texts(["a"], ids=[3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not one str"):
        store.add_texts("abc")
    with pytest.raises(TypeError, match="ids must be a list"):
        store.delete("x")  # type: ignore[arg-type]
    assert store.add_texts([]) == [] and store.version == 2


async def test_delete_and_async_forms() -> None:
    store = make()
    ids = await store.aadd_texts(["one", "two", "three"], ids=["1", "2", "3"])
    assert ids == ["1", "2", "3"]
    assert await store.adelete(["1", "missing"]) is True  # some existed: deleted
    assert await store.adelete(["1", "missing"]) is False and store.version == 2  # none existed: nothing published
    assert store.delete([]) is False
    assert sorted(d.id for d in await store.aget_by_ids(["1", "2", "3"])) == ["2", "3"]  # type: ignore[type-var]
    assert await store.aadd_documents([Document(page_content="four", id="4")]) == ["4"]
    assert [d.id for d in await store.asimilarity_search("four", k=1)] == ["4"]
    assert [d.id for d, _ in await store.asimilarity_search_with_score("four", k=1)] == ["4"]
    store.delete()
    assert len(store) == 0 and store.snapshot().segments == ()


async def test_from_texts_and_retrievers() -> None:
    store = CowVectorStore.from_texts(
        ["cats purr", "dogs bark", "fish swim"], HashEmbeddings(dim=32), [{"n": 1}, {"n": 2}, {"n": 3}], chunk_size=100
    )
    assert isinstance(store, CowVectorStore) and len(store) == 3
    assert store.as_retriever(search_kwargs={"k": 1}).invoke("dogs")[0].page_content == "dogs bark"
    assert (await store.as_retriever(search_kwargs={"k": 1}).ainvoke("fish"))[0].metadata == {"n": 3}
    mmr = store.as_retriever(search_type="mmr", search_kwargs={"k": 2, "fetch_k": 3})
    assert len(mmr.invoke("cats")) == 2
    thresholded = store.as_retriever(search_type="similarity_score_threshold", search_kwargs={"score_threshold": 0.9})
    assert [d.page_content for d in thresholded.invoke("cats purr")] == ["cats purr"]
    other = await CowVectorStore.afrom_texts(["x y"], HashEmbeddings(dim=32), ids=["only"])
    assert [d.id for d in other.get_by_ids(["only"])] == ["only"]


def test_writes_from_many_threads_each_publish_atomically() -> None:
    store = make()
    barrier = threading.Barrier(4)

    def write(n: int) -> None:
        barrier.wait(GATE_TIMEOUT)
        store.add_texts([f"t{n} a", f"t{n} b"], ids=[f"{n}a", f"{n}b"])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.version == 4 and len(store) == 8
    assert sorted(len(seg.ids) for seg in store.snapshot().segments) == [2, 2, 2, 2]


# ---------------------------------------------------------------------- ordering, off-loop embedding, cancellation


class SpyOrder(WriteOrder):
    """The store's write order, telling the test when a write starts waiting for its turn."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []
        self.changed = asyncio.Event()

    async def wait_async(self, ticket: Any) -> None:
        if not ticket.turn:
            self.waiting.append(ticket.keys)
            self.changed.set()
        await super().wait_async(ticket)


async def test_same_source_writes_publish_in_call_order_even_if_the_first_embeds_last() -> None:
    emb = GatedEmbeddings("first")
    store = make(embeddings=emb)
    store._order = spy = SpyOrder()
    w1 = asyncio.create_task(store.aadd_document("doc", paragraphs("first")))
    w2 = asyncio.create_task(store.aadd_document("doc", paragraphs("second")))
    await entered(emb, "first")  # the first call is stuck embedding
    await spy.changed.wait()  # the second has embedded and waits for its turn, holding nothing
    assert spy.waiting == [("doc",)] and store.version == 0 and not w2.done()
    assert store._order.pending("doc") == 2
    emb.gates["first"].set()
    r1, r2 = await asyncio.gather(w1, w2)
    assert (r1.version, r2.version) == (1, 2) and r2.replaced == 1
    assert texts(store.similarity_search("x", k=5)) == ["second"]
    assert not store._order.busy()


async def test_sync_and_async_writers_to_one_source_publish_in_call_order() -> None:
    emb = GatedEmbeddings("thread")
    store = make(embeddings=emb)
    store._order = spy = SpyOrder()
    in_thread = asyncio.create_task(asyncio.to_thread(store.add_document, "doc", paragraphs("thread")))
    await entered(emb, "thread")  # the thread's write took its ticket first and is embedding
    on_loop = asyncio.create_task(store.aadd_document("doc", paragraphs("loop")))
    await spy.changed.wait()  # the async write embedded and waits for the thread's write
    assert store.version == 0
    emb.gates["thread"].set()
    first = await in_thread
    second = await on_loop
    assert (first.version, second.version) == (1, 2) and second.replaced == 1
    assert texts(store.similarity_search("x")) == ["loop"]


def test_sync_writes_refuse_to_block_a_thread_that_runs_an_event_loop() -> None:
    store = make()

    async def main() -> None:
        for call in (lambda: store.add_document("a", "x"), lambda: store.add_sources({"a": "x"}), lambda: store.remove_document("a")):
            with pytest.raises(RuntimeError, match=r"this thread runs an event loop: use `await store\.a"):
                call()

    asyncio.run(main())
    assert store.version == 0 and not store._order.busy()


async def test_embedding_runs_in_worker_threads_in_parallel_and_the_loop_stays_free() -> None:
    emb = GatedEmbeddings("left", "right")
    store = make(embeddings=emb)
    writes = [asyncio.create_task(store.aadd_document(s, paragraphs(s))) for s in ("left", "right")]
    await entered(emb, "left")
    await entered(emb, "right")  # two sources embedding at the same time
    ticks = 0
    for _ in range(5):  # the event loop keeps running other work meanwhile
        ticks += 1
        await asyncio.sleep(0)
    assert ticks == 5 and store.version == 0
    assert store.similarity_search("left") == []  # readers are not blocked either
    main = threading.current_thread().name
    assert emb.threads["left"] != main and emb.threads["right"] != main
    emb.gates["left"].set()
    emb.gates["right"].set()
    await asyncio.gather(*writes)
    assert store.sources() == ["left", "right"] and store.version == 2


async def test_a_cancelled_write_publishes_nothing_and_frees_its_source() -> None:
    emb = GatedEmbeddings("slow")
    store = make(embeddings=emb)
    write = asyncio.create_task(store.aadd_document("doc", paragraphs("slow")))
    await entered(emb, "slow")
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    emb.gates["slow"].set()  # the worker finishes; its result is dropped
    record = await store.aadd_document("doc", paragraphs("fast"))
    assert record.version == 1 and texts(store.similarity_search("x")) == ["fast"]
    assert not store._order.busy()


async def test_timeline_records_embed_publish_search_and_lock_spans() -> None:
    tl = Timeline()
    store = make(timeline=tl)
    await store.aadd_document("a", paragraphs("one"))
    await store.asimilarity_search("one")
    store.similarity_search("one")
    await store.aremove_document("a")
    rows = [(r.phase, r.key) for r in tl.rows()]
    assert ("embed", "a") in rows and ("publish", "a") in rows
    assert rows.count(("search", None)) == 2
    assert ("wait", "a") in rows and ("hold", "a") in rows
    assert rows.count(("publish", "a")) == 2
    task = asyncio.current_task()
    assert task is not None
    assert {r.who for r in tl.rows() if r.phase in ("embed", "publish", "search")} == {task.get_name()}
    assert all(r.outcome == "ok" for r in tl.rows())


# ---------------------------------------------------------------------- segments and compaction


async def test_a_write_shares_every_existing_segment_and_only_adds_one() -> None:
    store = make()
    for n in range(5):
        await store.aadd_document(f"s{n}", paragraphs(f"w{n}"))
    before = store.snapshot()
    await store.aadd_document("s0", paragraphs("again"))
    after = store.snapshot()
    # no clone, no remove_ids: the old faiss indexes are the very same objects, one new segment appears
    assert [s.index for s in after.segments[:-1]] == [s.index for s in before.segments[1:]]
    assert len(after.segments) == 5  # s0's only segment died entirely and was dropped
    assert after.segments[-1].n == 1


async def test_compact_merges_segments_and_keeps_the_version_and_the_results() -> None:
    store = make()
    for n in range(6):
        await store.aadd_document(f"s{n}", paragraphs(f"w{n}a", f"w{n}b"))
    store.add_texts(["kept"], ids=["K"])
    await store.aadd_document("s0", paragraphs("w0c"))  # s0's first segment dies entirely and is dropped
    snap = store.snapshot()

    def everything() -> list[Any]:
        return sorted(((d.id, d.page_content, d.metadata) for d in store.similarity_search("w", k=100)), key=str)

    before = everything()
    stats = store.statistics()
    assert isinstance(stats, StoreStatistics) and (stats.segments, stats.dead_rows, stats.chunks) == (7, 0, 12)
    assert store.compact() == CompactionResult(merged_segments=7, dropped_rows=0, segments=1)
    assert store.version == snap.version and len(snap.segments) == 7
    assert everything() == before
    assert store.compact() == CompactionResult(0, 0, 1)
    assert await store.acompact() == CompactionResult(0, 0, 1)


async def test_compact_drops_tombstoned_rows() -> None:
    store = make()
    await store.aadd_sources({f"s{n}": paragraphs(f"w{n}a", f"w{n}b") for n in range(4)})
    await store.aremove_document("s1")
    assert store.statistics().dead_rows == 2
    result = store.compact()
    assert result.dropped_rows == 2 and store.statistics().dead_rows == 0 and len(store) == 6


@pytest.mark.parametrize("mode", ["inline", "background"])
async def test_automatic_compaction_keeps_the_segment_count_bounded(mode: str) -> None:
    store = make(compaction=mode, merge_factor=2, max_segments=4)
    seen = []
    for n in range(40):
        await store.aadd_document(f"s{n % 7}", paragraphs(f"w{n}"))
        seen.append(len(store.snapshot().segments))
    assert store.wait_for_compaction(timeout=GATE_TIMEOUT)
    assert max(seen) <= 4 + 1
    assert len(store.snapshot().segments) <= 2
    assert store.sources() == [f"s{n}" for n in range(7)] and len(store) == 7


async def test_rows_deleted_during_a_merge_stay_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatkit.store.publisher as pub

    store = make()
    store.add_texts(["a", "b"], ids=["a", "b"])
    store.add_texts(["c", "d"], ids=["c", "d"])
    real_merge = pub.merge_segments

    def merge_while_a_writer_deletes(segments: Any, lives: Any) -> Any:
        out = real_merge(segments, lives)
        store.delete(["b", "c"])  # published after the merge read its base, before the swap
        return out

    monkeypatch.setattr(pub, "merge_segments", merge_while_a_writer_deletes)
    store.compact()
    assert sorted(d.id for d in store.similarity_search("a", k=10)) == ["a", "d"]  # type: ignore[type-var]
    assert store.version == 3 and len(store.snapshot().segments) == 1
    monkeypatch.setattr(pub, "merge_segments", real_merge)
    assert store.compact().dropped_rows == 2 and len(store) == 2


def test_background_merge_failure_leaves_the_store_valid(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import chatkit.store.publisher as pub

    def explode(segments: Any, lives: Any) -> Any:
        raise MemoryError("no room")

    monkeypatch.setattr(pub, "merge_segments", explode)
    store = make(compaction="background", merge_factor=2)
    store.add_texts(["a"], ids=["a"])
    store.add_texts(["b"], ids=["b"])
    assert store.wait_for_compaction(timeout=GATE_TIMEOUT)
    assert "background compaction failed" in caplog.text
    assert sorted(d.id for d in store.similarity_search("a", k=5)) == ["a", "b"]  # type: ignore[type-var]
    assert len(store.snapshot().segments) == 2


# ---------------------------------------------------------------------- progress bar, repr, lazy model


async def test_progress_bar_for_many_chunks_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    many = paragraphs(*[f"w{n}" for n in range(130)])
    await make(progress=True).aadd_document("big", many)
    assert "embedding big" in capsys.readouterr().err
    await make(progress=False).aadd_document("big", many)
    await make(progress=True).aadd_document("small", paragraphs("a", "b"))
    assert capsys.readouterr().err == ""


async def test_repr_shows_live_state() -> None:
    store = make()
    assert repr(store).startswith("<CowVectorStore version=0 rows=0 segments=0 dead=0 dim=None")
    await store.aadd_document("a", paragraphs("x", "y"))
    assert "version=1 rows=2 segments=1" in repr(store) and "HashEmbeddings" in repr(store)
    assert repr(store.snapshot()) == "<StoreSnapshot version=1 rows=2 segments=1>"
    assert "not loaded" in repr(CowVectorStore())


def test_a_store_without_embeddings_loads_no_model_until_first_use() -> None:
    code = (
        "import sys, chatkit\n"
        "s = chatkit.CowVectorStore(); repr(s); s.similarity_search_by_vector([1.0], k=1); s.as_retriever()\n"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_vectors_are_normalised_on_the_way_in() -> None:
    store = make(embeddings=FixedEmbeddings({"a": [3.0, 4.0], "zero": [0.0, 0.0]}))
    store.add_texts(["a", "zero"], ids=["a", "zero"])
    seg = store.snapshot().segments[0]
    np.testing.assert_allclose(seg.vectors(), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


async def test_segments_that_die_or_vanish_during_a_merge_stay_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatkit.store.publisher as pub

    store = make()
    store.add_texts(["a"], ids=["a"])
    store.add_texts(["b"], ids=["b"])
    store.add_texts(["c"], ids=["c"])
    real_merge = pub.merge_segments
    during: list[Any] = []

    def merge_while_writers_act(segments: Any, lives: Any) -> Any:
        out = real_merge(segments, lives)
        during.pop(0)()
        return out

    monkeypatch.setattr(pub, "merge_segments", merge_while_writers_act)
    during.append(lambda: store.delete(["b"]))  # b's whole segment dies and is dropped mid-merge
    assert store.compact().segments == 1
    assert sorted(d.id for d in store.similarity_search("a", k=10)) == ["a", "c"]  # type: ignore[type-var]
    store.add_texts(["d"], ids=["d"])
    during.append(lambda: store.delete())  # everything is deleted mid-merge
    assert store.compact().segments == 0
    assert store.similarity_search("a", k=10) == [] and len(store) == 0 and bool(store)


# ---------------------------------------------------------------------- API conventions, add-time validation


def test_add_documents_takes_only_langchain_documents_and_names_add_sources_for_a_dict() -> None:
    store = make()
    with pytest.raises(TypeError, match=r"store\.add_sources\(\.\.\.\)"):
        store.add_documents({"a.md": "text"})  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(TypeError, match=r"await store\.aadd_sources\(\.\.\.\)"):
            await store.aadd_documents({"a.md": "text"})  # type: ignore[arg-type]

    asyncio.run(main())
    assert store.add_documents([Document("as given", metadata={"k": 1}, id="d")]) == ["d"]
    assert store.get_by_ids(["d"])[0].metadata == {"k": 1} and store.version == 1


def test_source_writes_work_from_plain_threads_without_any_event_loop() -> None:
    store = make()
    out: list[Any] = []
    threads = [
        threading.Thread(target=lambda n=n: out.append(store.add_document(f"s{n}", paragraphs(f"w{n}"))))
        for n in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GATE_TIMEOUT)
    assert sorted(r.version for r in out) == [1, 2, 3, 4] and store.sources() == ["s0", "s1", "s2", "s3"]
    assert store.add_sources({"s0": paragraphs("x"), "s9": paragraphs("y")})[0].replaced == 1
    assert store.remove_document("s1") is True and store.remove_document("s1") is False


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


BAD_METADATA = [
    ({"k": "bad \ud800"}, ValueError, r"metadata\['k'\] of .* lone surrogate '\\ud800' at position 4"),
    ({"k": ["ok", {"deep": "x\udfff"}]}, ValueError, r"metadata\['k'\]\[1\]\['deep'\] .* lone surrogate"),
    ({"k\udc80": 1}, ValueError, "lone surrogate"),
    ({"k": (1, 2)}, TypeError, r"metadata\['k'\] of .* is a tuple \(1, 2\): use a list"),
    ({"k": [1, (2,)]}, TypeError, r"metadata\['k'\]\[1\] .* is a tuple"),
    ({1: "x"}, TypeError, "keys must be str.*the int key 1"),
    ({"k": {None: "x"}}, TypeError, r"keys must be str: metadata\['k'\] .* NoneType key None"),
    ({"k": nested(33)}, ValueError, "nested more than 32"),
]


@pytest.mark.parametrize(("metadata", "error", "fragment"), BAD_METADATA)
async def test_what_a_save_cannot_round_trip_is_refused_when_added(metadata: Any, error: type[Exception], fragment: str) -> None:
    """The defect: such metadata was accepted, then changed silently on save/load (tuples, non-str keys)
    or made every later save raise (lone surrogates). Now every write path refuses it, naming the key."""
    store = make()
    store.add_texts(["kept"], ids=["kept"])
    with pytest.raises(error, match=fragment):
        store.add_texts(["text"], [metadata])
    with pytest.raises(error, match=fragment):
        await store.aadd_texts(["text"], [metadata])
    with pytest.raises(error, match=fragment):
        store.add_documents([Document("text", metadata=metadata)])
    with pytest.raises(error, match=fragment):
        await store.aadd_document("a.md", "text", metadata)
    with pytest.raises(error, match=fragment):
        await store.aadd_sources({"a.md": "text"}, metadata={"a.md": metadata})
    assert store.version == 1 and len(store) == 1 and not store._order.busy()


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.add_texts(["bad \ud800 text"]),
        lambda s: s.add_texts(["text"], ids=["id\udfff"]),
        lambda s: s.add_document("a.md", "bad \ud800 text"),
        lambda s: s.add_document("a\ud800.md", "text"),
        lambda s: s.add_sources({"a.md": "fine", "b.md": "bad \udbff"}),
    ],
    ids=["text", "id", "content", "source", "one of several"],
)
def test_lone_surrogates_in_texts_ids_or_sources_are_refused(write: Any, tmp_path: Any) -> None:
    store = make()
    store.add_texts(["kept"])
    with pytest.raises(ValueError, match="lone surrogate"):
        write(store)
    assert store.version == 1
    store.save(tmp_path)  # and saving still works
