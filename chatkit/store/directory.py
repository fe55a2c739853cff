"""One directory, one writer, many readers: the versions of a saved store and who may touch them.

The model is Lucene's (commit points, a write lock, a deletion policy) and LanceDB's (versioned
manifests): a directory holds immutable segment files and one write-once manifest per saved version.

Layout::

    writer.lock                 the writer's lock file (an OS lock: it dies with its process); never deleted
    manifest-000000000007.json  version (generation) 7: which segments, which of their rows are dead
    seg-<uid>.faiss, .json      immutable segment files, shared by every version that lists them
    *.tmp-<16 hex>              debris of an interrupted save (the next writer removes it)

Rules:

* **One writer.** :class:`DirectoryWriter` holds ``writer.lock`` (``flock`` through the ``filelock``
  package) from opening to :meth:`~DirectoryWriter.release`; a second writer, in any process, waits up
  to its timeout and gets :class:`~chatkit.DirectoryLocked`. The kernel drops the lock when the holder
  dies, so a SIGKILLed writer never leaves the directory stuck.
* **Incremental, crash-safe commits.** A save writes the files of segments that are not on disk yet
  (temp file, fsync, rename), fsyncs the directory, then writes the next generation's manifest the same
  way. A version exists once its manifest is renamed into place; before that, the previous newest one
  is what every reader sees.
* **Readers pin what they read.** :func:`read_version` opens the newest manifest and takes a *shared*
  ``flock`` on it while it reads the version's files. The writer deletes an old manifest only after
  taking an *exclusive* ``flock`` on it without waiting (a pinned version is skipped and tried again at
  the next save), unlinks it while holding that lock, and deletes segment files only when no remaining
  manifest lists them. A reader that opened a manifest just before it was unlinked sees, once its pin is
  granted, a link count of 0 and starts over with the newest. So no reader ever misses a file. A loaded
  version lives in memory: readers need no file after loading it.
* **Retention.** Besides pinned versions, the writer keeps the newest ``keep_versions`` versions and
  every version superseded less than ``keep_seconds`` ago (by the ``saved_at`` time of the version that
  replaced it): a margin for readers on file systems where ``flock`` is not shared between machines.

Pins and the lock need a local POSIX file system (``flock``); on a platform without ``fcntl`` pins are
not taken and retention alone protects readers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DirectoryLocked
from . import files
from .persist import (
    FORMAT,
    Manifest,
    SegmentEntry,
    dead_rows,
    encode_manifest,
    generation_of,
    live_bitmap,
    manifest_name,
    parse_manifest,
    read_segment,
    write_segment,
)
from .segments import Segment

if TYPE_CHECKING:
    from filelock import BaseFileLock

    from .snapshot import StoreSnapshot

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no pins, retention alone protects readers
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_FILE",
    "Retention",
    "SavedVersion",
    "LoadedVersion",
    "Followed",
    "DirectoryWriter",
    "generations",
    "read_version",
]

logger = logging.getLogger(__name__)

LOCK_FILE = "writer.lock"
READ_ATTEMPTS = 100  # a reader starts over when the newest version vanished under it; this many times at most

_SEGMENT_FILE = re.compile(r"seg-[0-9a-f]{32}\.(faiss|json)")
_DEBRIS = re.compile(r"(seg-[0-9a-f]{32}\.(faiss|json)|manifest-\d{12}\.json)\.tmp-[0-9a-f]{16}")


Reusable = tuple[SegmentEntry, Segment, tuple[int, ...]]
"""A segment a reader holds: its manifest entry, the segment, and its dead rows in the version read."""


@dataclass(frozen=True, slots=True)
class Retention:
    """Which superseded versions a writer keeps on disk (versions a reader is loading are always kept).

    Attributes:
        keep_versions: the newest this many versions are kept (at least 1: the current one).
        keep_seconds: a version replaced less than this many seconds ago is kept.

    Raises:
        TypeError / ValueError: a value of the wrong type or out of range (named).
    """

    keep_versions: int = 2
    keep_seconds: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.keep_versions, bool) or not isinstance(self.keep_versions, int):
            raise TypeError(f"keep_versions must be an int, got {self.keep_versions!r}")
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {self.keep_versions}")
        if isinstance(self.keep_seconds, bool) or not isinstance(self.keep_seconds, (int, float)):
            raise TypeError(f"keep_seconds must be a number of seconds, got {self.keep_seconds!r}")
        if not math.isfinite(self.keep_seconds) or self.keep_seconds < 0:
            raise ValueError(f"keep_seconds must be finite and at least 0, got {self.keep_seconds!r}")


@dataclass(frozen=True, slots=True)
class SavedVersion:
    """What one :meth:`~chatkit.CowVectorStore.save` made durable.

    Attributes:
        directory: the store directory.
        generation: the saved version's number in the directory (its manifest is
            ``manifest-<generation>.json``); +1 per save.
        version: the store version it holds (:attr:`~chatkit.CowVectorStore.version`).
        segments: segments it lists.
        segments_written: of those, how many were written by this save (the others were on disk already).
        bytes_written: bytes of segment files written (the manifest not counted).
        versions_removed: superseded versions this save deleted (retention).
    """

    directory: Path
    generation: int
    version: int
    segments: int
    segments_written: int
    bytes_written: int
    versions_removed: int

    @property
    def manifest(self) -> Path:
        """The manifest file of this version."""
        return self.directory / manifest_name(self.generation)


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    """A version read from a directory, checked: its manifest and the segments it lists."""

    manifest: Manifest
    segments: tuple[Segment, ...]
    lives: tuple[np.ndarray | None, ...]

    @property
    def generation(self) -> int:
        """The version's number in the directory."""
        return self.manifest.generation

    @property
    def version(self) -> int:
        """The store version it holds."""
        return self.manifest.version

    @property
    def dim(self) -> int | None:
        """The vector dimension (``None``: nothing was ever added)."""
        return self.manifest.dim

    def reusable(self) -> dict[str, Reusable]:
        """What a later :func:`read_version` need not read again."""
        m = self.manifest
        return {e.uid: (e, s, dead) for e, s, dead in zip(m.segments, self.segments, m.dead)}


