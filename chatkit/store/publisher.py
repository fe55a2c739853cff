"""The write side of :class:`~chatkit.CowVectorStore`: one reference to the current snapshot, and every
change to it (publishes and segment merges).

Invariants:

* ``state`` is replaced, never modified: readers read it once, without a lock, and keep a consistent
  version for as long as they like.
* ``_guard`` is held only to turn the current snapshot into the next one (cheap: proportional to what
  the change adds, plus a tiny bitmap copy per touched segment). Nobody embeds, merges or does I/O
  while holding it; readers never take it.
* A segment is in ``_busy`` while one merge works on it; no other merge picks it. Merges therefore work
  on disjoint segments and can run while writers keep publishing: rows tombstoned, or segments dropped,
  after a merge read its base are carried over as tombstones into the merged segment.
* Compaction never changes the version (the content is the same).
* Once ``close()`` has run, nothing publishes and no merge starts: ``state`` stays the last snapshot.
  A merge already running finishes first (``close()`` waits for it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from langchain_core.embeddings import Embeddings

from .compaction import plan_cap, plan_tiered
from .records import CompactionResult
from .segments import Segment, is_live, kill_rows, live_rows_mask, merge_segments
from .snapshot import ReadRunner, StoreSnapshot
from .workers import closed_error

if TYPE_CHECKING:
    from ..timeline import Timeline

__all__ = ["Batch", "Published", "Publisher", "Compaction"]

logger = logging.getLogger(__name__)

Compaction = Literal["background", "inline", "off"]


@dataclass(slots=True)
class Batch:
    """Rows ready to publish: validated, split, embedded (vectors normalised), indexed."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    metadatas: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    chunks: list[int | None] = field(default_factory=list)
    vectors: np.ndarray | None = None
    index: Any = None  # the faiss index for ``vectors``, built outside the guard
    by_source: dict[str, tuple[str, ...]] = field(default_factory=dict)  # source -> its chunk ids, in order
    built: Segment | None = None  # the rows as a segment (version unknown yet), built outside the guard

    def segment(self) -> Segment:
        """The batch's rows as an unpublished segment (built once; :meth:`Segment.stamped` gives it its version)."""
        if self.built is None:
            self.built = Segment(
                index=self.index,
                ids=self.ids,
                texts=self.texts,
                metadatas=self.metadatas,
                sources=self.sources,
                chunks=self.chunks,
                versions=(0,) * len(self.ids),
            )
        return self.built


@dataclass(slots=True)
class Published:
    """What one publish did."""

    version: int
    replaced: Counter[str]
    merge: tuple[Segment, ...] | None  # segments this writer must merge (hard cap), already marked busy


