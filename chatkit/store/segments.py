"""Immutable segments: a faiss ``IndexFlatIP`` over L2-normalised vectors plus the rows' payload.

Invariants:

* A segment is never changed after it is built: not its index, not its rows. Deleting a row means a new
  *live bitmap* for the segment in the next snapshot (a tombstone), never ``remove_ids``.
* Rows are addressed by their position in the segment (0..n-1), which is also their faiss id.
* A live bitmap is a read-only ``uint8`` array, bit ``r`` (little-endian within each byte) set when row
  ``r`` is live; ``None`` means every row is live. Writers copy it (n/8 bytes) and clear bits.
* Derived structures (the metadata field index used by filters, :meth:`Segment.fields`) are built from
  the rows on first use and cached on the segment; nothing derived is ever persisted.

faiss is imported inside functions, so importing this module stays light.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from .filters import SegmentFields

__all__ = ["Segment", "build_index", "live_rows_mask", "is_live", "kill_rows", "count_live", "merge_segments"]

# a row-restricted search scores up to this many rows directly (numpy), whatever the segment's size
DIRECT_ROWS = 1024
# ... and searches without a selector, over-fetching, when at least this fraction of the rows qualifies
BROAD_FRACTION = 0.1


def build_index(vectors: np.ndarray) -> Any:
    """A new ``faiss.IndexFlatIP`` holding ``vectors`` (float32, C-contiguous, rows L2-normalised)."""
    import faiss

    index = faiss.IndexFlatIP(int(vectors.shape[1]))
    if len(vectors):
        index.add(vectors)
    return index


class Segment:
    """One immutable batch of rows (see the module docstring).

    Attributes:
        uid: a random hex name, used for file names when saved.
        index: the faiss index; row ``r`` is faiss id ``r``.
        ids, texts, metadatas: the documents' ids, contents and metadata as given (never mutated).
        sources, chunks: for chunks made by ``add_document``: the source and chunk number; else ``None``.
        versions: the store version each row was published at.
        id_to_row: document id -> row.
        source_rows: source -> its rows, as an int64 array.
    """

    __slots__ = (
        "uid",
        "index",
        "ids",
        "texts",
        "metadatas",
        "sources",
        "chunks",
        "versions",
        "id_to_row",
        "source_rows",
        "_fields",
    )

    def __init__(
        self,
        *,
        index: Any,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
        sources: Sequence[str | None],
        chunks: Sequence[int | None],
        versions: Sequence[int],
        uid: str | None = None,
    ) -> None:
        n = int(index.ntotal)
        if not (n == len(ids) == len(texts) == len(metadatas) == len(sources) == len(chunks) == len(versions)):
            raise ValueError("a segment needs exactly one id, text, metadata, source, chunk and version per vector")
        self.uid = uid or secrets.token_hex(16)
        self.index = index
        self.ids = tuple(ids)
        self.texts = tuple(texts)
        self.metadatas = tuple(metadatas)
        self.sources = tuple(sources)
        self.chunks = tuple(chunks)
        self.versions = tuple(versions)
        self.id_to_row: dict[str, int] = {doc_id: row for row, doc_id in enumerate(self.ids)}
        if len(self.id_to_row) != n:
            raise ValueError("a segment's document ids must be unique")
        grouped: dict[str, list[int]] = {}
        for row, source in enumerate(self.sources):
            if source is not None:
                grouped.setdefault(source, []).append(row)
        self.source_rows: dict[str, np.ndarray] = {s: np.array(r, dtype=np.int64) for s, r in grouped.items()}
        self._fields: SegmentFields | None = None

    def fields(self) -> SegmentFields:
        """The metadata field index of this segment (built per field on first use, then cached)."""
        fields = self._fields
        if fields is None:
            fields = self._fields = SegmentFields(self)
        return fields

    def stamped(self, version: int) -> Segment:
        """A segment with these very rows (shared, not copied), all published at ``version``: what a
        write builds off the publish path before its version is known."""
        seg = object.__new__(Segment)
        for name in Segment.__slots__:
            setattr(seg, name, getattr(self, name))
        seg.versions = (version,) * self.n
        seg._fields = None
        return seg

    @property
    def n(self) -> int:
        """The number of rows, live or not."""
        return len(self.ids)

    @property
    def dim(self) -> int:
        """The vector dimension."""
        return int(self.index.d)

    def __repr__(self) -> str:
        return f"<Segment {self.uid[:8]} rows={self.n} dim={self.dim}>"

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """A copy of the vectors of ``rows`` (all rows when ``None``), shape (len(rows), dim)."""
        import faiss

        n, d = self.n, self.dim
        if n == 0:
            return np.zeros((0, d), dtype=np.float32)
        # zero-copy view of the index's own storage; valid while self.index lives, so copy before returning
        view = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d)
        return view.copy() if rows is None else view[rows]

    def search(self, query: np.ndarray, k: int, live: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best live rows for one (1, dim) query: (scores, rows), best first."""
        import faiss

        if live is None:
            scores, rows = self.index.search(query, k)
        else:
            selector = faiss.IDSelectorBitmap(len(live), faiss.swig_ptr(live))
            scores, rows = self.index.search(query, k, params=faiss.SearchParameters(sel=selector))
        found = rows[0] >= 0
        return scores[0][found], rows[0][found]

    def search_rows(self, query: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows among those set in the bool array ``mask`` (length ``n``): (scores, rows).

        Only qualifying rows are scored when few qualify (numpy, or a faiss ``IDSelectorBitmap``); when
        many do (at least ``BROAD_FRACTION``), a plain search over-fetches and drops the others, falling
        back to the selector if that left fewer than ``k``. Ties are broken by row number, like faiss.
        """
        import faiss

        rows = np.flatnonzero(mask)
        count = len(rows)
        if count == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        k = min(k, count)
        if count <= DIRECT_ROWS:
            scores = self.vectors(rows) @ query[0]
            if k < count:
                best = np.argpartition(-scores, k - 1)[:k]
                scores, rows = scores[best], rows[best]
            order = np.lexsort((rows, -scores))
            return scores[order], rows[order]
        if count >= BROAD_FRACTION * self.n:
            fetch = min(self.n, 2 * int(math.ceil(k * self.n / count)) + 16)
            scores, found = self.index.search(query, fetch)
            keep = found[0] >= 0
            keep[keep] = mask[found[0][keep]]
            if keep.sum() >= k or fetch >= self.n:
                return scores[0][keep][:k], found[0][keep][:k]
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bitmap))
        scores, found = self.index.search(query, k, params=faiss.SearchParameters(sel=selector))
        ok = found[0] >= 0
        return scores[0][ok], found[0][ok]


def live_rows_mask(live: np.ndarray | None, n: int) -> np.ndarray:
    """A bool array of length ``n``: which rows are live."""
    if live is None:
        return np.ones(n, dtype=bool)
    return np.unpackbits(live, count=n, bitorder="little").astype(bool)


def is_live(live: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """A bool array: which of ``rows`` are live."""
    if live is None:
        return np.ones(len(rows), dtype=bool)
    return ((live[rows >> 3] >> (rows & 7).astype(np.uint8)) & 1).astype(bool)


def kill_rows(live: np.ndarray | None, n: int, rows: np.ndarray) -> np.ndarray:
    """A new read-only live bitmap equal to ``live`` with ``rows`` cleared (``live`` is not changed)."""
    if live is None:
        new = np.packbits(np.ones(n, dtype=bool), bitorder="little")
    else:
        new = live.copy()
    np.bitwise_and.at(new, rows >> 3, ~(np.uint8(1) << (rows & 7).astype(np.uint8)))
    new.flags.writeable = False
    return new


def count_live(live: np.ndarray | None, n: int) -> int:
    """How many rows are live."""
    if live is None:
        return n
    return int(np.unpackbits(live, count=n, bitorder="little").sum())


def merge_segments(
    segments: Sequence[Segment], lives: Sequence[np.ndarray | None]
) -> tuple[Segment | None, list[np.ndarray]]:
    """One new segment holding the live rows of ``segments``, and, per input segment, an int64 array
    mapping each old row to its new row (-1 for rows dropped). ``None`` when no row is live."""
    pieces: list[np.ndarray] = []
    remaps: list[np.ndarray] = []
    ids: list[str] = []
    texts: list[str] = []
    metadatas: list[dict[str, Any]] = []
    sources: list[str | None] = []
    chunks: list[int | None] = []
    versions: list[int] = []
    offset = 0
    for seg, live in zip(segments, lives, strict=True):
        mask = live_rows_mask(live, seg.n)
        rows = np.flatnonzero(mask)
        remap = np.full(seg.n, -1, dtype=np.int64)
        remap[rows] = np.arange(offset, offset + len(rows), dtype=np.int64)
        remaps.append(remap)
        offset += len(rows)
        if len(rows):
            pieces.append(seg.vectors(rows))
            for r in rows.tolist():
                ids.append(seg.ids[r])
                texts.append(seg.texts[r])
                metadatas.append(seg.metadatas[r])
                sources.append(seg.sources[r])
                chunks.append(seg.chunks[r])
                versions.append(seg.versions[r])
    if offset == 0:
        return None, remaps
    vectors = np.ascontiguousarray(np.concatenate(pieces))
    merged = Segment(
        index=build_index(vectors),
        ids=ids,
        texts=texts,
        metadatas=metadatas,
        sources=sources,
        chunks=chunks,
        versions=versions,
    )
    return merged, remaps
