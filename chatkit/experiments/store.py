"""The vector-store partial read: searches while a document is replaced, naive store vs ``CowVectorStore``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..embeddings import HashEmbeddings
from ..timeline import Timeline, TimelineRow
from ._common import Anomaly, Comparison, RaceResult, _gather_named

__all__ = [
    "StoreRaceResult",
    "store_race",
    "compare_store_race",
]

# what a search saw of the document -> the colour of its bar
_SEARCH_STYLES: dict[str, tuple[str, str]] = {
    "search saw v1": ("#4292c6", "search that saw version 1"),
    "search saw v2": ("#fd8d3c", "search that saw version 2"),
    "search saw v1 + v2": ("#e377c2", "search that saw chunks of both"),
    "search saw nothing": ("#bdbdbd", "search that saw no chunk of it"),
}


@dataclass(frozen=True, slots=True)
class StoreRaceResult(RaceResult):
    """A :class:`RaceResult` for searches running while a document is replaced.

    ``expected`` holds the chunk counts of the complete versions (``"v1: 6"``); ``observed`` one line per
    search, ``"v1: 6"``, ``"v1: 3"``, ``"v1: 2, v2: 1"``, ``"missing"``, ... (what that search saw of the
    document).

    Attributes:
        searches: how many searches ran while the writer worked (varies with timing for the copy-on-write
            store, whose embedding runs in a worker thread; deterministic for the naive store).
        versions_seen: which versions of the document (1, 2) the searches saw.
        source: the document that was replaced.
    """

    searches: int = 0
    versions_seen: tuple[int, ...] = ()
    source: str = "guide.md"

    def summary(self) -> str:
        partial = self.count("partial document")
        return (
            f"{self.variant}: "
            + (f"{partial} searches saw a partial document" if partial else "every search saw one complete version")
        )


class _SlowHashEmbeddings(HashEmbeddings):
    """:class:`~chatkit.HashEmbeddings` that take ``delay`` seconds per text, like a model on a CPU.

    ``time.sleep`` blocks the calling thread (the event loop's, for the naive store, which embeds inline)
    and releases the GIL, as a real model's matrix products do.
    """

    def __init__(self, *, dim: int = 128) -> None:
        super().__init__(dim=dim)
        self.delay = 0.0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if self.delay:
            time.sleep(self.delay * len(texts))
        return super().embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        if self.delay:
            time.sleep(self.delay)
        return super().embed_query(text)


def _versioned_text(version: int, parts: int) -> str:
    words = ("locks", "queues", "snapshots", "segments", "embeddings", "timelines", "sessions", "checkpoints")
    return "\n\n".join(
        f"Guide version {version}, part {i + 1}: how {words[i % len(words)]} keep a chatbot correct."
        for i in range(parts)
    )


def _revised(text: str) -> str:
    """Version 2 of a real document: every paragraph marked as revised."""
    return "\n\n".join(f"(Revised.) {p}" for p in text.split("\n\n") if p.strip())


def _seen(by_version: dict[int, int]) -> str:
    if not by_version:
        return "search saw nothing"
    return "search saw " + " + ".join(f"v{v}" for v in sorted(by_version))


async def store_race(
    *,
    cow: bool,
    parts: int = 6,
    max_searches: int = 500,
    corpus: Mapping[str, str] | None = None,
    source: str | None = None,
    delay: float = 0.002,
) -> StoreRaceResult:
    """Replace a document (v1 -> v2) while a reader keeps searching, and check what each search saw.

    By default the document is ``guide.md`` (``parts`` chunks per version) next to one other document;
    with ``corpus`` (e.g. ``embedding_lab.load_corpus("data")``) the store holds the whole corpus and
    ``source``, one of its files, is replaced by a revised version of itself.

    The reader runs one search each time the event loop lets it (``await asyncio.sleep(0)`` between
    searches) until the writer is done, and checks each result set: the document must be there completely,
    in exactly one version. The naive store (``cow=False``) removes and adds chunks one at a time, yielding
    after each, so the reader sees the document shrink and grow: a partial document on every run.
    ``CowVectorStore`` (``cow=True``) embeds on its write pool (the timeline shows the writer holding
    nothing meanwhile) and publishes all chunks in one swap.

    Both use :class:`~chatkit.HashEmbeddings` (offline), slowed down to ``delay`` seconds per text embedded
    (every query included) so that the timeline's bars can be seen. In the timeline, each search is
    coloured by the version of the document it saw, each partial read is marked with what it saw, and
    the swap that publishes version 2 is marked.

    Args:
        cow: use ``CowVectorStore`` (the fix) instead of ``NaiveVectorStore``.
        parts: chunks per version of ``guide.md`` (2 or more; ignored with ``corpus``).
        max_searches: after this many searches, wait for the writer, then search once more.
        corpus: ``{file name: text}`` to index before the race.
        source: the file of ``corpus`` to replace (default: its first).
        delay: seconds per embedded text (0 for the fastest run).

    Raises:
        ValueError: ``parts < 2``, ``max_searches < 1``, a negative ``delay``, an empty ``corpus`` or a
            ``source`` that is not one of its files.
    """
    if parts < 2:
        raise ValueError(f"parts must be >= 2, got {parts!r}")
    if max_searches < 1:
        raise ValueError(f"max_searches must be >= 1, got {max_searches!r}")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < 1:
        raise ValueError(f"delay must be seconds in [0, 1), got {delay!r}")
    if corpus is not None:
        if not corpus:
            raise ValueError("corpus is empty: give at least one document")
        source = next(iter(corpus)) if source is None else source
        if source not in corpus:
            raise ValueError(f"source {source!r} is not a file of the corpus ({len(corpus)} files)")
        others = {name: text for name, text in corpus.items() if name != source}
        v1_text, v2_text, chunk_size = corpus[source], _revised(corpus[source]), 800
        query = corpus[source].split("\n", 1)[0].lstrip("# ")
    else:
        source = "guide.md"
        others = {"other.md": "Another document that nobody edits.\n\nIt has two parts."}
        v1_text, v2_text, chunk_size = _versioned_text(1, parts), _versioned_text(2, parts), 80
        query = "guide version part chatbot"
    recorded = Timeline()
    embeddings = _SlowHashEmbeddings(dim=128)
    store: Any
    if cow:
        from ..store import CowVectorStore

        store = CowVectorStore(
            embeddings, chunk_size=chunk_size, chunk_overlap=0, progress=False, timeline=recorded, compaction="off"
        )
    else:
        from ..store import NaiveVectorStore

        store = NaiveVectorStore(embeddings, chunk_size=chunk_size, chunk_overlap=0, timeline=recorded)
    try:
        for name, text in others.items():
            await store.aadd_document(name, text)
        first = await store.aadd_document(source, v1_text)
        embeddings.delay = float(delay)
        recorded.clear()
        writer_done = asyncio.Event()
        searches: list[tuple[float, float, dict[int, int]]] = []  # (start, end, {store version: chunks seen})
        k = len(store) + 2 * first.chunks + 8  # every chunk there is, whatever the writer is doing
        second: list[Any] = []

        async def writer() -> None:
            try:
                with recorded.span("call", key=source):
                    second.append(await store.aadd_document(source, v2_text))
            finally:
                writer_done.set()

        async def reader() -> None:
            while True:
                finished = writer_done.is_set()
                start = recorded.now()
                docs = store.similarity_search(query, k=k)
                by_version: dict[int, int] = {}
                for d in docs:
                    if d.metadata.get("source") == source:
                        v = int(d.metadata.get("version", -1))
                        by_version[v] = by_version.get(v, 0) + 1
                searches.append((start, recorded.now(), by_version))
                if finished:
                    return
                if len(searches) >= max_searches:
                    await writer_done.wait()  # then one last search, after the writer published
                else:
                    await asyncio.sleep(0)

        outcomes = await _gather_named([("writer", writer), ("reader", reader)])
    finally:
        if cow:
            await store.aclose()  # its worker threads end here
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    # the document's versions: 1 = as first added, 2 = the replacement (store versions differ)
    doc_version = {first.version: 1, second[0].version: 2}
    chunks = {1: first.chunks, 2: second[0].chunks}
    seen: list[str] = []
    anomalies: list[Anomaly] = []
    versions: set[int] = set()
    timeline = Timeline()
    timeline.style("call", colour="#eeeeee", background=True, label="aadd_document() call")
    for phase, (colour, label) in _SEARCH_STYLES.items():
        timeline.style(phase, colour=colour, label=label)
    for row in recorded.rows():
        if row.phase != "search":  # the store's own search spans are replaced by the reader's, coloured
            timeline.add(row)
        if cow and row.phase == "publish" and row.who == "writer":
            timeline.add(TimelineRow("writer", "swap", row.end or row.start, None, source, None, "v2 published in one swap"))
    for n, (start, end, by_store_version) in enumerate(searches, start=1):
        by_version = {doc_version.get(v, v): c for v, c in by_store_version.items()}
        line = ", ".join(f"v{v}: {c}" for v, c in sorted(by_version.items())) or "missing"
        seen.append(line)
        versions.update(by_version)
        timeline.add(TimelineRow("reader", _seen(by_version), start, end, source, "ok", line))
        complete = len(by_version) == 1 and all(chunks.get(v) == c for v, c in by_version.items())
        if not complete:
            anomalies.append(Anomaly("partial document", "reader", f"search {n} saw {line} (of {first.chunks} chunks)"))
            what = " + ".join(f"v{v} {c}/{chunks[v]}" for v, c in sorted(by_version.items())) or "no chunk"
            timeline.add(TimelineRow("reader", "partial read", end, None, source, None, what))
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
        source=source,
    )


async def compare_store_race(*, parts: int = 6) -> Comparison:
    """Run :func:`store_race` on the naive store, then on ``CowVectorStore``."""
    before = await store_race(cow=False, parts=parts)
    after = await store_race(cow=True, parts=parts)
    return Comparison(before, after)
