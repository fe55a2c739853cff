"""CowVectorStore's lifecycle: close / aclose / context managers, writes in flight at close, no thread
left behind, copies and pickling."""

from __future__ import annotations

import asyncio
import copy
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

from chatkit import CowVectorStore, HashEmbeddings

from ._store_helpers import GATE_TIMEOUT, Gates, GatedEmbeddings, entered, make, paragraphs, texts


def threads_of(before: set[threading.Thread]) -> list[str]:
    return sorted(t.name for t in set(threading.enumerate()) - before if t.is_alive())


def test_no_thread_survives_a_closed_store(monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(threading.enumerate())
    store = make(compaction="background", merge_factor=2, max_segments=3, embed_workers=3, search_workers=3)
    workers = [
        threading.Thread(target=store.add_document, args=(f"s{i}", paragraphs(f"w{i}")), name=f"writer-{i}")
        for i in range(6)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(GATE_TIMEOUT)

    async def read() -> None:
        await asyncio.gather(*(store.asimilarity_search("w", k=3) for _ in range(6)))
        await store.aadd_texts(["async text"])

    asyncio.run(read())
    assert any(name.startswith("chatkit-") for name in threads_of(before))  # it did start threads
    store.close()
    assert threads_of(before) == []
    assert store.closed and len(store) == 7


def test_a_closed_store_refuses_writes_and_still_serves_reads(tmp_path: Path) -> None:
    store = make()
    store.add_document("a", paragraphs("one", "two"))
    store.add_texts(["loose"], ids=["t"])
    snap = store.snapshot()
    store.close()
    store.close()  # idempotent
    for write, name in (
        (lambda: store.add_document("a", "x"), "add_document()"),
        (lambda: store.add_sources({"b": "x"}), "add_sources()"),
        (lambda: store.remove_document("a"), "remove_document()"),
        (lambda: store.add_texts(["x"]), "add_texts()"),
        (lambda: store.add_documents([]), "add_texts()"),
        (lambda: store.delete(["t"]), "delete()"),
        (lambda: store.compact(), "compact()"),
    ):
        with pytest.raises(RuntimeError, match=rf"the CowVectorStore is closed: {name.replace('(', '[(]').replace(')', '[)]')} was refused"):
            write()
    assert store.snapshot() is snap and store.version == 2
    assert sorted(texts(store.similarity_search("one", k=5))) == ["loose", "one", "two"]
    assert store.get_by_ids(["t"])[0].page_content == "loose"
    assert store.wait_for_compaction(0.001)
    assert "closed" in repr(store)

    async def reads() -> None:
        assert len(await store.asimilarity_search("one", k=5)) == 3
        assert len(await snap.asimilarity_search("one", k=5)) == 3
        assert len(await store.as_retriever(search_kwargs={"k": 2}).ainvoke("one")) == 2
        with pytest.raises(RuntimeError, match="closed"):
            await store.aadd_document("a", "x")
        with pytest.raises(RuntimeError, match="closed"):
            await store.aremove_document("a")
        with pytest.raises(RuntimeError, match="closed"):
            await store.aadd_texts(["x"])

    asyncio.run(reads())
    store.save(tmp_path)  # saving is reading
    assert CowVectorStore.load(tmp_path, HashEmbeddings(dim=32)).version == 2


def test_with_calls_close_and_async_with_calls_aclose() -> None:
    with make() as store:
        store.add_texts(["x"])
    assert store.closed

    async def main() -> CowVectorStore:
        async with make() as s:
            await s.aadd_texts(["x"])
        return s

    assert asyncio.run(main()).closed


async def test_writes_in_flight_at_close_fail_cleanly_and_publish_nothing() -> None:
    emb = GatedEmbeddings("running", "queued")
    store = make(embeddings=emb, embed_workers=1)
    running = asyncio.create_task(store.aadd_document("doc", paragraphs("running")))
    await entered(emb, "running")
    queued = asyncio.create_task(store.aadd_document("doc", paragraphs("queued")))
    waiting = asyncio.create_task(store.aremove_document("doc"))
    await asyncio.sleep(0)
    assert store._order.pending("doc") == 3
    closing = asyncio.create_task(store.aclose())
    while not store.closed:  # close() first refuses new work, then waits for the running embedding
        await asyncio.sleep(0)
    emb.open("running")
    await closing
    for task in (running, queued, waiting):
        with pytest.raises(RuntimeError, match="closed"):
            await task
    assert not emb.entered["queued"].is_set()  # dropped before it ran
    assert store.version == 0 and not store._order.busy()


def test_close_waits_for_a_running_background_merge_and_starts_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatkit.store.publisher as pub

    gates = Gates("merge")
    real = pub.merge_segments
    order: list[str] = []

    def gated(segments: Any, lives: Any) -> Any:
        gates.pass_("merge")
        out = real(segments, lives)
        order.append("merged")
        return out

    monkeypatch.setattr(pub, "merge_segments", gated)
    before = set(threading.enumerate())
    store = make(compaction="background", merge_factor=2)
    store.add_texts(["a"])
    store.add_texts(["b"])  # two segments of one tier: the background compactor starts merging
    assert gates.entered["merge"].wait(GATE_TIMEOUT)

    closing = threading.Event()
    close_publisher = store._pub.close

    def close_publisher_seen(*args: Any, **kwargs: Any) -> Any:
        closing.set()
        return close_publisher(*args, **kwargs)

    monkeypatch.setattr(store._pub, "close", close_publisher_seen)

    def close() -> None:
        store.close()
        order.append("closed")

    closer = threading.Thread(target=close)
    closer.start()
    assert closing.wait(GATE_TIMEOUT)  # close() has begun (a close that did not wait would return about now)
    gates.open()
    closer.join(GATE_TIMEOUT)
    assert order == ["merged", "closed"] and threads_of(before) == []
    # the merge finished after close() began: a closed store keeps its last snapshot, so it was not swapped in
    assert len(store.snapshot().segments) == 2 and len(store) == 2


def test_close_calls_the_directory_release_hook_once() -> None:
    calls: list[str] = []

    class Attached(CowVectorStore):
        def _release_directory(self) -> None:
            calls.append("released")

    store = Attached(HashEmbeddings(dim=8))
    store.close()
    store.close()
    assert calls == ["released"]


def test_a_deep_copy_is_an_independent_store_sharing_immutable_segments() -> None:
    store = make(compaction="inline", merge_factor=3)
    store.add_document("a", paragraphs("one"))
    store.add_texts(["loose"], ids=["t"])
    twin = copy.deepcopy(store)
    shallow = copy.copy(store)
    for other in (twin, shallow):
        assert isinstance(other, CowVectorStore) and other is not store
        assert other.version == store.version and other.sources() == ["a"]
        assert [s.index for s in other.snapshot().segments] == [s.index for s in store.snapshot().segments]
        assert other.embeddings is store.embeddings and other._options == store._options
    twin.add_document("a", paragraphs("changed"))
    twin.delete(["t"])
    assert texts(store.snapshot().documents("a")) == ["one"] and store.get_by_ids(["t"]) != []
    assert texts(twin.snapshot().documents("a")) == ["changed"] and store.version == 2 and twin.version == 4
    store.close()
    assert not twin.closed
    twin.add_texts(["still open"])
    twin.close()
    shallow.close()
    with pytest.raises(TypeError, match="cannot be pickled.*save\\(\\) and load\\(\\)"):
        pickle.dumps(store)