@dataclass(frozen=True, slots=True)
class Followed:
    """What a reader store loaded last: from where, which generation (-1: none) and store version, and
    the segments a refresh need not read again."""

    root: Path
    generation: int
    version: int
    reuse: Mapping[str, Reusable]


# ---------------------------------------------------------------------- pins (flock on a manifest)


def _pin(fd: int) -> None:
    """Take a shared lock on an open manifest (waits only while the writer is deleting that manifest)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)


def _try_exclusive(fd: int) -> bool:
    """Take an exclusive lock on an open manifest without waiting; ``False`` when a reader pins it."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _remove_unpinned(path: Path) -> bool:
    """Delete the manifest ``path`` unless a reader pins it; whether it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return True
    except OSError:  # a link or something stranger where a manifest should be: not ours to keep
        files.remove(path)
        return True
    try:
        if not _try_exclusive(fd):
            return False
        files.remove(path)  # unlinked while we hold the lock: a reader pinning it next sees st_nlink == 0
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- reading


def generations(root: Path) -> list[int]:
    """The generations whose manifests are in ``root``, oldest first.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no saved store at {root}: not a directory") from None
    return sorted(g for g in map(generation_of, names) if g is not None)


def _build(root: Path, manifest: Manifest, reuse: Mapping[str, Reusable]) -> LoadedVersion:
    """The segments ``manifest`` lists (read, or taken from ``reuse``), checked: no id live twice."""
    where = root / manifest_name(manifest.generation)
    segments: list[Segment] = []
    lives: list[np.ndarray | None] = []
    fresh: list[int] = []  # positions of the segments read now
    only_more_dead = True  # every reused segment lost rows since it was read, none came back
    for i, (entry, dead) in enumerate(zip(manifest.segments, manifest.dead)):
        known = reuse.get(entry.uid)
        if known is not None and known[0] == entry:
            seg = known[1]  # immutable, checked when it was read: no need to read it again
            only_more_dead = only_more_dead and set(known[2]) <= set(dead)
        else:
            assert manifest.dim is not None
            seg = read_segment(root, entry, manifest.dim, manifest.version, f"{where}, segment {i}")
            fresh.append(i)
        segments.append(seg)
        lives.append(live_bitmap(dead, entry.count))
    if only_more_dead and len(fresh) < len(segments):
        # the reused segments had no id live twice and lost rows only: check the new segments' live ids
        # against every other segment (a dict lookup each), not all ids of the version
        for i in fresh:
            seg, dead = segments[i], set(manifest.dead[i])
            for r, doc_id in enumerate(seg.ids):
                if r in dead:
                    continue
                for j, other in enumerate(segments):
                    row = other.id_to_row.get(doc_id)
                    if j != i and row is not None and row not in manifest.dead[j]:
                        raise ValueError(f"saved store {root} is corrupt: document id {doc_id!r} is live twice in {where}")
    else:
        live_ids: set[str] = set()
        for seg, dead in zip(segments, manifest.dead):
            ids = set(seg.ids).difference(seg.ids[r] for r in dead) if dead else seg.ids  # unique per segment
            if not live_ids.isdisjoint(ids):
                doc_id = next(x for x in ids if x in live_ids)
                raise ValueError(f"saved store {root} is corrupt: document id {doc_id!r} is live twice in {where}")
            live_ids.update(ids)
    return LoadedVersion(manifest=manifest, segments=tuple(segments), lives=tuple(lives))


