"""A copy-on-write faiss vector store: atomic documents, pinned snapshots, readers that never wait.

How it works (Lucene's segments and near-real-time readers, in miniature):

* The store is one reference to an immutable :class:`StoreSnapshot`: a tuple of immutable segments
  (small faiss indexes) and one live bitmap per segment.
* Readers read that reference once and search what they got. No lock, no waiting, no torn reads. Async
  searches run on the store's own read pool, never behind embedding or merging work.
* A writer takes a ticket for its sources when it is called (:class:`~chatkit.store.ordering.WriteOrder`),
  then splits and embeds its text on the store's bounded write pool, holding nothing. When the
  embedding is done it waits for its turn (every earlier write to one of its sources has finished), so
  writes to one source publish in call order; then it builds one new segment and new bitmaps that
  tombstone the replaced rows, and swaps the reference under a short internal guard that only writers
  take. Its cost depends on what the write adds, not on the size of the store (no ``clone_index``, no
  ``remove_ids``).
* Compaction merges small segments and drops tombstoned rows, in a background thread by default, and
  publishes the result by the same swap. A tiered policy plus a hard cap keep the segment count bounded.
* :meth:`CowVectorStore.close` stops all of it; a closed store still answers reads from its last snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from .._labels import caller_label
from .directory import DirectoryWriter, Followed, LoadedVersion, Retention, SavedVersion, read_version
from .ordering import Ticket, WriteOrder
from .progress import embed_in_batches
from .publisher import Batch, Compaction, Published, Publisher
from .records import CompactionResult, DocumentRecord, StoreStatistics
from .segments import build_index
from .snapshot import StoreSnapshot, relevance
from .validate import (
    as_matrix,
    check_content,
    check_metadata,
    check_positive_int,
    check_source,
    check_storable,
    check_store_config,
    check_text,
)
from .workers import WorkerPool, closed_error

if TYPE_CHECKING:
    from langchain_text_splitters import TextSplitter

    from ..timeline import Timeline

__all__ = ["CowVectorStore"]

Item = tuple[str, object, object]  # (source, content, metadata) as given; checked in the write pool

_RECORDS_PER_STEP = 500  # aadd_sources builds its records in slices, yielding to the loop between them


class _EmbeddingsSlot:
    """The store's embedding model, loaded on first use. Shared by the store, its publisher and its
    snapshots without referring back to the store (no reference cycle: a dropped store is freed at once,
    and its idle pool threads end)."""

    __slots__ = ("value", "_guard")

    def __init__(self, value: Embeddings | None) -> None:
        self.value = value
        self._guard = threading.Lock()

    def get(self) -> Embeddings:
        emb = self.value
        if emb is None:
            with self._guard:
                if self.value is None:
                    from ..embeddings import default_embeddings

                    self.value = default_embeddings()
                emb = self.value
        return emb


def _refuse_in_loop(name: str) -> None:
    """Sync writes wait for their turn; in a thread running an event loop that could wait for a write of
    that same loop, forever."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{name}() blocks until the write is published and this thread runs an event loop: "
        f"use `await store.a{name}(...)` here"
    )


