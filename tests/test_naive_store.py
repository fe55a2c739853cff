"""NaiveVectorStore: the teaching baseline works as a store, and shows the race it is meant to show."""

from __future__ import annotations

import asyncio
import re

import pytest

from chatkit import CowVectorStore, HashEmbeddings, NaiveVectorStore


def make(**kwargs: object) -> NaiveVectorStore:
    return NaiveVectorStore(HashEmbeddings(dim=32), chunk_size=40, chunk_overlap=0, **kwargs)  # type: ignore[arg-type]


def paragraphs(*words: str) -> str:
    return "\n\n".join(f"{w} " + "z" * 25 for w in words)


async def test_it_is_a_working_store_when_nothing_runs_concurrently() -> None:
    store = make()
    record = await store.aadd_document("a", paragraphs("one", "two"), {"lang": "en"})
    assert (record.source, record.chunks, record.version, record.replaced) == ("a", 2, 1, 0)
    docs = store.similarity_search("one", k=5)
    assert docs[0].page_content.startswith("one")
    assert docs[0].metadata == {"lang": "en", "source": "a", "chunk": 0, "version": 1}
    record = await store.aadd_document("a", paragraphs("three"))
    assert (record.version, record.replaced) == (2, 2)
    assert [d.page_content.split()[0] for d in await store.asimilarity_search("x", k=5)] == ["three"]
    assert [round(s, 3) for _, s in await store.asimilarity_search_with_score("three", k=1)] == [0.707]
    assert store.sources() == ["a"] and len(store) == 1
    assert await store.aremove_document("a") is True and await store.aremove_document("a") is False
    assert store.similarity_search("x") == [] and store.sources() == []
    assert repr(store) == "<NaiveVectorStore version=4 rows=0 sources=0>"


async def test_a_concurrent_reader_sees_the_document_chunk_by_chunk() -> None:
    store = make()
    await store.aadd_document("a", paragraphs("old1", "old2"))
    seen: list[list[str]] = []

    async def reader() -> None:
        while not writer.done():
            seen.append(sorted(d.page_content.split()[0] for d in store.similarity_search("x", k=10)))
            await asyncio.sleep(0)

    writer = asyncio.create_task(store.aadd_document("a", paragraphs("new1", "new2")))
    await reader()
    # half of the old version, nothing, then half of the new one: every chunk is its own step
    assert seen == [["old1", "old2"], ["old2"], [], ["new1"], ["new1", "new2"]]


async def test_its_snapshot_is_the_live_store_not_a_pinned_version() -> None:
    store = make()
    await store.aadd_document("a", paragraphs("one"))
    snap = store.snapshot()
    await store.aadd_document("b", paragraphs("two"))
    assert snap.version == 2 and len(snap.similarity_search("x", k=5)) == 2


async def test_chunk_delay_slows_each_chunk_and_bad_options_are_rejected() -> None:
    store = make(chunk_delay=0.0)
    assert store._chunk_delay == 0.0
    for bad in (-1, "0.1", float("nan"), True):
        with pytest.raises(ValueError, match="chunk_delay"):
            make(chunk_delay=bad)
    with pytest.raises(ValueError, match="empty or whitespace"):
        await store.aadd_document("a", "   ")
    with pytest.raises(TypeError, match="source must be a str"):
        await store.aadd_document(None, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be at least 1"):
        store.similarity_search("x", k=0)
    assert store.version == 0


async def test_it_has_the_same_document_surface_as_the_cow_store() -> None:
    surface = {"aadd_document", "aremove_document", "similarity_search", "asimilarity_search",
               "similarity_search_with_score", "asimilarity_search_with_score", "sources", "version", "snapshot"}
    for name in surface:
        assert hasattr(NaiveVectorStore, name) and hasattr(CowVectorStore, name), name
    assert re.match(r"The naive vector store", __import__("chatkit.store.naive").store.naive.__doc__)
