"""A copy-on-write faiss vector store: atomic documents, pinned snapshots, readers that never block.

How it works (Lucene's segments and near-real-time readers, in miniature):

* The store is one reference to an immutable :class:`StoreSnapshot`: a tuple of immutable segments
  (small faiss indexes) and one live bitmap per segment.
* Readers read that reference once and search what they got. No lock, no waiting, no torn reads.
* A writer splits and embeds its text in a worker thread, outside any lock; then, holding the source's
  :class:`~chatkit.KeyedLock` key (so writes to one source publish in call order), it builds one new
  segment and new bitmaps that tombstone the replaced rows, and swaps the reference. The swap happens
  under a short internal guard that only writers take; its cost depends on what the write adds, not on
  the size of the store (no ``clone_index``, no ``remove_ids``).
* Compaction merges small segments and drops tombstoned rows, in the background by default, and
  publishes the result by the same swap. A tiered policy plus a hard cap keep the segment count bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from .._labels import caller_label
from .directory import DirectoryWriter, Followed, LoadedVersion, Retention, SavedVersion, read_version
from .progress import embed_in_batches
from .records import CompactionResult, DocumentRecord, StoreStatistics
from .publisher import Batch, Compaction, Publisher
from .segments import build_index
from .snapshot import StoreSnapshot, relevance
from .validate import as_matrix, check_content, check_metadata, check_positive_int, check_source, check_store_config
from ..locks import KeyedLock

if TYPE_CHECKING:
    from langchain_text_splitters import TextSplitter

    from ..timeline import Timeline

__all__ = ["CowVectorStore"]


def _consume(fut: asyncio.Future[Any]) -> None:
    """Done-callback: retrieve an abandoned future's exception so asyncio does not log it."""
    if not fut.cancelled():
        fut.exception()