class CowVectorStore(VectorStore):
    """A copy-on-write vector store over faiss: documents appear and disappear atomically.

    Source-level writes come in two forms with the same guarantees (atomic publish; writes to one source
    publish in call order, across threads and event loops): ``add_document`` / ``add_sources`` /
    ``remove_document`` block until published (plain threads, scripts, sync handlers), and
    ``aadd_document`` / ``aadd_sources`` / ``aremove_document`` are their async forms.

    Args:
        embeddings: any LangChain ``Embeddings``; default: the local all-MiniLM-L6-v2 model
            (:func:`~chatkit.default_embeddings`), loaded on first use, never downloaded.
        chunk_size, chunk_overlap: how ``add_document`` splits text (characters, with
            ``RecursiveCharacterTextSplitter``).
        progress: show a tqdm bar (notebook-aware) while embedding many chunks (128 or more).
        embed_batch_size: chunks per call to the embedding model (the bar advances per call; the model
            sorts each call's texts by length, so large calls pad least).
        compaction: ``"background"`` (merge segments in a background thread), ``"inline"`` (the writer
            merges before returning: deterministic, for tests) or ``"off"`` (only :meth:`compact`).
        merge_factor: the tiered policy merges this many segments of one size tier into one.
        max_segments: hard cap on segments; beyond it the writer merges the smallest ones (on the write
            pool) before it returns.
        embed_workers: threads of the write pool, which splits, validates and embeds what is added (so at
            most this many embedding calls run at once) and runs the merges writers owe.
        search_workers: threads of the read pool, which runs the async searches (``asimilarity_search``,
            the snapshots' and the retrievers' async calls). Neither pool is the event loop's default
            executor, so readers never queue behind embedding or merging work.
        timeline: record ``"embed"``, ``"wait"`` (for the write's turn), ``"hold"`` / ``"publish"``,
            ``"search"`` and ``"compact"`` spans on this :class:`~chatkit.Timeline`.

    Raises:
        TypeError / ValueError: a bad option (named in the message).

    Copies: ``copy.copy(store)`` and ``copy.deepcopy(store)`` give a new, independent, open store with the
    same options, the same embedding model and timeline objects, and the current version's immutable
    segments (shared, never copied); it is attached to no directory. Pickling is refused (``TypeError``):
    use :meth:`save` / :meth:`load`.

    Example:
        >>> from chatkit import CowVectorStore, HashEmbeddings
        >>> with CowVectorStore(HashEmbeddings(dim=64), chunk_size=40, chunk_overlap=0) as store:
        ...     rec = store.add_document("faq.md", "Refunds take five days.\\n\\nShipping is free.")
        ...     docs = store.similarity_search("how long do refunds take", k=1)
        ...     print(rec.chunks, rec.version, docs[0].page_content, docs[0].metadata)
        2 1 Refunds take five days. {'source': 'faq.md', 'chunk': 0, 'version': 1}
        >>> store.sources(), store.version, store.closed
        (['faq.md'], 1, True)
    """

    def __init__(
        self,
        embeddings: Embeddings | None = None,
        *,
        chunk_size: int = 500,
        chunk_overlap: int = 50,
        progress: bool = True,
        embed_batch_size: int = 256,
        compaction: Compaction = "background",
        merge_factor: int = 4,
        max_segments: int = 32,
        embed_workers: int = 4,
        search_workers: int = 8,
        timeline: Timeline | None = None,
    ) -> None:
        chunk_size, chunk_overlap = check_store_config(embeddings, chunk_size, chunk_overlap)
        if compaction not in ("background", "inline", "off"):
            raise ValueError(f"compaction must be 'background', 'inline' or 'off', got {compaction!r}")
        merge_factor = check_positive_int("merge_factor", merge_factor, minimum=2)
        max_segments = check_positive_int("max_segments", max_segments, minimum=2)
        embed_batch_size = check_positive_int("embed_batch_size", embed_batch_size)
        embed_workers = check_positive_int("embed_workers", embed_workers)
        search_workers = check_positive_int("search_workers", search_workers)
        # what a copy is made with
        self._options: dict[str, Any] = {
            "chunk_size": chunk_size,
            "chunk_overlap": chunk_overlap,
            "progress": bool(progress),
            "embed_batch_size": embed_batch_size,
            "compaction": compaction,
            "merge_factor": merge_factor,
            "max_segments": max_segments,
            "embed_workers": embed_workers,
            "search_workers": search_workers,
            "timeline": timeline,
        }
        self._embed_batch_size = embed_batch_size
        self._chunk_size, self._chunk_overlap = chunk_size, chunk_overlap
        self._progress = bool(progress)
        self._timeline = timeline
        self._emb = _EmbeddingsSlot(embeddings)
        self._splitter: TextSplitter | None = None
        self._order = WriteOrder()  # per-source publish order: tickets taken at call time
        self._writes = WorkerPool("chatkit-embed", workers=embed_workers)
        self._reads = WorkerPool("chatkit-search", workers=search_workers)
        # owns the current snapshot; publishes and merges swap it (see chatkit/store/publisher.py)
        self._pub = Publisher(
            embedder=self._emb.get,
            compaction=compaction,
            merge_factor=merge_factor,
            max_segments=max_segments,
            timeline=timeline,
            reads=self._reads.arun_read,
        )
        self._save_guard = threading.Lock()
        self._close_guard = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ basics

    @property
    def _embeddings(self) -> Embeddings | None:
        """The model given (or loaded so far); ``None`` while the default model is not loaded."""
        return self._emb.value

    def _embedder(self) -> Embeddings:
        return self._emb.get()

    @property
    def embeddings(self) -> Embeddings:
        """The embedding model (loads the default model on first access when none was given)."""
        return self._emb.get()

    @property
    def version(self) -> int:
        """The current version: 0 when new, +1 per published change (compaction does not count)."""
        return self._pub.state.version

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (writes are refused; reads still work)."""
        return self._closed

    def snapshot(self) -> StoreSnapshot:
        """The current version, pinned: it never changes, whatever is published later."""
        return self._pub.state

    def sources(self) -> list[str]:
        """The sources (added with :meth:`add_document` / :meth:`add_sources`) in the store now, sorted."""
        return self._pub.state.sources()

    def statistics(self) -> StoreStatistics:
        """Counts describing the current version."""
        return self._pub.state.statistics()

    def __len__(self) -> int:
        """The number of live chunks and documents."""
        return len(self._pub.state)

    def __bool__(self) -> bool:
        """Always true, even when empty (so ``store or default`` never drops an empty store)."""
        return True

    def __repr__(self) -> str:
        s = self._pub.state
        emb = type(self._emb.value).__name__ if self._emb.value is not None else "default (not loaded)"
        return (
            f"<CowVectorStore version={s.version} rows={len(s)} segments={len(s.segments)}"
            f" dead={sum(s._dead)} dim={s.dim} embeddings={emb} compaction={self._pub.compaction!r}"
            f"{' closed' if self._closed else ''}>"
        )

    @contextlib.contextmanager
    def _span(self, phase: str, who: str | None, key: Any) -> Iterator[None]:
        if self._timeline is None:
            yield
            return
        with self._timeline.span(phase, who=who, key=key):
            yield

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise closed_error(what)

    # ------------------------------------------------------------------ lifecycle and copies

    def close(self) -> None:
        """Stop the store's background work; refuse writes from now on. Idempotent.

        Writes not yet published fail with ``RuntimeError`` (queued embeddings are dropped; an embedding
        already running finishes and is discarded). The background compactor finishes the merge it is
        running, if any, and starts no other; merges writers owed are dropped. Every thread the store
        started has ended when this returns. Reads keep working on the last snapshot (async ones then
        run in ``asyncio.to_thread``). In async code prefer :meth:`aclose`.
        """
        with self._close_guard:
            if self._closed:
                return
            self._closed = True
        self._pub.close()  # nothing publishes any more; waits for a running background merge
        self._writes.close()  # drops queued jobs, waits for running ones
        self._reads.close(cancel_queued=False)  # searches already queued still run
        release = getattr(self, "_release_directory", None)
        if release is not None:
            release()

    async def aclose(self) -> None:
        """:meth:`close` in a worker thread (it waits for running jobs and threads to end)."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> CowVectorStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> CowVectorStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _twin(self) -> CowVectorStore:
        twin = type(self)(self._emb.value, **self._options)
        s = self._pub.state
        twin._pub.state = twin._pub.new_state(s.version, s.dim, list(s.segments), list(s.lives), list(s._dead))
        return twin

    def __copy__(self) -> CowVectorStore:
        """A new, independent store holding the current version (see the class docstring)."""
        return self._twin()

    def __deepcopy__(self, memo: dict[int, Any]) -> CowVectorStore:
        """A new, independent store holding the current version (see the class docstring)."""
        return self._twin()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a CowVectorStore cannot be pickled (no pickle for stored data): use save() and load(), "
            "or copy.deepcopy() for an independent in-memory copy"
        )

    # ------------------------------------------------------------------ preparing rows (write pool, no lock held)

    def _split(self, content: str) -> list[str]:
        if self._splitter is None:
            from langchain_text_splitters import RecursiveCharacterTextSplitter

            self._splitter = RecursiveCharacterTextSplitter(chunk_size=self._chunk_size, chunk_overlap=self._chunk_overlap)
        return [c for c in self._splitter.split_text(content) if c.strip()]

    def _embed(self, batch: Batch, who: str | None, key: Any) -> Batch:
        """Embed ``batch.texts`` (in the calling thread) and build their faiss index."""
        with self._span("embed", who, key):
            emb = self._emb.get()
            who_emb = type(emb).__name__
            dim = [self._pub.state.dim]  # the store's, else the first batch's: every batch must agree

            def convert(raw: Any, n: int) -> np.ndarray:
                matrix = as_matrix(raw, n, dim[0], who_emb)
                if dim[0] is None and n:
                    dim[0] = int(matrix.shape[1])
                return matrix

            parts = embed_in_batches(
                emb,
                batch.texts,
                batch_size=self._embed_batch_size,
                progress=self._progress,
                convert=convert,
                desc=f"embedding {key}" if isinstance(key, str) else "embedding",
            )
            batch.vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
            batch.index = build_index(batch.vectors) if len(batch.texts) else None
            if batch.ids:
                batch.segment()  # the row tables too: publishing then costs what the swap needs, no more
        return batch

    def _prepare_sources(self, items: Sequence[Item], who: str, key: Any) -> Batch:
        """Check, split and embed documents (runs on the write pool)."""
        batch = Batch()
        for source, content, metadata in items:
            source = check_source(source)  # (add_sources takes its tickets before checking the names)
            text = check_content(content, source)
            md = check_metadata(metadata, source)
            pieces = self._split(text)
            if not pieces:
                raise ValueError(f"content of {source!r} produced no chunks")
            ids = tuple(uuid.uuid4().hex for _ in pieces)
            batch.by_source[source] = ids
            batch.ids.extend(ids)
            batch.texts.extend(pieces)
            batch.metadatas.extend([md] * len(pieces))
            batch.sources.extend([source] * len(pieces))
            batch.chunks.extend(range(len(pieces)))
        return self._embed(batch, who, key)

    def _prepare_texts(
        self,
        texts: Iterable[str],
        metadatas: Sequence[Mapping[str, Any] | None] | None,
        ids: Sequence[str | None] | None,
        who: str,
    ) -> Batch:
        """Check and embed LangChain-style texts (runs on the write pool)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str, not one str")
        text_list = list(texts)
        n = len(text_list)
        if metadatas is not None and len(metadatas) != n:
            raise ValueError(f"got {len(metadatas)} metadatas for {n} texts")
        if ids is not None:
            if isinstance(ids, str):
                raise TypeError("ids must be a list of str, not one str")
            if len(ids) != n:
                raise ValueError(f"got {len(ids)} ids for {n} texts")
        batch = Batch()
        for i, text in enumerate(text_list):
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, got {type(text).__name__} {text!r:.60}")
            check_text(text, f"text {i}")
            md = None if metadatas is None else metadatas[i]
            if md is not None and not isinstance(md, Mapping):
                raise TypeError(f"metadata {i} must be a dict or None, got {type(md).__name__}")
            doc_id = None if ids is None else ids[i]
            if doc_id is not None:
                if not isinstance(doc_id, str):
                    raise TypeError(f"ids must be str or None, got {type(doc_id).__name__} {doc_id!r:.60}")
                if not doc_id:
                    raise ValueError("ids must not be empty strings")
                check_text(doc_id, f"id {i}")
            if md:
                check_storable(md, f"text {i}")
            batch.ids.append(doc_id or uuid.uuid4().hex)
            batch.texts.append(text)
            batch.metadatas.append(copy.deepcopy(dict(md)) if md else {})
            batch.sources.append(None)
            batch.chunks.append(None)
        if len(set(batch.ids)) != n:
            dup = next(i for i, c in Counter(batch.ids).items() if c > 1)
            raise ValueError(f"id {dup!r} appears twice in one call")
        if n:
            self._embed(batch, who, None)
        return batch

    @staticmethod
    def _items(documents: object, metadata: object) -> list[Item]:
        """``add_sources`` arguments as items. Only their shape is checked here, in C-speed steps (on the
        event loop, before the ticket); sources, contents and metadata are checked on the write pool."""
        if not isinstance(documents, Mapping):
            raise TypeError(f"documents must map sources to contents, got {type(documents).__name__}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must map sources to dicts, got {type(metadata).__name__}")
        if metadata:
            extra = set(metadata) - set(documents)
            if extra:
                raise ValueError(f"metadata given for sources that are not being added: {sorted(extra, key=repr)!r}")
            get = metadata.get
            return [(source, content, get(source)) for source, content in documents.items()]
        return [(source, content, None) for source, content in documents.items()]

    @staticmethod
    def _records(batch: Batch, published: Published, start: int = 0, stop: int | None = None) -> list[DocumentRecord]:
        replaced, version = published.replaced, published.version
        return [
            DocumentRecord(source, len(ids), version, ids, replaced.get(source, 0))
            for source, ids in itertools.islice(batch.by_source.items(), start, stop)
        ]

    async def _arecords(self, batch: Batch, published: Published) -> tuple[DocumentRecord, ...]:
        """:meth:`_records`, yielding to the event loop between slices of a big batch."""
        out: list[DocumentRecord] = []
        n = len(batch.by_source)
        for start in range(0, n, _RECORDS_PER_STEP):
            if start:
                await asyncio.sleep(0)  # (the write is published: a cancellation here leaves it so)
            out.extend(self._records(batch, published, start, start + _RECORDS_PER_STEP))
        return tuple(out)

    # ------------------------------------------------------------------ the ordered write path

    def _publish_sources(self, batch: Batch | None, sources: Sequence[str], who: str, key: Any) -> Published | None:
        with self._span("hold", who, key), self._span("publish", who, key):
            return self._pub.publish(batch, kill_sources=sources)

    def _write(self, name: str, items: Sequence[Item] | None, sources: Sequence[str]) -> tuple[Batch | None, Published | None]:
        """The sync write path: ticket, embed on the write pool (this thread waits), turn, publish, merge."""
        _refuse_in_loop(name)
        self._check_open(f"{name}()")
        who = caller_label()
        key: Any = sources[0] if len(sources) == 1 else tuple(sources)
        ticket = self._order.take(sources)  # call order is decided here, before any embedding
        try:
            batch = None
            if items is not None:
                batch = self._writes.run(self._prepare_sources, items, who, key, what=f"{name}()")
            with self._span("wait", who, key):
                self._order.wait(ticket)
            published = self._publish_sources(batch, sources, who, key)
        finally:
            self._order.finish(ticket)
        self._merge_after(published)
        return batch, published

    async def _awrite(
        self, name: str, items: Sequence[Item] | None, sources: Sequence[str]
    ) -> tuple[Batch | None, Published | None]:
        """The async write path; every await in it may be cancelled, leaving nothing behind."""
        self._check_open(f"{name}()")
        who = caller_label()
        key: Any = sources[0] if len(sources) == 1 else tuple(sources)
        ticket: Ticket = self._order.take(sources)  # before the first await: call order
        try:
            batch = None
            if items is not None:
                batch = await self._writes.arun(self._prepare_sources, items, who, key, what=f"{name}()")
            with self._span("wait", who, key):
                await self._order.wait_async(ticket)
            published = self._publish_sources(batch, sources, who, key)
        finally:
            self._order.finish(ticket)
        await self._amerge_after(published)
        return batch, published

    def _merge_after(self, published: Published | None) -> None:
        """A sync writer runs the merges it owes (hard cap, or ``"inline"`` mode) in its own thread."""
        if published is None or (published.merge is None and self._pub.compaction != "inline"):
            return
        self._pub.run_merges(published.merge)

    async def _amerge_after(self, published: Published | None) -> None:
        """An async writer's merges run on the write pool. The job owns the segments marked busy: a
        cancelled writer stops waiting but the job still runs; a job dropped by :meth:`close` (or never
        queued) releases them."""
        if published is None or (published.merge is None and self._pub.compaction != "inline"):
            return
        segs = published.merge
        try:
            job = self._writes.submit(self._pub.run_merges, segs, what="a merge")
        except RuntimeError:  # closed meanwhile
            self._pub.release(segs)
            return
        job.add_done_callback(lambda f: self._pub.release(segs) if f.cancelled() else None)
        try:
            await WorkerPool.wait(job, "a merge", cancel_job=False)
        except RuntimeError:
            if not job.cancelled():
                raise  # pragma: no cover - run_merges logs merge failures itself

    # ------------------------------------------------------------------ the document API

    def add_document(self, source: str, content: str, metadata: Mapping[str, Any] | None = None) -> DocumentRecord:
        """Split, embed and publish a document; all its chunks appear at once. Blocks until published.

        Adding a source that exists replaces it atomically: its old chunks disappear in the same step
        the new ones appear. Writes to one source publish in call order (sync and async callers alike).
        The embedding runs on the store's write pool; this thread waits for it.

        Args:
            source: the document's name.
            content: its text (split into chunks of ``chunk_size`` characters).
            metadata: extra metadata for every chunk. ``source``, ``chunk`` and ``version`` are added by
                the store. Refused: non-str keys, tuples, lone surrogates (a save would change or fail on
                them).

        Raises:
            TypeError: ``source`` or ``content`` is not a str, ``metadata`` not a dict, a non-str key or a
                tuple in it.
            ValueError: empty source, empty or whitespace-only content, a reserved metadata key, a lone
                surrogate, or vectors of the wrong dimension. Nothing is published.
            RuntimeError: called in a thread that runs an event loop (use :meth:`aadd_document`), or the
                store is closed.
        """
        source = check_source(source)
        batch, published = self._write("add_document", [(source, content, metadata)], [source])
        assert batch is not None and published is not None  # a batch with rows always publishes
        return self._records(batch, published)[0]

    async def aadd_document(
        self, source: str, content: str, metadata: Mapping[str, Any] | None = None
    ) -> DocumentRecord:
        """The async form of :meth:`add_document` (same guarantees; the loop is never blocked).

        Raises:
            TypeError / ValueError: as :meth:`add_document`. Nothing is published.
            RuntimeError: the store is closed.
        """
        source = check_source(source)
        batch, published = await self._awrite("add_document", [(source, content, metadata)], [source])
        assert batch is not None and published is not None
        return self._records(batch, published)[0]

    def add_sources(
        self, documents: Mapping[str, str], *, metadata: Mapping[str, Mapping[str, Any]] | None = None
    ) -> tuple[DocumentRecord, ...]:
        """Several documents (``{source: content}``) split, embedded and published in one atomic step.

        Blocks until published. Returns their :class:`DocumentRecord` s, in the order given (``()`` for
        an empty mapping).

        Args:
            documents: source -> content.
            metadata: source -> that document's metadata (optional, for some of the sources).

        Raises:
            TypeError / ValueError: as :meth:`add_document`, naming the source; or metadata for a source
                not being added. Nothing is published.
            RuntimeError: as :meth:`add_document` (use :meth:`aadd_sources` in async code).
        """
        items = self._items(documents, metadata)
        if not items:
            return ()
        batch, published = self._write("add_sources", items, [s for s, _, _ in items])
        assert batch is not None and published is not None
        return tuple(self._records(batch, published))

    async def aadd_sources(
        self, documents: Mapping[str, str], *, metadata: Mapping[str, Mapping[str, Any]] | None = None
    ) -> tuple[DocumentRecord, ...]:
        """The async form of :meth:`add_sources`. Checking, splitting and embedding run on the write
        pool, so a batch of thousands of documents never stalls the event loop.

        Raises:
            TypeError / ValueError: as :meth:`add_sources`. Nothing is published.
            RuntimeError: the store is closed.
        """
        items = self._items(documents, metadata)
        if not items:
            return ()
        batch, published = await self._awrite("add_sources", items, [s for s, _, _ in items])
        assert batch is not None and published is not None
        return await self._arecords(batch, published)

    def remove_document(self, source: str) -> bool:
        """Remove every chunk of ``source`` in one step; whether it was there. Blocks until published,
        in call order with the other writes to ``source``.

        Raises:
            TypeError / ValueError: ``source`` is not a non-empty str.
            RuntimeError: as :meth:`add_document` (use :meth:`aremove_document` in async code).
        """
        source = check_source(source)
        _, published = self._write("remove_document", None, [source])
        return published is not None

    async def aremove_document(self, source: str) -> bool:
        """The async form of :meth:`remove_document`.

        Raises:
            TypeError / ValueError: ``source`` is not a non-empty str.
            RuntimeError: the store is closed.
        """
        source = check_source(source)
        _, published = await self._awrite("remove_document", None, [source])
        return published is not None

    # ------------------------------------------------------------------ LangChain writes (ids, no splitting)

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """LangChain's method: ``Document`` s stored as given (no splitting, metadata untouched), an
        existing id replaced; returns the ids.

        Raises:
            TypeError: ``documents`` is a dict (that is :meth:`add_sources`), or as :meth:`add_texts`.
        """
        if isinstance(documents, Mapping):
            raise TypeError(
                "add_documents() takes a list of LangChain Documents; to add {source: content} use "
                "store.add_sources(...) (or await store.aadd_sources(...))"
            )
        return super().add_documents(documents, **kwargs)

    async def aadd_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """The async form of :meth:`add_documents`.

        Raises:
            TypeError: ``documents`` is a dict (that is :meth:`aadd_sources`), or as :meth:`add_texts`.
        """
        if isinstance(documents, Mapping):
            raise TypeError(
                "aadd_documents() takes a list of LangChain Documents; to add {source: content} use "
                "await store.aadd_sources(...)"
            )
        return await super().aadd_documents(documents, **kwargs)

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Embed ``texts`` (on the write pool; this thread waits) and publish them as documents, as
        given, in one step.

        An id already in the store is replaced; missing ids are generated. Metadata is copied, not
        stamped. Same-id writes from several threads: the last to publish wins.

        Raises:
            TypeError / ValueError: non-str texts or ids, mismatched lengths, a repeated id, metadata a
                save would change (non-str keys, tuples, lone surrogates), or vectors of the wrong
                dimension. Nothing is published.
            RuntimeError: the store is closed.
        """
        self._check_open("add_texts()")
        who = caller_label()
        batch = self._writes.run(self._prepare_texts, texts, metadatas, ids, who, what="add_texts()")
        if not batch.ids:
            return []
        with self._span("publish", who, None):
            published = self._pub.publish(batch, kill_ids=batch.ids)
        self._merge_after(published)
        return list(batch.ids)

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """The async form of :meth:`add_texts` (checks and embedding on the write pool).

        Raises:
            TypeError / ValueError / RuntimeError: as :meth:`add_texts`.
        """
        self._check_open("aadd_texts()")
        who = caller_label()
        batch = await self._writes.arun(self._prepare_texts, texts, metadatas, ids, who, what="aadd_texts()")
        if not batch.ids:
            return []
        with self._span("publish", who, None):
            published = self._pub.publish(batch, kill_ids=batch.ids)
        await self._amerge_after(published)
        return list(batch.ids)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Remove the documents with these ids in one step; ``ids=None`` removes everything.

        Returns:
            ``True`` when something was removed (ids that were not in the store are ignored, so some
            missing ids still give ``True``); ``False`` when none of the ids was in the store (or the
            store was already empty): nothing was published and the version did not change.

        Raises:
            TypeError: ``ids`` is a str or holds non-str values.
            RuntimeError: the store is closed.
        """
        if ids is not None:
            if isinstance(ids, str):
                raise TypeError(f"ids must be a list of str, got the str {ids!r}")
            ids = list(ids)
            for doc_id in ids:
                if not isinstance(doc_id, str):
                    raise TypeError(f"ids must be str, got {type(doc_id).__name__} {doc_id!r:.60}")
        self._check_open("delete()")
        if ids is not None and not ids:
            return False
        with self._span("publish", None, None):
            published = self._pub.publish(None, kill_ids=ids or (), clear=ids is None)
        return published is not None

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """:meth:`delete` (no I/O, the guard held only briefly: it runs inline)."""
        return self.delete(ids, **kwargs)

    # ------------------------------------------------------------------ LangChain reads (delegate to the snapshot)

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The live documents with these ids, in the order asked; missing ids (and repeats) are skipped.

        Raises:
            TypeError: ``ids`` is a str.
        """
        return self._pub.state.get_by_ids(ids)

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """:meth:`get_by_ids` (no I/O: runs inline)."""
        return self._pub.state.get_by_ids(ids)

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """The ``k`` documents closest to ``query`` (see :meth:`StoreSnapshot.similarity_search`, also for
        ``filter=``).

        Raises:
            TypeError / ValueError: ``k < 1``, a non-str query, a bad filter (an unknown operator: ValueError).
        """
        return self._pub.state.similarity_search(query, k, **kwargs)

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """Documents with their cosine similarity to ``query`` (higher is closer)."""
        return self._pub.state.similarity_search_with_score(query, k, **kwargs)

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return relevance

    def similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Documents with a relevance in [0, 1] (the cosine similarity, clamped); ``score_threshold=``
        drops those below it."""
        return self._pub.state.similarity_search_with_relevance_scores(query, k, **kwargs)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        """The ``k`` documents closest to a vector.

        Raises:
            ValueError: the vector's dimension differs from the store's, or holds NaN.
        """
        return self._pub.state.similarity_search_by_vector(embedding, k, **kwargs)

    def similarity_search_with_score_by_vector(
        self, embedding: list[float], k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Documents with their cosine similarity to a vector."""
        return self._pub.state.similarity_search_with_score_by_vector(embedding, k, **kwargs)

    def max_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """``k`` documents chosen among the ``fetch_k`` closest for relevance and diversity (MMR)."""
        return self._pub.state.max_marginal_relevance_search(query, k, fetch_k, lambda_mult, **kwargs)

    def max_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """MMR search from a vector."""
        return self._pub.state.max_marginal_relevance_search_by_vector(embedding, k, fetch_k, lambda_mult, **kwargs)

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """:meth:`similarity_search` on the read pool, on the snapshot current at the call."""
        return await self._pub.state.asimilarity_search(query, k, **kwargs)

    async def asimilarity_search_with_score(self, *args: Any, **kwargs: Any) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_score` on the read pool."""
        return await self._pub.state.asimilarity_search_with_score(*args, **kwargs)

    async def asimilarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_relevance_scores` on the read pool."""
        return await self._pub.state.asimilarity_search_with_relevance_scores(query, k, **kwargs)

    async def asimilarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        """:meth:`similarity_search_by_vector` on the read pool."""
        return await self._pub.state.asimilarity_search_by_vector(embedding, k, **kwargs)

    async def amax_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search` on the read pool."""
        return await self._pub.state.amax_marginal_relevance_search(query, k, fetch_k, lambda_mult, **kwargs)

    async def amax_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search_by_vector` on the read pool."""
        return await self._pub.state.amax_marginal_relevance_search_by_vector(embedding, k, fetch_k, lambda_mult, **kwargs)

    def _get_retriever_tags(self) -> list[str]:
        name = type(self._emb.value).__name__ if self._emb.value is not None else "HuggingFaceEmbeddings"
        return [type(self).__name__, name]

    # ------------------------------------------------------------------ compaction

    def compact(self) -> CompactionResult:
        """Merge every segment into one and drop tombstoned rows; publish by swap (the version stays).

        Waits for merges already running. Readers are never blocked; writers keep publishing meanwhile
        (their new segments are not part of this merge). Prefer :meth:`acompact` on an event loop.

        Raises:
            RuntimeError: the store is closed.
        """
        self._check_open("compact()")
        return self._pub.compact()

    async def acompact(self) -> CompactionResult:
        """:meth:`compact` in a worker thread (cancelling the caller lets the merge finish)."""
        return await asyncio.to_thread(self.compact)

    def wait_for_compaction(self, timeout: float | None = None) -> bool:
        """Block until no merge is running or due in the background; ``False`` if ``timeout`` expired."""
        return self._pub.wait_for_compaction(timeout)

    # ------------------------------------------------------------------ construction, persistence

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> CowVectorStore:
        """A new store (``kwargs`` go to the constructor) holding ``texts`` as documents."""
        store = cls(embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    # ------------------------------------------------------------------ persistence: one directory, one writer, many readers
    # The protocol (lock file, versions, pins, retention) is chatkit/store/directory.py's. A store is its
    # directory's writer (``_writer``), follows a directory as a reader (``_follow``), or neither.

    _writer: DirectoryWriter | None = None
    _follow: Followed | None = None

    @classmethod
    def open(
        cls,
        directory: str | PathLike[str],
        embeddings: Embeddings | None = None,
        *,
        lock_timeout: float | None = 0.0,
        keep_versions: int = 2,
        keep_seconds: float = 60.0,
        **kwargs: Any,
    ) -> CowVectorStore:
        """Open ``directory`` as its one writer: the newest saved version (empty if there is none; the
        directory is created if missing), and the directory's lock, held until the store is closed.

        Each :meth:`save` then writes only what changed. Readers (:meth:`load`, in any process) never
        block the writer, and the writer never deletes files a reader is loading.

        Args:
            directory: the store directory.
            embeddings: as for the constructor (``kwargs`` go there too).
            lock_timeout: seconds to wait while another writer holds the directory (``None``: forever).
            keep_versions, keep_seconds: retention: superseded versions are deleted once they are not among
                the newest ``keep_versions`` and were replaced more than ``keep_seconds`` ago (a version a
                reader is loading is kept whatever these say).

        Raises:
            DirectoryLocked: another writer holds the directory (after ``lock_timeout``).
            FileNotFoundError / ValueError: as for :meth:`load`; also bad options (named).

        Example:
            >>> import tempfile
            >>> from chatkit import CowVectorStore, HashEmbeddings
            >>> d = tempfile.mkdtemp()
            >>> writer = CowVectorStore.open(d, HashEmbeddings(dim=16), keep_versions=1, keep_seconds=0)
            >>> writer.add_texts(["Refunds take five days."], ids=["r"])
            ['r']
            >>> writer.save().generation
            1
            >>> reader = CowVectorStore.load(d, HashEmbeddings(dim=16))
            >>> _ = writer.delete(["r"]), writer.add_texts(["Shipping is free."], ids=["s"])
            >>> saved = writer.save()
            >>> saved.generation, saved.segments_written, saved.versions_removed
            (2, 1, 1)
            >>> [d.id for d in reader.similarity_search("shipping", k=4)], reader.refresh()
            (['r'], True)
            >>> [d.id for d in reader.similarity_search("shipping", k=4)]
            ['s']
        """
        retention = Retention(keep_versions=keep_versions, keep_seconds=keep_seconds)
        store = cls(embeddings, **kwargs)
        writer = DirectoryWriter(directory, timeout=lock_timeout, retention=retention)
        try:
            loaded = writer.load()
            if loaded is not None:
                store._install(loaded, writer.root, expect_version=None)
        except BaseException:
            writer.release()
            raise
        store._writer, store._follow = writer, None
        return store

    def save(self, directory: str | PathLike[str] | None = None, *, overwrite: bool = False) -> SavedVersion:
        """Save the current version as the directory's next version; only segments not on disk yet are written.

        ``directory`` may be left out once the store has one (:meth:`open`, or an earlier save). Saving
        into a directory for the first time makes this store its writer: it takes the directory's lock
        (failing at once if another writer holds it) and keeps it until the store is closed. Atomic: a
        crash at any point leaves the newest complete version loadable; a save that returned is durable.
        Saving an unchanged store writes nothing.

        Args:
            directory: where to save (created if missing).
            overwrite: without it, a store saves only into a directory with no saved version, or into
                the one it was loaded from if no other version was saved there since (so no save drops a
                version it has not seen). With it, this store's content becomes the newest version
                whatever is there (older versions go by the retention rules, as after any save).

        Raises:
            DirectoryLocked: another writer holds ``directory``.
            ValueError: ``directory`` holds another store or versions saved since this one was loaded
                (and not ``overwrite``), or this store writes to another directory; a metadata value
                cannot be saved (named; nothing is published).
            TypeError: some metadata is not JSON-serializable (named; nothing is published).
            OSError: the file system failed (the newest version on disk is complete).
        """
        with self._save_guard:
            return self._writer_for(directory, overwrite).commit(self._pub.state)

    async def asave(self, directory: str | PathLike[str] | None = None, *, overwrite: bool = False) -> SavedVersion:
        """:meth:`save` in a worker thread."""
        return await asyncio.to_thread(functools.partial(self.save, directory, overwrite=overwrite))

    def _writer_for(self, directory: str | PathLike[str] | None, overwrite: bool) -> DirectoryWriter:
        """This store's writer, taking ``directory`` if the store has none yet (``_save_guard`` held)."""
        if self._writer is not None:
            if directory is not None and not self._writer.is_for(directory):
                raise ValueError(
                    f"this store writes to {self._writer.root}; it cannot also save into {directory} "
                    "(close it first, or build another store for that directory)"
                )
            return self._writer
        if directory is None:
            raise ValueError("save() needs a directory: this store has none yet (or use CowVectorStore.open)")
        writer = DirectoryWriter(directory, timeout=0.0)
        try:
            follow = self._follow
            if writer.has_versions and not overwrite:
                if follow is None or follow.root != writer.root:
                    raise ValueError(
                        f"{writer.root} already holds a saved store (generation {writer.generation}, version "
                        f"{writer.version}); open it with CowVectorStore.open() to change it, save into an empty "
                        "directory, or pass overwrite=True to replace its content"
                    )
                if follow.generation != writer.generation:
                    raise ValueError(
                        f"{writer.root} moved on: this store was loaded from generation {follow.generation}, and "
                        f"generation {writer.generation} was saved since; saving would drop it (refresh() first, "
                        "or pass overwrite=True)"
                    )
        except BaseException:
            writer.release()
            raise
        self._writer, self._follow = writer, None
        return writer

    @classmethod
    def load(cls, directory: str | PathLike[str], embeddings: Embeddings | None = None, **kwargs: Any) -> CowVectorStore:
        """Open ``directory`` read-only: a store holding its newest complete version, which follows the
        directory (:meth:`refresh` moves it to the newest version saved since).

        Takes no lock and writes nothing to the directory; any number of readers, in any process, may
        load it while its writer saves. The version is read into memory, so a reader never needs a file
        again. ``kwargs`` go to the constructor; ``compaction`` defaults to ``"off"`` (the writer merges
        segments; a reader's are replaced at the next refresh).

        Raises:
            FileNotFoundError: no saved store there, or a file it lists is missing.
            ValueError: a corrupt or unsafe manifest or file (the message names it: bad checksums, links,
                vectors that are not finite or not unit length, JSON nested too deeply, ...), or the
                embeddings give vectors of another dimension than the saved ones.
        """
        kwargs.setdefault("compaction", "off")
        store = cls(embeddings, **kwargs)
        root = Path(directory).resolve()
        loaded = read_version(root)
        assert loaded is not None
        store._install(loaded, root, expect_version=None)
        return store

    def refresh(self) -> bool:
        """Move to the newest version saved in the directory this store was loaded from; whether it moved.

        Only segments this store does not hold yet are read; snapshots taken before keep their version.
        On the directory's writer this does nothing (it is the newest version).

        Raises:
            ValueError: this store follows no directory, or it has changes of its own that were never
                saved (``refresh`` would drop them); a corrupt or unsafe file (named).
            FileNotFoundError: the directory or its manifests are gone.
        """
        with self._save_guard:
            if self._writer is not None:
                return False
            follow = self._follow
            if follow is None:
                raise ValueError("this store follows no directory: refresh() is for stores made by CowVectorStore.load()")
            loaded = read_version(follow.root, newer_than=follow.generation, reuse=follow.reuse)
            if loaded is None:
                return False
            self._install(loaded, follow.root, expect_version=follow.version)
            return True

    async def arefresh(self) -> bool:
        """:meth:`refresh` in a worker thread."""
        return await asyncio.to_thread(self.refresh)

    def _install(self, loaded: LoadedVersion, root: Path, *, expect_version: int | None) -> None:
        """Make ``loaded`` the current version; with ``expect_version``, only if the store is still at it."""
        if loaded.dim is not None and loaded.dim != self._pub.state.dim:
            from ..embeddings import embedding_dimension

            have = embedding_dimension(self._embedder())
            if have != loaded.dim:
                raise ValueError(
                    f"the store saved in {root} holds {loaded.dim}-d vectors but "
                    f"{type(self._embedder()).__name__} gives {have}-d vectors; load it with the model that built it"
                )
        with self._pub._guard:  # a check and a swap in one step, against this store's own writers
            cur = self._pub.state
            if expect_version is not None and cur.version != expect_version:
                raise ValueError(
                    f"this store has changes of its own (version {cur.version}; it loaded version {expect_version} "
                    f"from {root}) that were never saved and refresh() would drop; load the directory again to "
                    "discard them"
                )
            self._pub.state = self._pub.new_state(loaded.version, loaded.dim, list(loaded.segments), list(loaded.lives))
        self._follow = Followed(root=root, generation=loaded.generation, version=loaded.version, reuse=loaded.reusable())

    def _release_directory(self) -> None:
        """Let go of the directory's writer lock if this store holds it (``close()`` calls this; idempotent).

        The store then follows the directory as a reader, from the version it saved last.
        """
        with self._save_guard:
            writer, self._writer = self._writer, None
            if writer is None:
                return
            self._follow = Followed(
                root=writer.root,
                generation=writer.generation if writer.has_versions else -1,
                version=writer.version,
                reuse=writer.reusable(self._pub.state.segments),
            )
            writer.release()
