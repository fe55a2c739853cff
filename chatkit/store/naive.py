"""The naive vector store: the teaching baseline that shows why :class:`~chatkit.CowVectorStore` exists.

It does what many tutorials do: one faiss index, mutated in place. Replacing a document removes the old
chunks one by one, then adds the new ones one by one, and yields to the event loop after each chunk
(as any ``await`` in a real pipeline would). A search that runs in between sees half a document, or
chunks of two versions of one source. Do not use it for anything but demonstrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

from .records import CHUNK_KEY, SOURCE_KEY, VERSION_KEY, DocumentRecord
from .validate import as_matrix, as_query_vector, check_content, check_k, check_metadata, check_source, check_store_config

if TYPE_CHECKING:
    from ..timeline import Timeline

__all__ = ["NaiveVectorStore"]


@dataclass(frozen=True, slots=True)
class _Row:
    source: str
    chunk: int
    version: int
    text: str
    metadata: dict[str, Any]


class NaiveVectorStore:
    """A deliberately naive store: in-place mutation, chunk by chunk, no locks, no snapshots.

    Same async document surface as :class:`~chatkit.CowVectorStore` (``aadd_document``,
    ``aremove_document``, ``similarity_search``, ``asimilarity_search``, ``sources()``, ``version``,
    ``snapshot()``), so experiments can swap them. (It has no sync writes: its point is the ``await``
    between chunks.)

    Args:
        embeddings: any LangChain ``Embeddings`` (default: the local MiniLM model). Embedding runs
            inline, on the event loop: naive too.
        chunk_size, chunk_overlap: text splitting, as in ``CowVectorStore``.
        chunk_delay: seconds to ``await asyncio.sleep`` after each chunk is removed or added (0: just
            yield to the loop). Larger values make the race visible to humans.
        timeline: record ``"embed"``, ``"write"`` and ``"search"`` spans.

    Raises:
        TypeError / ValueError: bad options or input, as for ``CowVectorStore``.

    Example:
        >>> import asyncio
        >>> from chatkit import NaiveVectorStore, HashEmbeddings
        >>> store = NaiveVectorStore(HashEmbeddings(dim=64), chunk_size=6, chunk_overlap=0)
        >>> seen = []
        >>> async def reader():
        ...     for _ in range(4):
        ...         seen.append(len(store.similarity_search("one", k=10)))
        ...         await asyncio.sleep(0)
        >>> async def main():
        ...     await asyncio.gather(reader(), store.aadd_document("a", "one.\\n\\ntwo.\\n\\nthree."))
        >>> asyncio.run(main())
        >>> seen  # the reader saw the document grow one chunk at a time
        [0, 1, 2, 3]
    """

    def __init__(
        self,
        embeddings: Embeddings | None = None,
        *,
        chunk_size: int = 500,
        chunk_overlap: int = 50,
        chunk_delay: float = 0.0,
        timeline: Timeline | None = None,
    ) -> None:
        chunk_size, chunk_overlap = check_store_config(embeddings, chunk_size, chunk_overlap)
        if isinstance(chunk_delay, bool) or not isinstance(chunk_delay, (int, float)) or not chunk_delay >= 0:
            raise ValueError(f"chunk_delay must be a number of seconds >= 0, got {chunk_delay!r}")
        self._embeddings = embeddings
        self._chunk_size, self._chunk_overlap = chunk_size, chunk_overlap
        self._chunk_delay = float(chunk_delay)
        self._timeline = timeline
        self._index: Any = None  # faiss.IndexIDMap2 over an IndexFlatIP, created on the first add
        self._rows: dict[int, _Row] = {}
        self._by_source: dict[str, list[int]] = {}
        self._next_id = 0
        self._version = 0

    @property
    def embeddings(self) -> Embeddings:
        """The embedding model (the default model is loaded on first access)."""
        if self._embeddings is None:
            from ..embeddings import default_embeddings

            self._embeddings = default_embeddings()
        return self._embeddings

    @property
    def version(self) -> int:
        """Bumped when a write *starts* (the naive way), so it says nothing about what a search sees."""
        return self._version

    def sources(self) -> list[str]:
        """Sources with at least one chunk in the index right now, sorted."""
        return sorted(s for s, ids in self._by_source.items() if ids)

    def snapshot(self) -> NaiveVectorStore:
        """Not a snapshot at all: the live store itself (this is the bug ``CowVectorStore`` fixes)."""
        return self

    def __len__(self) -> int:
        return len(self._rows)

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<NaiveVectorStore version={self._version} rows={len(self._rows)} sources={len(self.sources())}>"

    @contextlib.contextmanager
    def _span(self, phase: str, key: Any) -> Iterator[None]:
        if self._timeline is None:
            yield
            return
        with self._timeline.span(phase, key=key):
            yield

    async def _pause(self) -> None:
        await asyncio.sleep(self._chunk_delay)

    def _split(self, content: str) -> list[str]:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        splitter = RecursiveCharacterTextSplitter(chunk_size=self._chunk_size, chunk_overlap=self._chunk_overlap)
        return [c for c in splitter.split_text(content) if c.strip()]

    async def _remove_chunks(self, source: str) -> int:
        removed = 0
        for faiss_id in list(self._by_source.get(source, ())):
            if faiss_id not in self._rows:  # another writer removed it while we yielded
                continue
            self._index.remove_ids(np.array([faiss_id], dtype=np.int64))
            del self._rows[faiss_id]
            self._by_source[source].remove(faiss_id)
            removed += 1
            await self._pause()
        return removed

    async def aadd_document(self, source: str, content: str, metadata: Mapping[str, Any] | None = None) -> DocumentRecord:
        """Remove the source's old chunks one by one, then add the new ones one by one, yielding between.

        Raises:
            TypeError / ValueError: as :meth:`CowVectorStore.aadd_document`.
        """
        import faiss

        source = check_source(source)
        content = check_content(content, source)
        md = check_metadata(metadata, source)
        self._version += 1
        version = self._version
        pieces = self._split(content)
        with self._span("embed", source):
            emb = self.embeddings
            dim = None if self._index is None else int(self._index.d)
            vectors = as_matrix(emb.embed_documents(pieces), len(pieces), dim, type(emb).__name__)
        if self._index is None:
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(int(vectors.shape[1])))
        ids: list[str] = []
        with self._span("write", source):
            replaced = await self._remove_chunks(source)
            for i, (text, vec) in enumerate(zip(pieces, vectors)):
                faiss_id = self._next_id
                self._next_id += 1
                self._index.add_with_ids(vec.reshape(1, -1), np.array([faiss_id], dtype=np.int64))
                self._rows[faiss_id] = _Row(source, i, version, text, md)
                self._by_source.setdefault(source, []).append(faiss_id)
                ids.append(str(faiss_id))
                await self._pause()
        return DocumentRecord(source, len(pieces), version, tuple(ids), replaced)

    async def aremove_document(self, source: str) -> bool:
        """Remove the source's chunks one by one, yielding between; whether it had any."""
        source = check_source(source)
        self._version += 1
        with self._span("write", source):
            return await self._remove_chunks(source) > 0

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """Search the live index as it is this instant: (document, cosine similarity) pairs."""
        k = check_k(k)
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        with self._span("search", None):
            if self._index is None or self._index.ntotal == 0:
                return []
            q = as_query_vector(self.embeddings.embed_query(query), int(self._index.d))
            scores, found = self._index.search(q, min(k, int(self._index.ntotal)))
            out = []
            for score, faiss_id in zip(scores[0], found[0]):
                row = self._rows[int(faiss_id)]
                md = copy.deepcopy(row.metadata)
                md.update({SOURCE_KEY: row.source, CHUNK_KEY: row.chunk, VERSION_KEY: row.version})
                out.append((Document(id=str(faiss_id), page_content=row.text, metadata=md), float(score)))
            return out

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """The ``k`` chunks closest to ``query``, from the index as it is this instant."""
        return [d for d, _ in self.similarity_search_with_score(query, k, **kwargs)]

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """:meth:`similarity_search`, inline on the event loop (naive)."""
        return self.similarity_search(query, k, **kwargs)

    async def asimilarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """:meth:`similarity_search_with_score`, inline on the event loop (naive)."""
        return self.similarity_search_with_score(query, k, **kwargs)
