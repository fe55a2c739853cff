"""The on-disk format of a saved store: one JSON manifest per version, two files per segment. No pickle.

* ``seg-<uid>.faiss``: the segment's ``IndexFlatIP`` as faiss serialises it (L2-normalised float32 rows).
* ``seg-<uid>.json``: its rows: ``{"ids", "texts", "metadatas", "sources", "chunks", "versions"}``.
* ``manifest-<generation>.json`` (12 digits): one saved version: the store version, the dimension and,
  per segment, its uid, row count, the SHA-256 of both files and the rows that are dead (tombstones)
  in this version. Segment files never change once written, so versions share them.

This module writes and reads those files and checks everything it reads: file names (no path can leave
the directory), regular files only (no links), types, sizes, checksums, the faiss header, the dimension,
vectors (finite, unit length or zero), JSON nesting. Which versions exist, who may write them and when
old ones are deleted is :mod:`chatkit.store.directory`'s job. Directories saved by chatkit 0.1 (one
``manifest.json``, format 1) are read as generation 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from .segments import Segment, kill_rows, live_rows_mask

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LEGACY_MANIFEST",
    "MAX_NESTING",
    "nesting",
    "too_deep",
    "SegmentEntry",
    "Manifest",
    "manifest_name",
    "generation_of",
    "write_segment",
    "encode_manifest",
    "parse_manifest",
    "read_segment",
    "dead_rows",
    "live_bitmap",
]

FORMAT = "chatkit.CowVectorStore"
FORMAT_VERSION = 2
LEGACY_MANIFEST = "manifest.json"  # chatkit 0.1's single manifest (format 1), read as generation 0
MAX_NESTING = 64  # deepest metadata value (dicts and lists inside each other) a save writes or a load accepts
UNIT_TOLERANCE = 1e-3  # |norm - 1| a stored vector may show (float32 rounding is ~1e-7)

_UID = re.compile(r"[0-9a-f]{32}")
_SHA = re.compile(r"[0-9a-f]{64}")
_MANIFEST = re.compile(r"manifest-(\d{12})\.json")
_ROW_KEYS = ("ids", "texts", "metadatas", "sources", "chunks", "versions")
# faiss IndexFlatIP header: fourcc, d, ntotal, two dummies, is_trained, metric, number of floats
_HEADER = struct.Struct("<4siqqqBiQ")
_METRIC_INNER_PRODUCT = 0


def manifest_name(generation: int) -> str:
    """The file name of a version's manifest (generation 0: chatkit 0.1's ``manifest.json``)."""
    return LEGACY_MANIFEST if generation == 0 else f"manifest-{generation:012d}.json"


def generation_of(name: str) -> int | None:
    """The generation a file name holds the manifest of, or ``None`` for any other file."""
    if name == LEGACY_MANIFEST:
        return 0
    m = _MANIFEST.fullmatch(name)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    """One segment's files as a manifest lists them (the same in every version that holds the segment)."""

    uid: str
    count: int
    index_sha256: str
    rows_sha256: str

    @property
    def index_name(self) -> str:
        """The faiss file's name."""
        return f"seg-{self.uid}.faiss"

    @property
    def rows_name(self) -> str:
        """The rows file's name."""
        return f"seg-{self.uid}.json"


@dataclass(frozen=True, slots=True)
class Manifest:
    """One saved version, as read from (or written to) its manifest.

    ``saved_at`` is the wall-clock time of the save (``None`` in format 1); ``dead`` holds, per segment,
    the rows that are tombstoned in this version.
    """

    generation: int
    saved_at: float | None
    version: int
    dim: int | None
    segments: tuple[SegmentEntry, ...]
    dead: tuple[tuple[int, ...], ...]

    def file_names(self) -> frozenset[str]:
        """The segment files this version needs."""
        return frozenset(n for e in self.segments for n in (e.index_name, e.rows_name))


# ---------------------------------------------------------------------- writing


