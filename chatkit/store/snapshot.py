"""The read side of :class:`~chatkit.CowVectorStore`: an immutable, pinned version of the store.

A snapshot is a tuple of immutable segments plus one live bitmap per segment. Nothing in it ever changes,
so any number of threads and tasks may search it without a lock; a writer publishes by building a new
snapshot and swapping one reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

from .._labels import caller_label
from .filters import FieldFilter, Filter, compile_filter
from .records import CHUNK_KEY, SOURCE_KEY, VERSION_KEY, StoreStatistics
from .segments import Segment, count_live, is_live, live_rows_mask
from .validate import as_query_vector, check_k, check_lambda, check_positive_int

if TYPE_CHECKING:
    from ..timeline import Timeline

__all__ = ["StoreSnapshot", "relevance", "Filter", "ReadRunner"]

# runs a search function in a worker thread and returns its result: the store's read pool
ReadRunner = Callable[..., Awaitable[Any]]

# metadata values that need no deep copy before they are handed to the caller
_IMMUTABLE = (str, int, float, bool, type(None))


def relevance(score: float) -> float:
    """Map a cosine similarity in [-1, 1] to a relevance in [0, 1] (negative similarity -> 0)."""
    return min(1.0, max(0.0, float(score)))


def _check_mmr(k: object, fetch_k: object, lambda_mult: object) -> tuple[int, int, float]:
    return check_k(k), check_positive_int("fetch_k", fetch_k), check_lambda(lambda_mult)


class StoreSnapshot:
    """A pinned, read-only version of a :class:`~chatkit.CowVectorStore`.

    It keeps answering from the same version whatever is published later (it holds the segments of
    that version; they are never mutated). Searches take no lock; the async forms run on the store's
    read pool.

    Scores: ``similarity_search_with_score`` gives the cosine similarity (higher is closer);
    ``similarity_search_with_relevance_scores`` clamps it to [0, 1].

    Raises:
        TypeError/ValueError: from the search methods, for a bad ``k``, filter or vector.

    Example:
        >>> from chatkit import CowVectorStore, HashEmbeddings
        >>> store = CowVectorStore(HashEmbeddings(dim=64), compaction="off")
        >>> _ = store.add_document("pets.md", "Cats purr.")
        >>> snap = store.snapshot()
        >>> _ = store.add_document("pets.md", "Dogs bark.")
        >>> snap.version, store.version
        (1, 2)
        >>> snap.similarity_search("cats", k=1)[0].page_content
        'Cats purr.'
    """

    __slots__ = ("_version", "_dim", "_segments", "_lives", "_dead", "_embedder", "_timeline", "_reads")

    def __init__(
        self,
        *,
        version: int,
        dim: int | None,
        segments: Sequence[Segment],
        lives: Sequence[np.ndarray | None],
        embedder: Callable[[], Embeddings],
        timeline: Timeline | None = None,
        dead: Sequence[int] | None = None,
        reads: ReadRunner | None = None,
    ) -> None:
        self._version = version
        self._dim = dim
        self._segments: tuple[Segment, ...] = tuple(segments)
        self._lives: tuple[np.ndarray | None, ...] = tuple(lives)
        if dead is None:  # writers pass the counts they already know; counting costs O(rows)
            dead = [s.n - count_live(lv, s.n) for s, lv in zip(self._segments, self._lives)]
        self._dead: tuple[int, ...] = tuple(dead)
        self._embedder = embedder
        self._timeline = timeline
        self._reads = reads  # None: asyncio.to_thread

    # ------------------------------------------------------------------ shape

    @property
    def version(self) -> int:
        """The store version this snapshot shows (0: empty, +1 per published change)."""
        return self._version

    @property
    def dim(self) -> int | None:
        """The vector dimension, or ``None`` while it is unknown (nothing added yet)."""
        return self._dim

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The immutable segments of this version."""
        return self._segments

    @property
    def lives(self) -> tuple[np.ndarray | None, ...]:
        """Each segment's live bitmap (``None``: every row live)."""
        return self._lives

    def __len__(self) -> int:
        """The number of live rows (chunks and documents)."""
        return sum(s.n for s in self._segments) - sum(self._dead)

    def __bool__(self) -> bool:
        """Always true, even when empty."""
        return True

    def __repr__(self) -> str:
        return f"<StoreSnapshot version={self._version} rows={len(self)} segments={len(self._segments)}>"

    def sources(self) -> list[str]:
        """The sources added with ``add_document`` that have live chunks, sorted."""
        found: set[str] = set()
        for seg, live in zip(self._segments, self._lives):
            for source, rows in seg.source_rows.items():
                if source not in found and is_live(live, rows).any():
                    found.add(source)
        return sorted(found)

    def statistics(self) -> StoreStatistics:
        """Counts describing this version."""
        return StoreStatistics(
            version=self._version,
            sources=len(self.sources()),
            chunks=len(self),
            segments=len(self._segments),
            dead_rows=sum(self._dead),
            dim=self._dim,
        )

    # ------------------------------------------------------------------ rows -> documents

    @staticmethod
    def _metadata(seg: Segment, row: int) -> dict[str, Any]:
        """A copy of a row's document metadata (stamped keys included) the caller may change freely."""
        stored = seg.metadatas[row]
        if all(isinstance(v, _IMMUTABLE) for v in stored.values()):
            metadata = dict(stored)
        else:
            metadata = copy.deepcopy(stored)
        source = seg.sources[row]
        if source is not None:
            metadata[SOURCE_KEY] = source
            metadata[CHUNK_KEY] = seg.chunks[row]
            metadata[VERSION_KEY] = seg.versions[row]
        return metadata

    def _document(self, seg: Segment, row: int) -> Document:
        return Document(id=seg.ids[row], page_content=seg.texts[row], metadata=self._metadata(seg, row))

    def _locate(self, doc_id: str) -> tuple[Segment, int] | None:
        for seg, live in zip(self._segments, self._lives):
            row = seg.id_to_row.get(doc_id)
            if row is not None and is_live(live, np.array([row]))[0]:
                return seg, row
        return None

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The live documents with these ids, in the order asked (missing ids are skipped)."""
        if isinstance(ids, str):
            raise TypeError(f"ids must be a list of str, got the str {ids!r}")
        out: list[Document] = []
        seen: set[str] = set()
        for doc_id in ids:
            if doc_id in seen or not isinstance(doc_id, str):
                continue
            seen.add(doc_id)
            hit = self._locate(doc_id)
            if hit is not None:
                out.append(self._document(*hit))
        return out

    def documents(self, source: str | None = None) -> list[Document]:
        """Every live document (or every live chunk of ``source``), segment by segment."""
        out: list[Document] = []
        for seg, live in zip(self._segments, self._lives):
            if source is None:
                rows = np.arange(seg.n)
            else:
                rows = seg.source_rows.get(source, np.zeros(0, dtype=np.int64))
            for r in rows[is_live(live, rows)].tolist():
                out.append(self._document(seg, r))
        if source is not None:
            out.sort(key=lambda d: d.metadata[CHUNK_KEY])
        return out

    # ------------------------------------------------------------------ search core

    @contextlib.contextmanager
    def _span(self, who: str | None) -> Iterator[None]:
        if self._timeline is None:
            yield
            return
        with self._timeline.span("search", who=who, detail=f"version {self._version}"):
            yield

    def _embed_query(self, query: str) -> np.ndarray:
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        return as_query_vector(self._embedder().embed_query(query), self._dim)

    def _top(self, q: np.ndarray, k: int, flt: FieldFilter | Callable[[dict[str, Any]], bool] | None) -> list[tuple[float, int, int]]:
        """The ``k`` best live rows (passing ``flt``) as (score, segment index, row), best first."""
        total = len(self)
        if total == 0:
            return []
        order = lambda h: (-h[0], h[1], h[2])  # noqa: E731 - best score, then segment, then row
        if isinstance(flt, FieldFilter):  # before the scan: only rows that pass are scored
            hits: list[tuple[float, int, int]] = []
            for i, (seg, live) in enumerate(zip(self._segments, self._lives)):
                mask = flt.mask(seg.fields())
                if live is not None:
                    mask &= live_rows_mask(live, seg.n)
                scores, rows = seg.search_rows(q, k, mask)
                hits.extend((float(s), i, int(r)) for s, r in zip(scores, rows))
            return heapq.nsmallest(k, hits, key=order)
        # no filter, or a callable one (opaque: it can only be applied to candidates, so fetch more until
        # k of them pass or every row was seen)
        want = k if flt is None else min(total, max(4 * k, 32))
        while True:
            hits = []
            for i, (seg, live, dead) in enumerate(zip(self._segments, self._lives, self._dead)):
                kk = min(want, seg.n - dead)
                if kk <= 0:
                    continue
                scores, rows = seg.search(q, kk, live)
                hits.extend((float(s), i, int(r)) for s, r in zip(scores, rows))
            best = heapq.nsmallest(want, hits, key=order)
            if flt is None:
                return best
            kept = [h for h in best if flt(self._metadata(self._segments[h[1]], h[2]))]
            if len(kept) >= k or want >= total:
                return kept[:k]
            want = min(total, want * 4)

    def _with_scores(self, q: np.ndarray, k: int, filter: Filter) -> list[tuple[Document, float]]:
        return [(self._document(self._segments[i], r), s) for s, i, r in self._top(q, k, compile_filter(filter))]

    def _mmr(self, q: np.ndarray, k: int, fetch_k: int, lambda_mult: float, filter: Filter) -> list[Document]:
        hits = self._top(q, max(k, fetch_k), compile_filter(filter))
        if not hits:
            return []
        vecs = np.stack([self._segments[i].vectors(np.array([r]))[0] for _, i, r in hits])
        to_query = vecs @ q[0]
        chosen = [0]  # hits are sorted, so the most similar comes first
        best_redundancy = vecs @ vecs[0]
        while len(chosen) < min(k, len(hits)):
            score = lambda_mult * to_query - (1.0 - lambda_mult) * best_redundancy
            score[chosen] = -np.inf
            nxt = int(np.argmax(score))
            chosen.append(nxt)
            best_redundancy = np.maximum(best_redundancy, vecs @ vecs[nxt])
        return [self._document(self._segments[hits[c][1]], hits[c][2]) for c in chosen]

    # ------------------------------------------------------------------ LangChain-style search API

    def similarity_search_with_score(
        self, query: str, k: int = 4, *, filter: Filter = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The ``k`` chunks closest to ``query`` with their cosine similarity (higher is closer)."""
        k = check_k(k)
        with self._span(kwargs.get("who")):
            return self._with_scores(self._embed_query(query), k, filter)

    def similarity_search(self, query: str, k: int = 4, *, filter: Filter = None, **kwargs: Any) -> list[Document]:
        """The ``k`` chunks closest to ``query``, closest first.

        Args:
            query: the text to look up.
            k: how many results (at most; fewer when the store holds fewer).
            filter: keep only documents whose metadata passes it: a dict in LangChain's style,
                ``{"source": "a.md"}``, ``{"year": {"$gte": 2020}}``, ``{"$or": [...]}`` (operators
                ``$eq $ne $in $nin $gt $gte $lt $lte $and $or``; see :mod:`chatkit.store.filters`),
                applied before the scan, so a selective filter is cheap; or a callable given a copy of
                the metadata (applied to candidates, fetching more until ``k`` pass).

        Raises:
            TypeError: a non-str query, a bad ``k``, a filter that is neither dict, callable nor None,
                or an operand of the wrong type.
            ValueError: ``k < 1``, or an unknown filter operator.
        """
        return [d for d, _ in self.similarity_search_with_score(query, k, filter=filter, **kwargs)]

    def similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, *, score_threshold: float | None = None, filter: Filter = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """Like :meth:`similarity_search_with_score` with scores in [0, 1], optionally thresholded."""
        pairs = [(d, relevance(s)) for d, s in self.similarity_search_with_score(query, k, filter=filter, **kwargs)]
        if score_threshold is not None:
            pairs = [(d, s) for d, s in pairs if s >= score_threshold]
        return pairs

    def similarity_search_with_score_by_vector(
        self, embedding: Sequence[float], k: int = 4, *, filter: Filter = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The ``k`` chunks closest to a vector, with cosine similarities."""
        k = check_k(k)
        with self._span(kwargs.get("who")):
            return self._with_scores(as_query_vector(embedding, self._dim), k, filter)

    def similarity_search_by_vector(
        self, embedding: Sequence[float], k: int = 4, *, filter: Filter = None, **kwargs: Any
    ) -> list[Document]:
        """The ``k`` chunks closest to a vector (of the store's dimension)."""
        return [d for d, _ in self.similarity_search_with_score_by_vector(embedding, k, filter=filter, **kwargs)]

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: Sequence[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        *,
        filter: Filter = None,
        **kwargs: Any,
    ) -> list[Document]:
        """``k`` chunks picked from the ``fetch_k`` closest for both relevance and diversity (MMR).

        ``lambda_mult`` 1 means pure relevance, 0 maximum diversity.
        """
        k, fetch_k, lambda_mult = _check_mmr(k, fetch_k, lambda_mult)
        with self._span(kwargs.get("who")):
            return self._mmr(as_query_vector(embedding, self._dim), k, fetch_k, lambda_mult, filter)

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        *,
        filter: Filter = None,
        **kwargs: Any,
    ) -> list[Document]:
        """Maximal marginal relevance search for a text query (see the ``_by_vector`` form)."""
        k, fetch_k, lambda_mult = _check_mmr(k, fetch_k, lambda_mult)
        with self._span(kwargs.get("who")):
            return self._mmr(self._embed_query(query), k, fetch_k, lambda_mult, filter)

    # ------------------------------------------------------------------ async forms (run in a worker thread)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("who", caller_label())
        if self._reads is None:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return await self._reads(fn, *args, **kwargs)

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """:meth:`similarity_search` in a worker thread (the query embedding stays off the event loop)."""
        return await self._in_thread(self.similarity_search, query, k, **kwargs)  # type: ignore[no-any-return]

    async def asimilarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_score` in a worker thread."""
        return await self._in_thread(self.similarity_search_with_score, query, k, **kwargs)  # type: ignore[no-any-return]

    async def asimilarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_relevance_scores` in a worker thread."""
        return await self._in_thread(self.similarity_search_with_relevance_scores, query, k, **kwargs)  # type: ignore[no-any-return]

    async def asimilarity_search_by_vector(self, embedding: Sequence[float], k: int = 4, **kwargs: Any) -> list[Document]:
        """:meth:`similarity_search_by_vector` in a worker thread."""
        return await self._in_thread(self.similarity_search_by_vector, embedding, k, **kwargs)  # type: ignore[no-any-return]

    async def amax_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search` in a worker thread."""
        return await self._in_thread(self.max_marginal_relevance_search, query, k, fetch_k, lambda_mult, **kwargs)  # type: ignore[no-any-return]

    async def amax_marginal_relevance_search_by_vector(
        self, embedding: Sequence[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """:meth:`max_marginal_relevance_search_by_vector` in a worker thread."""
        return await self._in_thread(
            self.max_marginal_relevance_search_by_vector, embedding, k, fetch_k, lambda_mult, **kwargs
        )  # type: ignore[no-any-return]
