"""The vector-store partial read: searches while a document is replaced, naive store vs ``CowVectorStore``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..timeline import Timeline, TimelineRow
from ._common import Anomaly, Comparison, RaceResult, _gather_named

__all__ = [
    "StoreRaceResult",
    "store_race",
    "compare_store_race",
]


@dataclass(frozen=True, slots=True)
class StoreRaceResult(RaceResult):
    """A :class:`RaceResult` for searches running while a document is replaced.

    ``expected`` holds the chunk counts of the complete versions (``"v1: 6 chunks"``); ``observed`` one line
    per search, ``"v1: 6"``, ``"v1: 3"``, ``"v1: 2, v2: 1"``, ... (what that search saw of the document).

    Attributes:
        searches: how many searches ran while the writer worked (varies with timing for the copy-on-write
            store, whose embedding runs in a worker thread; deterministic for the naive store).
        versions_seen: which versions of the document (1, 2) the searches saw.
    """

    searches: int = 0
    versions_seen: tuple[int, ...] = ()

    def summary(self) -> str:
        partial = self.count("partial document")
        return (
            f"{self.variant}: "
            + (f"{partial} searches saw a partial document" if partial else "every search saw one complete version")
        )


def _versioned_text(version: int, parts: int) -> str:
    words = ("locks", "queues", "snapshots", "segments", "embeddings", "timelines", "sessions", "checkpoints")
    return "\n\n".join(
        f"Guide version {version}, part {i + 1}: how {words[i % len(words)]} keep a chatbot correct."
        for i in range(parts)
    )


async def store_race(*, cow: bool, parts: int = 6, max_searches: int = 500) -> StoreRaceResult:
    """Replace a document (``guide.md`` v1 -> v2, ``parts`` chunks each) while a reader keeps searching.

    The reader runs one search each time the event loop lets it (``await asyncio.sleep(0)`` between
    searches) until the writer is done, and checks each result set: the document must be there completely,
    in exactly one version. The naive store (``cow=False``) removes and adds chunks one at a time, yielding
    after each, so the reader sees the document shrink and grow: a partial document on every run.
    ``CowVectorStore`` (``cow=True``) embeds on its write pool (the timeline shows the writer holding
    nothing meanwhile) and publishes all chunks in one swap.
    Both use :class:`~chatkit.HashEmbeddings`: fast and offline.

    Args:
        cow: use ``CowVectorStore`` (the fix) instead of ``NaiveVectorStore``.
        parts: chunks per version of the document (2 or more).
        max_searches: after this many searches, wait for the writer, then search once more.

    Raises:
        ValueError: ``parts < 2`` or ``max_searches < 1``.
    """
    from ..embeddings import HashEmbeddings

    if parts < 2:
        raise ValueError(f"parts must be >= 2, got {parts!r}")
    if max_searches < 1:
        raise ValueError(f"max_searches must be >= 1, got {max_searches!r}")
    timeline = Timeline()
    embeddings = HashEmbeddings(dim=128)
    store: Any
    if cow:
        from ..store import CowVectorStore

        store = CowVectorStore(embeddings, chunk_size=80, chunk_overlap=0, progress=False, timeline=timeline)
    else:
        from ..store import NaiveVectorStore

        store = NaiveVectorStore(embeddings, chunk_size=80, chunk_overlap=0, timeline=timeline)
    await store.aadd_document("other.md", "Another document that nobody edits.\n\nIt has two parts.")
    first = await store.aadd_document("guide.md", _versioned_text(1, parts))
    timeline.clear()
    writer_done = asyncio.Event()
    searches: list[tuple[float, dict[int, int]]] = []  # (when, {store version: chunks seen})
    k = 4 * parts + 4
    second: list[Any] = []

    async def writer() -> None:
        try:
            second.append(await store.aadd_document("guide.md", _versioned_text(2, parts)))
        finally:
            writer_done.set()

    async def reader() -> None:
        while True:
            finished = writer_done.is_set()
            docs = store.similarity_search("guide version part chatbot", k=k)
            by_version: dict[int, int] = {}
            for d in docs:
                if d.metadata.get("source") == "guide.md":
                    v = int(d.metadata.get("version", -1))
                    by_version[v] = by_version.get(v, 0) + 1
            searches.append((timeline.now(), by_version))
            if finished:
                return
            if len(searches) >= max_searches:
                await writer_done.wait()  # then one last search, after the writer published
            else:
                await asyncio.sleep(0)

    try:
        outcomes = await _gather_named([("writer", writer), ("reader", reader)])
    finally:
        if cow:
            await store.aclose()  # its worker threads end here
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    # the document's versions: 1 = as first added, 2 = the replacement (store versions differ)
    chunks = {first.version: first.chunks, second[0].version: second[0].chunks}
    label = {first.version: "v1", second[0].version: "v2"}
    seen: list[str] = []
    anomalies: list[Anomaly] = []
    versions: set[int] = set()
    for n, (when, by_version) in enumerate(searches, start=1):
        line = ", ".join(f"{label.get(v, f'version {v}')}: {c}" for v, c in sorted(by_version.items())) or "missing"
        seen.append(line)
        versions.update(1 if v == first.version else 2 for v in by_version)
        complete = len(by_version) == 1 and all(chunks.get(v) == c for v, c in by_version.items())
        if not complete:
            anomalies.append(Anomaly("partial document", "reader", f"search {n} saw {line} (of {first.chunks} chunks)"))
            timeline.add(TimelineRow("reader", "partial read", when, None, "guide.md", None, line))
    return StoreRaceResult(
        experiment="vector-store partial read",
        variant="CowVectorStore" if cow else "NaiveVectorStore",
        fixed=cow,
        timeline=timeline,
        expected=(f"v1: {first.chunks}", f"v2: {second[0].chunks}"),
        observed=tuple(seen),
        anomalies=tuple(anomalies),
        searches=len(seen),
        versions_seen=tuple(sorted(versions)),
    )


async def compare_store_race(*, parts: int = 6) -> Comparison:
    """Run :func:`store_race` on the naive store, then on ``CowVectorStore``."""
    before = await store_race(cow=False, parts=parts)
    after = await store_race(cow=True, parts=parts)
    return Comparison(before, after)