def _sha256(data: bytes | memoryview | np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()


def nesting(value: object) -> int:
    """How deeply dicts and lists nest in ``value`` (a scalar: 0), without recursion; it stops counting
    past :data:`MAX_NESTING`."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            return depth  # deep enough to refuse; no need to walk the rest
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


def too_deep(metadatas: Sequence[dict[str, Any]]) -> int | None:
    """The first row whose metadata nests deeper than :data:`MAX_NESTING`, or ``None``.

    Most metadata is a flat dict: only rows holding a container are walked.
    """
    for row, md in enumerate(metadatas):
        for value in md.values():
            if isinstance(value, (dict, list)):
                if nesting(md) > MAX_NESTING:
                    return row
                break
    return None


def _rows_json(seg: Segment) -> bytes:
    row = too_deep(seg.metadatas)
    if row is not None:
        raise ValueError(
            f"cannot save: the metadata of document {seg.ids[row]!r} nests deeper than {MAX_NESTING} levels"
        )
    payload = {
        "ids": list(seg.ids),
        "texts": list(seg.texts),
        "metadatas": list(seg.metadatas),
        "sources": list(seg.sources),
        "chunks": list(seg.chunks),
        "versions": list(seg.versions),
    }
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError, UnicodeEncodeError):
        for doc_id, text, md in zip(seg.ids, seg.texts, seg.metadatas):
            try:
                json.dumps([doc_id, text, md], ensure_ascii=False, allow_nan=False).encode()
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"cannot save: the metadata of document {doc_id!r} is not JSON-serializable ({exc})"
                ) from None
            except UnicodeEncodeError:
                raise ValueError(
                    f"cannot save: document {doc_id!r} holds a lone surrogate (not valid Unicode) in its "
                    "id, text or metadata"
                ) from None
        raise


def write_segment(root: Path, seg: Segment, token: str) -> tuple[SegmentEntry, int]:
    """Write ``seg``'s two files durably (temp file, fsync, rename; the directory is not fsync'ed).

    Returns its manifest entry and the bytes written.

    Raises:
        TypeError / ValueError: some metadata cannot be saved (named); nothing is renamed into place.
    """
    import faiss

    rows = _rows_json(seg)
    index = faiss.serialize_index(seg.index)
    entry = SegmentEntry(uid=seg.uid, count=seg.n, index_sha256=_sha256(index), rows_sha256=_sha256(rows))
    for name, data in ((entry.index_name, index), (entry.rows_name, rows)):
        tmp = root / f"{name}.tmp-{token}"
        files.write_file(tmp, data)
        files.replace(tmp, root / name)
    return entry, len(index) + len(rows)


def dead_rows(live: np.ndarray | None, n: int) -> tuple[int, ...]:
    """The rows a live bitmap marks dead."""
    if live is None:
        return ()
    return tuple(np.flatnonzero(~live_rows_mask(live, n)).tolist())


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest file's bytes (format 2)."""
    return json.dumps(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generation": manifest.generation,
            "saved_at": manifest.saved_at,
            "version": manifest.version,
            "dim": manifest.dim,
            "metric": "cosine",
            "segments": [
                {
                    "uid": e.uid,
                    "index": e.index_name,
                    "rows": e.rows_name,
                    "count": e.count,
                    "dead": list(dead),
                    "index_sha256": e.index_sha256,
                    "rows_sha256": e.rows_sha256,
                }
                for e, dead in zip(manifest.segments, manifest.dead, strict=True)
            ],
        },
        indent=1,
    ).encode()


# ---------------------------------------------------------------------- reading


def _fail(where: str, problem: str) -> ValueError:
    return ValueError(f"corrupt store manifest ({where}): {problem}")


def _int(value: object, where: str, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"{name!r} must be an int, got {type(value).__name__} {value!r:.60}")
    if value < minimum:
        raise _fail(where, f"{name!r} must be at least {minimum}, got {value}")
    return value


def _str(value: object, pattern: re.Pattern[str], where: str, name: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"{name!r} must be a str, got {type(value).__name__} {value!r:.60}")
    if not pattern.fullmatch(value):
        raise _fail(where, f"{name!r} has an invalid value {value!r:.80}")
    return value


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"corrupt {what}: JSON nested too deeply to read") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"corrupt {what}: not valid JSON ({exc})") from None