class CowVectorStore(VectorStore):
    """A copy-on-write vector store over faiss: documents appear and disappear atomically.

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
        max_segments: hard cap on segments; beyond it the writer merges the smallest ones itself.
        timeline: record ``"embed"``, ``"publish"`` and ``"search"`` spans (and the source lock's
            ``"wait"``/``"hold"``) on this :class:`~chatkit.Timeline`.

    Raises:
        TypeError / ValueError: a bad option (named in the message).

    Example:
        >>> import asyncio
        >>> from chatkit import CowVectorStore, HashEmbeddings
        >>> store = CowVectorStore(HashEmbeddings(dim=64), chunk_size=40, chunk_overlap=0)
        >>> async def main():
        ...     rec = await store.add_document("faq.md", "Refunds take five days.\\n\\nShipping is free.")
        ...     docs = await store.asimilarity_search("how long do refunds take", k=1)
        ...     return rec.chunks, rec.version, docs[0].page_content, docs[0].metadata
        >>> asyncio.run(main())
        (2, 1, 'Refunds take five days.', {'source': 'faq.md', 'chunk': 0, 'version': 1})
        >>> store.sources(), store.version
        (['faq.md'], 1)
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
        timeline: Timeline | None = None,
    ) -> None:
        chunk_size, chunk_overlap = check_store_config(embeddings, chunk_size, chunk_overlap)
        if compaction not in ("background", "inline", "off"):
            raise ValueError(f"compaction must be 'background', 'inline' or 'off', got {compaction!r}")
        merge_factor = check_positive_int("merge_factor", merge_factor, minimum=2)
        max_segments = check_positive_int("max_segments", max_segments, minimum=2)
        self._embed_batch_size = check_positive_int("embed_batch_size", embed_batch_size)
        self._chunk_size, self._chunk_overlap = chunk_size, chunk_overlap
        self._progress = bool(progress)
        self._timeline = timeline
        self._embeddings = embeddings
        self._embeddings_guard = threading.Lock()
        self._splitter: TextSplitter | None = None
        # per-source write order; timeline observers see its wait/hold spans
        self._lock = KeyedLock(observer=None if timeline is None else timeline.observe_lock)
        # owns the current snapshot; publishes and merges swap it (see chatkit/store/publisher.py)
        self._pub = Publisher(
            embedder=self._embedder,
            compaction=compaction,
            merge_factor=merge_factor,
            max_segments=max_segments,
            timeline=timeline,
        )
        self._save_guard = threading.Lock()

    # ------------------------------------------------------------------ basics

    def _embedder(self) -> Embeddings:
        emb = self._embeddings
        if emb is None:
            with self._embeddings_guard:
                if self._embeddings is None:
                    from ..embeddings import default_embeddings

                    self._embeddings = default_embeddings()
                emb = self._embeddings
        return emb

    @property
    def embeddings(self) -> Embeddings:
        """The embedding model (loads the default model on first access when none was given)."""
        return self._embedder()

    @property
    def version(self) -> int:
        """The current version: 0 when new, +1 per published change (compaction does not count)."""
        return self._pub.state.version

    def snapshot(self) -> StoreSnapshot:
        """The current version, pinned: it never changes, whatever is published later."""
        return self._pub.state

    def sources(self) -> list[str]:
        """The sources (added with :meth:`add_document`) that are in the store now, sorted."""
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
        emb = type(self._embeddings).__name__ if self._embeddings is not None else "default (not loaded)"
        return (
            f"<CowVectorStore version={s.version} rows={len(s)} segments={len(s.segments)}"
            f" dead={sum(s._dead)} dim={s.dim} embeddings={emb} compaction={self._pub.compaction!r}>"
        )

    @contextlib.contextmanager
    def _span(self, phase: str, who: str | None, key: Any) -> Iterator[None]:
        if self._timeline is None:
            yield
            return
        with self._timeline.span(phase, who=who, key=key):
            yield

    # ------------------------------------------------------------------ preparing rows (no lock held)

    def _split(self, content: str) -> list[str]:
        if self._splitter is None:
            from langchain_text_splitters import RecursiveCharacterTextSplitter

            self._splitter = RecursiveCharacterTextSplitter(chunk_size=self._chunk_size, chunk_overlap=self._chunk_overlap)
        return [c for c in self._splitter.split_text(content) if c.strip()]

    def _embed(self, batch: Batch, who: str | None, key: Any) -> Batch:
        """Embed ``batch.texts`` (in the calling thread) and build their faiss index."""
        with self._span("embed", who, key):
            emb = self._embedder()
            raw = embed_in_batches(
                emb,
                batch.texts,
                batch_size=self._embed_batch_size,
                progress=self._progress,
                desc=f"embedding {key}" if isinstance(key, str) else "embedding",
            )
            batch.vectors = as_matrix(raw, len(batch.texts), self._pub.state.dim, type(emb).__name__)
            batch.index = build_index(batch.vectors) if len(batch.texts) else None
        return batch

    def _prepare_sources(self, items: Sequence[tuple[str, str, dict[str, Any]]], who: str | None) -> Batch:
        batch = Batch()
        for source, content, metadata in items:
            pieces = self._split(content)
            if not pieces:
                raise ValueError(f"content of {source!r} produced no chunks")
            for i, text in enumerate(pieces):
                batch.ids.append(uuid.uuid4().hex)
                batch.texts.append(text)
                batch.metadatas.append(metadata)
                batch.sources.append(source)
                batch.chunks.append(i)
        key = items[0][0] if len(items) == 1 else tuple(s for s, _, _ in items)
        return self._embed(batch, who, key)

    def _check_texts(
        self, texts: Iterable[str], metadatas: Sequence[Mapping[str, Any] | None] | None, ids: Sequence[str | None] | None
    ) -> Batch:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str, not one str")
        text_list = list(texts)
        for t in text_list:
            if not isinstance(t, str):
                raise TypeError(f"texts must be str, got {type(t).__name__} {t!r:.60}")
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
            md = None if metadatas is None else metadatas[i]
            if md is not None and not isinstance(md, Mapping):
                raise TypeError(f"metadata {i} must be a dict or None, got {type(md).__name__}")
            doc_id = None if ids is None else ids[i]
            if doc_id is not None and not isinstance(doc_id, str):
                raise TypeError(f"ids must be str or None, got {type(doc_id).__name__} {doc_id!r:.60}")
            if doc_id is not None and not doc_id:
                raise ValueError("ids must not be empty strings")
            batch.ids.append(doc_id or uuid.uuid4().hex)
            batch.texts.append(text)
            batch.metadatas.append(copy.deepcopy(dict(md)) if md else {})
            batch.sources.append(None)
            batch.chunks.append(None)
        if len(set(batch.ids)) != n:
            dup = next(i for i, c in Counter(batch.ids).items() if c > 1)
            raise ValueError(f"id {dup!r} appears twice in one call")
        return batch

    # ------------------------------------------------------------------ compaction

    def compact(self) -> CompactionResult:
        """Merge every segment into one and drop tombstoned rows; publish by swap (the version stays).

        Waits for merges already running. Readers are never blocked; writers keep publishing meanwhile
        (their new segments are not part of this merge). Prefer :meth:`acompact` on an event loop.
        """
        return self._pub.compact()

    async def acompact(self) -> CompactionResult:
        """:meth:`compact` in a worker thread."""
        return await asyncio.to_thread(self.compact)

    def wait_for_compaction(self, timeout: float | None = None) -> bool:
        """Block until no merge is running or due in the background; ``False`` if ``timeout`` expired."""
        return self._pub.wait_for_compaction(timeout)

    # ------------------------------------------------------------------ the document API (async)

    async def _write_sources(self, items: list[tuple[str, str, dict[str, Any]]]) -> tuple[DocumentRecord, ...]:
        sources = [s for s, _, _ in items]
        who = caller_label()
        key: Any = sources[0] if len(sources) == 1 else tuple(sources)
        loop = asyncio.get_running_loop()
        # embedding starts now, in a worker thread, before we queue for the lock: writes to different
        # sources embed in parallel, and a write never holds a lock while it computes
        embedded = loop.run_in_executor(None, contextvars.copy_context().run, self._prepare_sources, items, who)
        embedded.add_done_callback(_consume)
        try:
            async with self._lock(*sources):  # joins the queue now: same-source writes publish in call order
                batch = await embedded
                with self._span("publish", who, key):
                    published = self._pub.publish(batch, kill_sources=sources)
        finally:
            if not embedded.done():
                embedded.cancel()
        assert published is not None  # a batch with rows always publishes
        if published.merge is not None or self._pub.compaction == "inline":
            await asyncio.to_thread(self._pub.run_merges, published.merge)
        out: list[DocumentRecord] = []
        for source in sources:
            mine = tuple(i for i, s in zip(batch.ids, batch.sources) if s == source)
            out.append(DocumentRecord(source, len(mine), published.version, mine, published.replaced[source]))
        return tuple(out)

    async def add_document(
        self, source: str, content: str, metadata: Mapping[str, Any] | None = None
    ) -> DocumentRecord:
        """Split, embed and publish a document; all its chunks appear at once.

        Adding a source that exists replaces it atomically: its old chunks disappear in the same step
        the new ones appear. Writes to the same source publish in call order.

        Args:
            source: the document's name.
            content: its text (split into chunks of ``chunk_size`` characters).
            metadata: extra metadata for every chunk (JSON-serializable if you will :meth:`save`).
                ``source``, ``chunk`` and ``version`` are added by the store.

        Raises:
            TypeError: ``source`` or ``content`` is not a str, ``metadata`` not a dict.
            ValueError: empty source, empty or whitespace-only content, a reserved metadata key,
                or vectors of the wrong dimension. Nothing is published.
        """
        source = check_source(source)
        content = check_content(content, source)
        md = check_metadata(metadata, source)
        (record,) = await self._write_sources([(source, content, md)])
        return record

    async def _add_sources(
        self, documents: Mapping[str, str], metadata: Mapping[str, Mapping[str, Any]] | None
    ) -> tuple[DocumentRecord, ...]:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must map sources to dicts, got {type(metadata).__name__}")
        extra = set(metadata or ()) - set(documents)
        if extra:
            raise ValueError(f"metadata given for sources that are not being added: {sorted(extra)!r}")
        items = []
        for source, content in documents.items():
            source = check_source(source)
            items.append((source, check_content(content, source), check_metadata((metadata or {}).get(source), source)))
        if not items:
            return ()
        return await self._write_sources(items)

    @overload
    def add_documents(  # type: ignore[overload-overlap]
        self, documents: Mapping[str, str], *, metadata: Mapping[str, Mapping[str, Any]] | None = None
    ) -> Coroutine[Any, Any, tuple[DocumentRecord, ...]]: ...
    @overload
    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]: ...
    def add_documents(self, documents: Any, **kwargs: Any) -> Any:
        """Two forms:

        * ``await store.add_documents({source: content, ...}, metadata={source: {...}})``: several
          sources split, embedded and published in one atomic step; returns their
          :class:`DocumentRecord` s.
        * ``store.add_documents([Document, ...], ids=None)``: LangChain's method: documents stored as
          given (no splitting, metadata untouched), an existing id replaced; returns the ids.

        Raises:
            TypeError / ValueError: as for :meth:`add_document` / :meth:`add_texts`.
        """
        if isinstance(documents, Mapping):
            unknown = set(kwargs) - {"metadata"}
            if unknown:
                raise TypeError(f"unexpected keyword arguments {sorted(unknown)!r}")
            return self._add_sources(documents, kwargs.get("metadata"))
        return super().add_documents(documents, **kwargs)

    async def aadd_documents(self, documents: Any, **kwargs: Any) -> Any:
        """Async :meth:`add_documents` (either form)."""
        if isinstance(documents, Mapping):
            return await self.add_documents(documents, **kwargs)
        return await super().aadd_documents(documents, **kwargs)

    async def remove_document(self, source: str) -> bool:
        """Remove every chunk of ``source`` in one step; whether it was there.

        Raises:
            TypeError / ValueError: ``source`` is not a non-empty str.
        """
        source = check_source(source)
        who = caller_label()
        async with self._lock(source):
            with self._span("publish", who, source):
                published = self._pub.publish(None, kill_sources=[source])
        return published is not None

    # ------------------------------------------------------------------ LangChain writes (ids, no splitting)

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Embed ``texts`` (in this thread) and publish them as documents, as given, in one step.

        An id already in the store is replaced; missing ids are generated. Metadata is copied, not
        stamped. Same-id writes from several threads: the last to publish wins.

        Raises:
            TypeError / ValueError: non-str texts or ids, mismatched lengths, a repeated id,
                or vectors of the wrong dimension. Nothing is published.
        """
        batch = self._check_texts(texts, metadatas, ids)
        if not batch.ids:
            return []
        who = caller_label()
        self._embed(batch, who, None)
        with self._span("publish", who, None):
            published = self._pub.publish(batch, kill_ids=batch.ids)
        if published is not None and (published.merge is not None or self._pub.compaction == "inline"):
            self._pub.run_merges(published.merge)
        return list(batch.ids)

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """:meth:`add_texts` with the embedding in a worker thread."""
        batch = self._check_texts(texts, metadatas, ids)
        if not batch.ids:
            return []
        who = caller_label()
        await asyncio.to_thread(self._embed, batch, who, None)
        with self._span("publish", who, None):
            published = self._pub.publish(batch, kill_ids=batch.ids)
        if published is not None and (published.merge is not None or self._pub.compaction == "inline"):
            await asyncio.to_thread(self._pub.run_merges, published.merge)
        return list(batch.ids)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Remove the documents with these ids in one step (missing ids are ignored); ``None``: remove all.

        Raises:
            TypeError: ``ids`` is a str or holds non-str values.
        """
        if ids is not None:
            if isinstance(ids, str):
                raise TypeError(f"ids must be a list of str, got the str {ids!r}")
            ids = list(ids)
            for doc_id in ids:
                if not isinstance(doc_id, str):
                    raise TypeError(f"ids must be str, got {type(doc_id).__name__} {doc_id!r:.60}")
            if not ids:
                return True
        with self._span("publish", None, None):
            self._pub.publish(None, kill_ids=ids or (), clear=ids is None)
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """:meth:`delete` (it does no I/O and holds the guard only briefly, so it runs inline)."""
        return self.delete(ids, **kwargs)

    # ------------------------------------------------------------------ LangChain reads (delegate to the snapshot)

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The live documents with these ids (missing ids are skipped)."""
        return self._pub.state.get_by_ids(ids)

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """:meth:`get_by_ids` (no I/O: runs inline)."""
        return self._pub.state.get_by_ids(ids)

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """The ``k`` documents closest to ``query`` (see :meth:`StoreSnapshot.similarity_search`).

        Raises:
            TypeError / ValueError: ``k < 1``, a non-str query, a bad filter.
        """
        return self._pub.state.similarity_search(query, k, **kwargs)

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """Documents with their cosine similarity to ``query`` (higher is closer)."""
        return self._pub.state.similarity_search_with_score(query, k, **kwargs)

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return relevance

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
        """:meth:`similarity_search` in a worker thread, on the snapshot current at the call."""
        return await self._pub.state.asimilarity_search(query, k, **kwargs)

    async def asimilarity_search_with_score(self, *args: Any, **kwargs: Any) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_score` in a worker thread."""
        return await self._pub.state.asimilarity_search_with_score(*args, **kwargs)

    async def asimilarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        """:meth:`similarity_search_by_vector` in a worker thread."""
        return await self._pub.state.asimilarity_search_by_vector(embedding, k, **kwargs)

    async def amax_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search` in a worker thread."""
        return await self._pub.state.amax_marginal_relevance_search(query, k, fetch_k, lambda_mult, **kwargs)

    async def amax_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search_by_vector` in a worker thread."""
        return await self._pub.state.amax_marginal_relevance_search_by_vector(embedding, k, fetch_k, lambda_mult, **kwargs)

    def _get_retriever_tags(self) -> list[str]:
        name = type(self._embeddings).__name__ if self._embeddings is not None else "HuggingFaceEmbeddings"
        return [type(self).__name__, name]

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