def _live_in(state: StoreSnapshot, seg: Segment) -> np.ndarray | None:
    """``seg``'s live bitmap in ``state``; all-dead when a writer has dropped the segment (every row dead)."""
    for s, live in zip(state.segments, state.lives):
        if s is seg:
            return live
    return np.zeros((seg.n + 7) // 8, dtype=np.uint8)


def _distinct(rows: np.ndarray) -> np.ndarray:
    """Sorted distinct rows (``np.unique`` imports a module on first use, which would cost the first
    publish tens of milliseconds under the guard)."""
    rows = np.sort(rows)
    keep = np.empty(len(rows), dtype=bool)
    keep[:1] = True
    np.not_equal(rows[1:], rows[:-1], out=keep[1:])
    return rows[keep]


class Publisher:
    """Owns a store's current snapshot and publishes changes to it by swapping the reference.

    Example:
        >>> from chatkit import HashEmbeddings
        >>> pub = Publisher(embedder=lambda: HashEmbeddings(dim=8), compaction="off")
        >>> pub.state.version, pub.publish(None, kill_ids=["nothing"])
        (0, None)
    """

    def __init__(
        self,
        *,
        embedder: Callable[[], Embeddings],
        compaction: Compaction = "background",
        merge_factor: int = 4,
        max_segments: int = 32,
        timeline: Timeline | None = None,
        reads: ReadRunner | None = None,
    ) -> None:
        self._embedder = embedder
        self._compaction: Compaction = compaction
        self._merge_factor = merge_factor
        self._max_segments = max_segments
        self._timeline = timeline
        self._reads = reads
        self._guard = threading.Lock()
        self._changed = threading.Condition(self._guard)  # notified when merges finish
        self._busy: set[Segment] = set()  # segments some merge is working on
        self._compactor: threading.Thread | None = None
        self._closed = False
        self.state: StoreSnapshot = self.new_state(0, None, [], [])

    @property
    def compaction(self) -> Compaction:
        """The automatic compaction mode."""
        return self._compaction

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        return (
            f"<Publisher version={self.state.version} busy={len(self._busy)} compactor={self._compactor is not None}"
            f"{' closed' if self._closed else ''}>"
        )

    @contextlib.contextmanager
    def _span(self, phase: str) -> Iterator[None]:
        if self._timeline is None:
            yield
            return
        with self._timeline.span(phase):
            yield

    def new_state(
        self,
        version: int,
        dim: int | None,
        segments: list[Segment],
        lives: list[np.ndarray | None],
        dead: list[int] | None = None,
    ) -> StoreSnapshot:
        """A snapshot sharing this publisher's embeddings and timeline."""
        return StoreSnapshot(
            version=version,
            dim=dim,
            segments=segments,
            lives=lives,
            embedder=self._embedder,
            timeline=self._timeline,
            dead=dead,
            reads=self._reads,
        )

    def publish(
        self,
        batch: Batch | None,
        *,
        kill_sources: Sequence[str] = (),
        kill_ids: Sequence[str] = (),
        clear: bool = False,
    ) -> Published | None:
        """Swap in the next snapshot: ``batch``'s rows appear and the rows of ``kill_sources`` /
        ``kill_ids`` (or all rows, ``clear``) disappear, in one step. ``None`` when nothing changed.

        Raises:
            RuntimeError: the publisher is closed.
            ValueError: the batch's vectors have another dimension than the store's.
        """
        with self._guard:
            if self._closed:
                raise closed_error("a write")
            cur = self.state
            dim = cur.dim
            adding = batch is not None and len(batch.ids) > 0
            if adding:
                assert batch is not None and batch.vectors is not None
                if dim is not None and batch.vectors.shape[1] != dim:
                    raise ValueError(
                        f"the embeddings returned {batch.vectors.shape[1]}-d vectors but the store holds {dim}-d vectors"
                    )
                dim = int(batch.vectors.shape[1])
            replaced: Counter[str] = Counter()
            kill_set = set(kill_sources) if len(kill_sources) > 8 else frozenset(kill_sources)
            kill_id_set = set(kill_ids) if kill_ids and len(kill_ids) > len(cur.segments) else frozenset()
            segments: list[Segment] = []
            lives: list[np.ndarray | None] = []
            deads: list[int] = []
            changed = False
            for seg, live, dead in zip(cur.segments, cur.lives, cur._dead):
                if clear:
                    changed = True
                    continue
                doomed: list[np.ndarray] = []
                # look the smaller side up in the larger: a 4,000-source batch against small segments
                # (or one source against a big one) costs what the smaller side holds
                if len(kill_sources) <= len(seg.source_rows):
                    touched = [s for s in kill_sources if s in seg.source_rows]
                else:
                    touched = [s for s in seg.source_rows if s in kill_set]
                for source in touched:
                    rows = seg.source_rows.get(source)
                    if rows is not None:
                        rows = rows[is_live(live, rows)]
                        if rows.size:
                            doomed.append(rows)
                            replaced[source] += int(rows.size)
                if kill_ids:
                    if len(kill_ids) <= seg.n:
                        found = [r for r in map(seg.id_to_row.get, kill_ids) if r is not None]
                    else:
                        found = [r for i, r in seg.id_to_row.items() if i in kill_id_set]
                    if found:
                        rows = _distinct(np.array(found, dtype=np.int64))  # delete() may repeat an id
                        rows = rows[is_live(live, rows)]
                        if rows.size:
                            doomed.append(rows)
                if doomed:
                    changed = True
                    rows = doomed[0] if len(doomed) == 1 else _distinct(np.concatenate(doomed))
                    dead += len(rows)
                    if dead == seg.n:
                        continue  # every row dead: drop the whole segment now
                    live = kill_rows(live, seg.n, rows)
                segments.append(seg)
                lives.append(live)
                deads.append(dead)
            if adding:
                assert batch is not None
                segments.append(batch.segment().stamped(cur.version + 1))
                lives.append(None)
                deads.append(0)
            elif not changed:
                return None
            self.state = self.new_state(cur.version + 1, dim, segments, lives, deads)
            merge = self._schedule_locked()
            return Published(version=cur.version + 1, replaced=replaced, merge=merge)

    # ------------------------------------------------------------------ compaction

    def _sizes_locked(self) -> tuple[list[int], list[int], list[bool]]:
        s = self.state
        return [seg.n for seg in s.segments], list(s._dead), [seg in self._busy for seg in s.segments]

    def _schedule_locked(self) -> tuple[Segment, ...] | None:
        """After a publish: start the background compactor if due; return segments the writer must merge."""
        if self._compaction == "off" or self._closed:
            return None
        sizes, dead, busy = self._sizes_locked()
        cap = plan_cap(sizes, dead, busy, max_segments=self._max_segments)
        if cap is not None:
            segs = tuple(self.state.segments[i] for i in cap)
            self._busy.update(segs)
            return segs
        if self._compaction == "background" and self._compactor is None:
            if plan_tiered(sizes, dead, busy, factor=self._merge_factor) is not None:
                self._compactor = threading.Thread(target=self._compact_loop, name="chatkit-compactor", daemon=True)
                self._compactor.start()
        return None

    def _plan_locked(self) -> tuple[Segment, ...] | None:
        if self._closed:
            return None
        sizes, dead, busy = self._sizes_locked()
        plan = plan_tiered(sizes, dead, busy, factor=self._merge_factor)
        if plan is None:
            return None
        segs = tuple(self.state.segments[i] for i in plan)
        self._busy.update(segs)
        return segs

    def _compact_loop(self) -> None:
        """The background compactor: merge what the tiered policy asks for until nothing is due."""
        while True:
            with self._guard:
                segs = self._plan_locked()
                if segs is None:
                    self._compactor = None
                    self._changed.notify_all()
                    return
            try:
                self._merge(segs)
            except Exception:  # never let a merge failure kill writers; the store stays valid
                logger.exception("background compaction failed; the store is unchanged")
                with self._guard:
                    self._compactor = None
                    self._changed.notify_all()
                return

    def run_merges(self, first: tuple[Segment, ...] | None) -> None:
        """Merge ``first`` (already marked busy), then, in ``"inline"`` mode, whatever else is due.

        A failed merge is logged, not raised: the write that owed it was published, and the store stays
        valid (the segments are merged later).
        """
        segs = first
        while True:
            if segs is not None:
                try:
                    self._merge(segs)
                except Exception:
                    logger.exception("compaction after a write failed; the store is unchanged")
                    return
            if self._compaction != "inline":
                return
            with self._guard:
                segs = self._plan_locked()
            if segs is None:
                return

    def release(self, segs: tuple[Segment, ...] | None) -> None:
        """Unmark segments marked busy for a merge that will never run (its job was dropped)."""
        if not segs:
            return
        with self._guard:
            self._busy.difference_update(segs)
            self._changed.notify_all()

    def _merge(self, segs: tuple[Segment, ...]) -> CompactionResult:
        """Merge ``segs`` (marked busy by the caller) into one segment and swap it in; unmark them.

        Writers keep publishing meanwhile: rows they tombstone in ``segs`` (or whole segments they drop)
        after the merge read its base are carried over as tombstones in the merged segment.
        """
        try:
            if self._closed:  # a closed store keeps its last snapshot
                return CompactionResult(merged_segments=0, dropped_rows=0, segments=len(self.state.segments))
            with self._span("compact"):
                base = self.state
                base_lives = [_live_in(base, s) for s in segs]
                merged, remaps = merge_segments(segs, base_lives)  # the slow part, outside the guard
                if merged is not None:  # filters keep their speed: index the fields the inputs had indexed
                    keys = {key for seg in segs if seg._fields is not None for key in seg._fields.indexed()}
                    for key in sorted(keys):
                        merged.fields().column(key)
                with self._guard:
                    cur = self.state
                    if self._closed:
                        return CompactionResult(merged_segments=0, dropped_rows=0, segments=len(cur.segments))
                    merged_live: np.ndarray | None = None
                    if merged is not None:
                        for seg, old_live, remap in zip(segs, base_lives, remaps):
                            new_live = _live_in(cur, seg)
                            if new_live is old_live:
                                continue
                            rows = remap[live_rows_mask(old_live, seg.n) & ~live_rows_mask(new_live, seg.n)]
                            if rows.size:
                                merged_live = kill_rows(merged_live, merged.n, rows)
                    keep_merged = merged is not None and (merged_live is None or bool(merged_live.any()))
                    doomed = {id(s) for s in segs}
                    positions = [i for i, s in enumerate(cur.segments) if id(s) in doomed]
                    first = min(positions) if positions else len(cur.segments)
                    segments: list[Segment] = []
                    lives: list[np.ndarray | None] = []
                    for i, (seg, live) in enumerate([*zip(cur.segments, cur.lives), (None, None)]):
                        if i == first and keep_merged:
                            assert merged is not None
                            segments.append(merged)
                            lives.append(merged_live)
                        if seg is not None and id(seg) not in doomed:
                            segments.append(seg)
                            lives.append(live)
                    self.state = self.new_state(cur.version, cur.dim, segments, lives)
                    dropped = sum(s.n for s in segs) - (merged.n if keep_merged and merged is not None else 0)
                    return CompactionResult(merged_segments=len(segs), dropped_rows=dropped, segments=len(segments))
        finally:
            with self._guard:
                self._busy.difference_update(segs)
                self._changed.notify_all()

    def compact(self) -> CompactionResult:
        """Merge every segment into one and drop tombstoned rows; publish by swap (the version stays).

        Waits for merges already running. Readers are never blocked; writers keep publishing meanwhile
        (their new segments are not part of this merge).
        """
        with self._guard:
            if self._closed:
                raise closed_error("compact()")
            self._changed.wait_for(lambda: not self._busy)
            if self._closed:
                raise closed_error("compact()")
            s = self.state
            if len(s.segments) == 0 or (len(s.segments) == 1 and s._dead[0] == 0):
                return CompactionResult(merged_segments=0, dropped_rows=0, segments=len(s.segments))
            segs = tuple(s.segments)
            self._busy.update(segs)
        return self._merge(segs)

    def wait_for_compaction(self, timeout: float | None = None) -> bool:
        """Block until no merge is running or due in the background; ``False`` if ``timeout`` expired."""
        with self._guard:
            return self._changed.wait_for(lambda: self._compactor is None and not self._busy, timeout)

    def close(self) -> None:
        """Publish nothing more and start no merge; wait for the background compactor to finish the merge
        it is running (if any) and end. Merges owed by writers are the caller's to drop or finish."""
        with self._guard:
            self._closed = True
            compactor = self._compactor
        if compactor is not None and compactor is not threading.current_thread():
            compactor.join()