def parse_manifest(data: bytes, path: Path, generation: int) -> Manifest:
    """Check and decode the manifest ``path`` (its bytes are ``data``) of version ``generation``.

    Raises:
        ValueError: anything wrong (the message names the file and the problem).
    """
    where = str(path)
    manifest = _json(data, f"store manifest {where}")
    if not isinstance(manifest, dict):
        raise _fail(where, f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise _fail(where, f"'format' must be {FORMAT!r}, got {manifest.get('format')!r:.60}")
    fmt = manifest.get("format_version")
    if generation == 0:
        if fmt != 1:
            raise _fail(where, f"unsupported 'format_version' {fmt!r:.60} in {LEGACY_MANIFEST} (expected 1)")
        saved_at = None
    else:
        if fmt != FORMAT_VERSION:
            raise _fail(where, f"unsupported 'format_version' {fmt!r:.60} (this is {FORMAT_VERSION})")
        if manifest.get("generation") != generation:
            raise _fail(where, f"'generation' is {manifest.get('generation')!r:.40} but the file name says {generation}")
        raw = manifest.get("saved_at")
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
            raise _fail(where, f"'saved_at' must be a time in seconds, got {raw!r:.40}")
        saved_at = float(raw)
    version = _int(manifest.get("version"), where, "version", 0)
    entries = manifest.get("segments")
    if not isinstance(entries, list):
        raise _fail(where, f"'segments' must be a list, got {type(entries).__name__}")
    raw_dim = manifest.get("dim")
    dim = None if raw_dim is None and not entries else _int(raw_dim, where, "dim", 1)
    segments: list[SegmentEntry] = []
    deads: list[tuple[int, ...]] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        here = f"{where}, segment {i}"
        if not isinstance(entry, dict):
            raise _fail(here, f"expected an object, got {type(entry).__name__}")
        uid = _str(entry.get("uid"), _UID, here, "uid")
        if uid in seen:
            raise _fail(here, f"segment {uid} is listed twice")
        seen.add(uid)
        for key, expected in (("index", f"seg-{uid}.faiss"), ("rows", f"seg-{uid}.json")):
            if entry.get(key) != expected:
                raise _fail(
                    here, f"unsafe or unexpected file name {entry.get(key)!r:.80} for {key!r} (expected {expected!r})"
                )
        count = _int(entry.get("count"), here, "count", 1)
        dead = entry.get("dead")
        if not isinstance(dead, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in dead):
            raise _fail(here, "'dead' must be a list of row numbers")
        if len(set(dead)) != len(dead) or any(not 0 <= r < count for r in dead) or len(dead) >= count:
            raise _fail(here, f"'dead' must hold distinct row numbers below {count}, leaving at least one live")
        segments.append(
            SegmentEntry(
                uid=uid,
                count=count,
                index_sha256=_str(entry.get("index_sha256"), _SHA, here, "index_sha256"),
                rows_sha256=_str(entry.get("rows_sha256"), _SHA, here, "rows_sha256"),
            )
        )
        deads.append(tuple(sorted(dead)))
    return Manifest(
        generation=generation, saved_at=saved_at, version=version, dim=dim, segments=tuple(segments), dead=tuple(deads)
    )


def _read_checked(root: Path, name: str, sha: str, where: str) -> bytes:
    path = root / name
    try:
        data = files.read_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"saved store {root} is incomplete: {name} ({where}) is missing") from None
    if _sha256(data) != sha:
        raise ValueError(f"saved store {root} is corrupt: {name} ({where}) does not match its checksum")
    return data