def read_version(
    directory: str | os.PathLike[str],
    *,
    newer_than: int | None = None,
    reuse: Mapping[str, Reusable] | None = None,
) -> LoadedVersion | None:
    """Read the newest complete version in ``directory``, pinned while it is read; ``None`` when it is
    not newer than generation ``newer_than``. Segments in ``reuse`` (same uid and checksums) are not
    read again.

    Raises:
        FileNotFoundError: no saved store there (no directory, no manifest), or a file it lists is missing
            (a directory damaged by hand: the writer never deletes the files of a version being read).
        ValueError: a corrupt or unsafe manifest or file (the message names it).
        TimeoutError: the newest version vanished under the reader :data:`READ_ATTEMPTS` times in a row.
    """
    root = Path(directory)
    for _ in range(READ_ATTEMPTS):
        gens = generations(root)
        if not gens:
            raise FileNotFoundError(f"no saved store at {root}: no manifest")
        newest = gens[-1]
        if newer_than is not None and newest <= newer_than:
            return None
        path = root / manifest_name(newest)
        try:
            fd = files.open_regular(path)
        except FileNotFoundError:
            continue  # replaced and deleted since we listed the directory
        try:
            _pin(fd)
            if os.fstat(fd).st_nlink == 0:
                continue  # the writer unlinked it before our pin was granted
            manifest = parse_manifest(files.read_fd(fd), path, newest)
            return _build(root, manifest, reuse or {})
        finally:
            os.close(fd)  # drops the pin
    raise TimeoutError(
        f"could not read a version of {root}: the newest one was deleted under the reader {READ_ATTEMPTS} times; "
        "give the writer a larger keep_seconds"
    )


# ---------------------------------------------------------------------- the writer


@dataclass(frozen=True, slots=True)
class _OnDisk:
    """A version on disk as the writer tracks it: when it was saved, and the segment files it needs
    (``None``: its manifest could not be read, so no segment file may be deleted while it exists)."""

    saved_at: float | None
    files: frozenset[str] | None


def _owner(fd: int) -> None:
    """filelock's ``on_acquired``: note who holds the lock, for the error message of the next writer."""
    note = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, note)


