"""Frozen results and statistics returned by the vector stores."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DocumentRecord", "StoreStatistics", "CompactionResult", "SOURCE_KEY", "CHUNK_KEY", "VERSION_KEY"]

# metadata keys stamped on the chunks that add_document creates
SOURCE_KEY = "source"
CHUNK_KEY = "chunk"
VERSION_KEY = "version"


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """What one ``add_document`` published.

    Attributes:
        source: the document's name (the key it is stored, replaced and removed under).
        chunks: how many chunks the text was split into.
        version: the store version at which all of them appeared, at once.
        ids: the chunk ids, in chunk order.
        replaced: how many chunks of an earlier version of this source disappeared in the same step.

    Example:
        >>> DocumentRecord("a.md", 2, 7, ("x", "y"), 0).version
        7
    """

    source: str
    chunks: int
    version: int
    ids: tuple[str, ...]
    replaced: int = 0


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """A store's shape at one version.

    Attributes:
        version: the version these figures describe.
        sources: documents added with ``add_document`` that are live.
        chunks: live rows (chunks and LangChain documents) a search can return.
        segments: immutable segments (faiss indexes) making up the version.
        dead_rows: rows hidden by tombstones, waiting for compaction to drop them.
        dim: vector dimension (``None`` until the first vector is known).

    Example:
        >>> from chatkit import CowVectorStore, HashEmbeddings
        >>> CowVectorStore(HashEmbeddings(dim=8)).statistics()
        StoreStatistics(version=0, sources=0, chunks=0, segments=0, dead_rows=0, dim=None)
    """

    version: int
    sources: int
    chunks: int
    segments: int
    dead_rows: int
    dim: int | None


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What one :meth:`~chatkit.CowVectorStore.compact` did.

    Attributes:
        merged_segments: how many segments were merged into one (0: nothing to do).
        dropped_rows: tombstoned rows removed for good.
        segments: segments in the store right after the swap.

    Example:
        >>> from chatkit import CowVectorStore, HashEmbeddings
        >>> store = CowVectorStore(HashEmbeddings(dim=8), compaction="off")
        >>> _ = store.add_texts(["a"]), store.add_texts(["b"])
        >>> store.compact()
        CompactionResult(merged_segments=2, dropped_rows=0, segments=1)
    """

    merged_segments: int
    dropped_rows: int
    segments: int