def _index_from(data: bytes, dim: int, count: int, path: Path) -> Any:
    import faiss

    if len(data) < _HEADER.size:
        raise ValueError(f"corrupt faiss file {path}: only {len(data)} bytes")
    fourcc, d, ntotal, _, _, _, metric, floats = _HEADER.unpack_from(data)
    if fourcc != b"IxFI" or metric != _METRIC_INNER_PRODUCT:
        raise ValueError(f"corrupt faiss file {path}: not an IndexFlatIP (header {fourcc!r})")
    if d != dim:
        raise ValueError(f"faiss file {path} holds {d}-d vectors but the manifest says {dim}")
    if ntotal != count or floats != count * dim or len(data) != _HEADER.size + 4 * count * dim:
        raise ValueError(f"corrupt faiss file {path}: expected {count} vectors of {dim} floats")
    vectors = np.frombuffer(data, dtype="<f4", count=count * dim, offset=_HEADER.size).reshape(count, dim)
    # in float64 no float32 value overflows when squared: a norm is non-finite only for NaN or infinity
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
    bad = np.flatnonzero(~np.isfinite(norms))
    if bad.size:
        raise ValueError(f"corrupt faiss file {path}: vector {int(bad[0])} holds NaN or infinite values")
    bad = np.flatnonzero((np.abs(norms - 1.0) > UNIT_TOLERANCE) & (norms != 0.0))
    if bad.size:
        r = int(bad[0])
        raise ValueError(
            f"corrupt faiss file {path}: vector {r} has length {norms[r]:.6g}, not unit length "
            "(the store keeps L2-normalised vectors, so scores are cosine similarities)"
        )
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _rows_from(data: bytes, count: int, version: int, path: Path) -> dict[str, list[Any]]:
    rows = _json(data, f"rows file {path}")
    if not isinstance(rows, dict) or set(rows) != set(_ROW_KEYS):
        raise ValueError(f"corrupt rows file {path}: expected an object with keys {list(_ROW_KEYS)}")
    for key in _ROW_KEYS:
        if not isinstance(rows[key], list) or len(rows[key]) != count:
            raise ValueError(f"corrupt rows file {path}: {key!r} must be a list of {count} entries")
    ids, texts, metadatas = rows["ids"], rows["texts"], rows["metadatas"]
    sources, chunks, versions = rows["sources"], rows["chunks"], rows["versions"]
    # column by column (json.loads makes exact types, so ``type(x) is`` suffices); rows only to name a bad one
    ok = (
        all(type(x) is str for x in ids)
        and all(type(x) is str for x in texts)
        and all(type(x) is dict for x in metadatas)
        and all(type(x) is int for x in versions)
        and (count == 0 or (min(versions) >= 1 and max(versions) <= version))
        and all(
            c is None if s is None else type(s) is str and type(c) is int and c >= 0 for s, c in zip(sources, chunks)
        )
    )
    if not ok:
        for i in range(count):
            source, chunk, ver = sources[i], chunks[i], versions[i]
            if not (
                type(ids[i]) is str
                and type(texts[i]) is str
                and type(metadatas[i]) is dict
                and (chunk is None if source is None else type(source) is str and type(chunk) is int and chunk >= 0)
                and type(ver) is int
                and 1 <= ver <= version
            ):
                raise ValueError(f"corrupt rows file {path}: row {i} has a wrong type or value")
    row = too_deep(metadatas)
    if row is not None:
        raise ValueError(f"corrupt rows file {path}: the metadata of row {row} is nested deeper than {MAX_NESTING} levels")
    return rows


def read_segment(root: Path, entry: SegmentEntry, dim: int, version: int, where: str) -> Segment:
    """Read, check and build one segment listed by a manifest (``where`` names the manifest entry).

    Raises:
        FileNotFoundError: one of its files is missing.
        ValueError: a file is corrupt, unsafe or inconsistent with the manifest (the message names it).
    """
    index = _index_from(
        _read_checked(root, entry.index_name, entry.index_sha256, where), dim, entry.count, root / entry.index_name
    )
    rows_path = root / entry.rows_name
    rows = _rows_from(_read_checked(root, entry.rows_name, entry.rows_sha256, where), entry.count, version, rows_path)
    try:
        return Segment(index=index, uid=entry.uid, **rows)
    except ValueError as exc:
        raise ValueError(f"corrupt rows file {rows_path}: {exc}") from None


def live_bitmap(dead: tuple[int, ...], count: int) -> np.ndarray | None:
    """The live bitmap for a segment whose ``dead`` rows are tombstoned (``None``: all live)."""
    return kill_rows(None, count, np.array(dead, dtype=np.int64)) if dead else None