class DirectoryWriter:
    """The one writer of a store directory: holds its lock, commits versions, deletes old ones.

    Args:
        directory: created if missing.
        timeout: seconds to wait for another writer to let go (``None``: forever; 0: not at all).
        retention: which superseded versions to keep.
        clock: wall-clock time (``saved_at`` and retention ages); tests pass a fake one.

    Raises:
        DirectoryLocked: another writer (any process) holds the directory past ``timeout``.
        ValueError: the directory holds a ``manifest.json`` that is not a chatkit store's.

    Example:
        >>> import tempfile
        >>> from chatkit import CowVectorStore, HashEmbeddings
        >>> from chatkit.store.directory import DirectoryWriter
        >>> d = tempfile.mkdtemp()
        >>> writer = DirectoryWriter(d)
        >>> writer.commit(CowVectorStore(HashEmbeddings(dim=8)).snapshot()).generation
        1
        >>> writer  # doctest: +ELLIPSIS
        <DirectoryWriter '...' generation=1 on_disk=[1] keep_versions=2 keep_seconds=60.0 locked=True>
        >>> writer.release()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        timeout: float | None = 0.0,
        retention: Retention | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from filelock import FileLock, Timeout

        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
            raise TypeError(f"lock_timeout must be a number of seconds or None, got {timeout!r}")
        if timeout is not None and (math.isnan(timeout) or timeout < 0):
            raise ValueError(f"lock_timeout must be at least 0 (or None to wait forever), got {timeout!r}")
        self._retention = retention or Retention()
        self._clock = clock
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self._root = root.resolve()
        lock = FileLock(
            self._root / LOCK_FILE,
            timeout=-1 if timeout is None else timeout,
            thread_local=False,  # taken by one thread (a save in a worker), released by another (close)
            fallback_to_soft=False,  # a soft lock would outlive a killed writer
            preserve_lock_file=True,  # deleting a flock'ed file lets two holders lock two different files
            on_acquired=_owner,
        )
        started = time.monotonic()
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = (self._root / LOCK_FILE).read_text(errors="replace").strip()
            except OSError:
                holder = ""
            raise DirectoryLocked(self._root, holder=holder, waited=time.monotonic() - started) from None
        self._lock: BaseFileLock | None = lock
        self._on_disk: dict[int, _OnDisk] = {}
        self._entries: dict[str, SegmentEntry] = {}  # segments of the newest version: on disk, reusable
        self._newest: Manifest | None = None
        self._generation = 0
        self._version = 0
        self._last: tuple[StoreSnapshot, SavedVersion] | None = None
        self._stale = False  # a commit failed: learn what is on disk again before the next one
        try:
            self._scan()
            self._collect_logged()  # debris of a writer that crashed, versions retention lets go
        except BaseException:
            self.release()
            raise

    # ------------------------------------------------------------------ state

    @property
    def root(self) -> Path:
        """The directory (resolved)."""
        return self._root

    @property
    def generation(self) -> int:
        """The newest generation on disk (0: none, or chatkit 0.1's ``manifest.json``)."""
        return self._generation

    @property
    def has_versions(self) -> bool:
        """Whether the directory holds a saved version."""
        return bool(self._on_disk)

    @property
    def retention(self) -> Retention:
        """Which superseded versions this writer keeps."""
        return self._retention

    @property
    def locked(self) -> bool:
        """Whether this writer still holds the directory."""
        return self._lock is not None

    def is_for(self, directory: str | os.PathLike[str]) -> bool:
        """Whether ``directory`` is this writer's directory."""
        return Path(directory).resolve() == self._root

    def __repr__(self) -> str:
        return (
            f"<DirectoryWriter {str(self._root)!r} generation={self._generation} on_disk={sorted(self._on_disk)}"
            f" keep_versions={self._retention.keep_versions} keep_seconds={self._retention.keep_seconds}"
            f" locked={self.locked}>"
        )

    def release(self) -> None:
        """Let go of the directory (idempotent). The kernel does the same if the process dies."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release(force=True)

    def _check_locked(self) -> None:
        if self._lock is None:
            raise RuntimeError(f"this writer released {self._root}; open the directory again to write to it")

    # ------------------------------------------------------------------ reading what is on disk

    def _scan(self) -> None:
        """Learn the versions on disk from their manifests (no segment file is read)."""
        self._on_disk.clear()
        self._entries.clear()
        gens = generations(self._root)
        newest: Manifest | None = None
        for g in gens:
            path = self._root / manifest_name(g)
            try:
                manifest = parse_manifest(files.read_regular(path), path, g)
            except ValueError:
                if g == 0 and not self._is_ours(path):
                    raise ValueError(
                        f"refusing to write into {self._root}: its manifest.json is not a chatkit store manifest; "
                        "save into an empty directory or one written by CowVectorStore"
                    ) from None
                if g == gens[-1]:
                    raise
                logger.warning("version %d in %s is unreadable; its files are kept", g, self._root, exc_info=True)
                self._on_disk[g] = _OnDisk(saved_at=None, files=None)
                continue
            self._on_disk[g] = _OnDisk(saved_at=manifest.saved_at, files=manifest.file_names())
            newest = manifest
        self._newest = newest
        if newest is not None:
            self._generation, self._version = newest.generation, newest.version
            self._entries = {e.uid: e for e in newest.segments}
        else:
            self._generation, self._version = 0, 0

    @staticmethod
    def _is_ours(path: Path) -> bool:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and data.get("format") == FORMAT

    def load(self) -> LoadedVersion | None:
        """Read the newest version, checked (``None``: the directory holds none).

        Raises:
            FileNotFoundError / ValueError: as :func:`read_version`.
        """
        self._check_locked()
        if not self._on_disk:
            return None
        loaded = read_version(self._root)
        assert loaded is not None and loaded.generation == self._generation
        return loaded

    # ------------------------------------------------------------------ committing

    def commit(self, snapshot: StoreSnapshot) -> SavedVersion:
        """Save ``snapshot`` as the next generation: only segments not on disk yet are written.

        Committing the snapshot committed last writes nothing and returns the same result.

        Raises:
            TypeError / ValueError: some metadata cannot be saved (named); nothing is published.
            OSError: the file system failed; the newest version on disk is complete (the previous one,
                or this one if the failure came after its manifest was renamed into place).
            RuntimeError: the writer was released.
        """
        self._check_locked()
        if self._last is not None and self._last[0] is snapshot:
            return self._last[1]
        self._last = None
        if self._stale:
            self._scan()
            self._stale = False
        token = secrets.token_hex(8)
        try:
            entries: list[SegmentEntry] = []
            written = nbytes = 0
            for seg in snapshot.segments:
                entry = self._entries.get(seg.uid)
                if entry is None or entry.count != seg.n:
                    entry, size = write_segment(self._root, seg, token)
                    written += 1
                    nbytes += size
                entries.append(entry)
            if written:
                files.fsync_dir(self._root)  # the segment files are durable before a manifest names them
            generation = self._generation + 1
            manifest = Manifest(
                generation=generation,
                saved_at=float(self._clock()),
                version=snapshot.version,
                dim=snapshot.dim,
                segments=tuple(entries),
                dead=tuple(dead_rows(live, seg.n) for seg, live in zip(snapshot.segments, snapshot.lives)),
            )
            final = self._root / manifest_name(generation)
            tmp = self._root / f"{final.name}.tmp-{token}"
            files.write_file(tmp, encode_manifest(manifest))
            files.replace(tmp, final)
            files.fsync_dir(self._root)
        except BaseException:
            self._stale = True  # the manifest may or may not have been renamed into place
            raise
        self._generation, self._version = generation, snapshot.version
        self._entries = {e.uid: e for e in entries}
        self._newest = manifest
        self._on_disk[generation] = _OnDisk(saved_at=manifest.saved_at, files=manifest.file_names())
        removed = self._collect_logged()
        saved = SavedVersion(
            directory=self._root,
            generation=generation,
            version=snapshot.version,
            segments=len(entries),
            segments_written=written,
            bytes_written=nbytes,
            versions_removed=removed,
        )
        self._last = (snapshot, saved)
        return saved

    def reusable(self, segments: tuple[Segment, ...]) -> dict[str, Reusable]:
        """What a reader that takes over from this writer need not read again: those of ``segments``
        the newest version lists."""
        if self._newest is None:
            return {}
        listed = {e.uid: (e, dead) for e, dead in zip(self._newest.segments, self._newest.dead)}
        return {s.uid: (listed[s.uid][0], s, listed[s.uid][1]) for s in segments if s.uid in listed}

    @property
    def version(self) -> int:
        """The store version of the newest generation on disk."""
        return self._version

    # ------------------------------------------------------------------ retention

    def _collect_logged(self) -> int:
        """:meth:`_collect`; a file-system error is logged (what is left is deleted next time)."""
        try:
            return self._collect()
        except OSError as exc:
            logger.warning("could not delete old versions in %s: %s", self._root, exc)
            return 0
        except BaseException:
            self._stale = True
            raise

    def _collect(self) -> int:
        """Delete superseded versions that retention lets go and no reader pins, then every segment file
        no remaining version lists, and debris. Returns how many versions were deleted."""
        gens = sorted(self._on_disk)
        keep = set(gens[-self._retention.keep_versions :])
        now = self._clock()
        removed = 0
        for g, successor in zip(gens, gens[1:]):
            superseded_at = self._on_disk[successor].saved_at
            if g in keep or superseded_at is None or now - superseded_at < self._retention.keep_seconds:
                continue
            if _remove_unpinned(self._root / manifest_name(g)):
                del self._on_disk[g]
                removed += 1
        needed: set[str] = set()
        for version in self._on_disk.values():
            if version.files is None:
                return removed  # a version we cannot read: keep every segment file
            needed |= version.files
        for name in sorted(os.listdir(self._root)):
            if (_SEGMENT_FILE.fullmatch(name) and name not in needed) or _DEBRIS.fullmatch(name):
                try:
                    files.remove(self._root / name)
                except FileNotFoundError:
                    pass
        return removed

