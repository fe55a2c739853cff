"""Save and load a store snapshot: a JSON manifest plus, per segment, a faiss index file and a JSON rows file.

No pickle anywhere. Crash safety comes from the order of the steps:

1. each segment's files are written under a temporary name, fsync'ed, and renamed to ``seg-<uid>.*``
   (a segment never changes, so a file already saved under its name is reused);
2. the directory is fsync'ed, so those renames are durable;
3. the new manifest is written to a temporary file, fsync'ed, and renamed over ``manifest.json``
   (``os.replace`` is atomic), then the directory is fsync'ed again;
4. only then are files no manifest refers to any more deleted.

A crash before step 3's rename leaves the previous manifest, whose files are all still there; a crash
after it leaves the new one, whose files are all durable. Loading checks everything it reads: file names
(no path can leave the directory), types, sizes, SHA-256 checksums, the faiss header and the dimension.
One process at a time may save into a directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .segments import Segment, kill_rows, live_rows_mask

__all__ = ["MANIFEST", "FORMAT", "FORMAT_VERSION", "LoadedStore", "save_snapshot", "load_snapshot"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "chatkit.CowVectorStore"
FORMAT_VERSION = 1

_UID = re.compile(r"[0-9a-f]{32}")
_SHA = re.compile(r"[0-9a-f]{64}")
_OURS = re.compile(r"seg-[0-9a-f]{32}\.(faiss|json)|.+\.tmp-[0-9a-f]{16}")
_ROW_KEYS = ("ids", "texts", "metadatas", "sources", "chunks", "versions")
# faiss IndexFlatIP header: fourcc, d, ntotal, two dummies, is_trained, metric, number of floats
_HEADER = struct.Struct("<4siqqqBiQ")
_METRIC_INNER_PRODUCT = 0


@dataclass(frozen=True, slots=True)
class LoadedStore:
    """What :func:`load_snapshot` read, checked."""

    version: int
    dim: int | None
    segments: tuple[Segment, ...]
    lives: tuple[np.ndarray | None, ...]


# ---------------------------------------------------------------------- file-system steps
# Each step is one small function so tests can make any of them fail (crash injection).


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _write_file(path: Path, data: bytes | memoryview | np.ndarray) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        _fsync(f.fileno())


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be fsync'ed on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    os.remove(path)


def _sha256(data: bytes | memoryview | np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- save


def _rows_json(seg: Segment) -> bytes:
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
    except (TypeError, ValueError):
        for doc_id, md in zip(seg.ids, seg.metadatas):
            try:
                json.dumps(md, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"cannot save: the metadata of document {doc_id!r} is not JSON-serializable ({exc})"
                ) from None
        raise


def _put(directory: Path, name: str, data: bytes | np.ndarray, token: str) -> str:
    """Make ``directory/name`` hold ``data`` durably (write-to-temp, fsync, rename); return its SHA-256."""
    digest = _sha256(data)
    final = directory / name
    if final.is_file() and _file_sha256(final) == digest:
        return digest  # the same immutable segment, saved before
    tmp = directory / f"{name}.tmp-{token}"
    _write_file(tmp, data)
    _replace(tmp, final)
    return digest


def _check_overwritable(manifest_path: Path) -> None:
    if not manifest_path.exists():
        return
    try:
        existing = json.loads(manifest_path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        existing = None
    if not (isinstance(existing, dict) and existing.get("format") == FORMAT):
        raise ValueError(
            f"refusing to overwrite {manifest_path}: it is not a chatkit store manifest; "
            "save into an empty directory or one written by CowVectorStore.save"
        )


def save_snapshot(snapshot: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``snapshot`` (a StoreSnapshot) into ``directory`` atomically; return the manifest's path.

    Raises:
        TypeError: some metadata is not JSON-serializable (nothing is replaced).
        ValueError: ``directory`` holds a ``manifest.json`` that is not a chatkit store's.
        OSError: the file system failed; the previously saved version is still loadable.
    """
    import faiss

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST
    _check_overwritable(manifest_path)
    token = secrets.token_hex(8)
    entries: list[dict[str, Any]] = []
    for seg, live in zip(snapshot.segments, snapshot.lives):
        rows_bytes = _rows_json(seg)
        index_name, rows_name = f"seg-{seg.uid}.faiss", f"seg-{seg.uid}.json"
        index_sha = _put(root, index_name, faiss.serialize_index(seg.index), token)
        rows_sha = _put(root, rows_name, rows_bytes, token)
        entries.append(
            {
                "uid": seg.uid,
                "index": index_name,
                "rows": rows_name,
                "count": seg.n,
                "dead": np.flatnonzero(~live_rows_mask(live, seg.n)).tolist(),
                "index_sha256": index_sha,
                "rows_sha256": rows_sha,
            }
        )
    if entries:
        _fsync_dir(root)  # the renamed segment files are durable before any manifest names them
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": snapshot.version,
        "dim": snapshot.dim,
        "metric": "cosine",
        "segments": entries,
    }
    tmp = root / f"{MANIFEST}.tmp-{token}"
    _write_file(tmp, json.dumps(manifest, indent=1).encode())
    _replace(tmp, manifest_path)
    _fsync_dir(root)
    keep = {MANIFEST} | {e["index"] for e in entries} | {e["rows"] for e in entries}
    for name in os.listdir(root):
        if name not in keep and _OURS.fullmatch(name):
            try:
                _remove(root / name)
            except OSError as exc:  # the save itself succeeded; leftovers go next time
                logger.warning("could not remove stale file %s: %s", root / name, exc)
    return manifest_path


# ---------------------------------------------------------------------- load


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


def _file_name(entry: dict[str, Any], key: str, expected: str, where: str) -> str:
    name = entry.get(key)
    if name != expected:
        raise _fail(where, f"unsafe or unexpected file name {name!r:.80} for {key!r} (expected {expected!r})")
    return expected


def _read_checked(root: Path, name: str, sha: str, where: str) -> bytes:
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"saved store {root} is incomplete: {name} ({where}) is missing")
    data = path.read_bytes()
    if _sha256(data) != sha:
        raise ValueError(f"saved store {root} is corrupt: {name} ({where}) does not match its checksum")
    return data


def _index_from(data: bytes, dim: int, count: int, where: str) -> Any:
    import faiss

    if len(data) < _HEADER.size:
        raise ValueError(f"corrupt faiss file ({where}): only {len(data)} bytes")
    fourcc, d, ntotal, _, _, _, metric, floats = _HEADER.unpack_from(data)
    if fourcc != b"IxFI" or metric != _METRIC_INNER_PRODUCT:
        raise ValueError(f"corrupt faiss file ({where}): not an IndexFlatIP (header {fourcc!r})")
    if d != dim:
        raise ValueError(f"faiss file ({where}) holds {d}-d vectors but the manifest says {dim}")
    if ntotal != count or floats != count * dim or len(data) != _HEADER.size + 4 * count * dim:
        raise ValueError(f"corrupt faiss file ({where}): expected {count} vectors of {dim} floats")
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _rows_from(data: bytes, count: int, version: int, where: str) -> dict[str, list[Any]]:
    try:
        rows = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"corrupt rows file ({where}): not valid JSON ({exc})") from None
    if not isinstance(rows, dict) or set(rows) != set(_ROW_KEYS):
        raise ValueError(f"corrupt rows file ({where}): expected an object with keys {list(_ROW_KEYS)}")
    for key in _ROW_KEYS:
        if not isinstance(rows[key], list) or len(rows[key]) != count:
            raise ValueError(f"corrupt rows file ({where}): {key!r} must be a list of {count} entries")
    for i in range(count):
        doc_id, text, md = rows["ids"][i], rows["texts"][i], rows["metadatas"][i]
        source, chunk, ver = rows["sources"][i], rows["chunks"][i], rows["versions"][i]
        ok = (
            isinstance(doc_id, str)
            and isinstance(text, str)
            and isinstance(md, dict)
            and (source is None or isinstance(source, str))
            and (chunk is None if source is None else isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0)
            and isinstance(ver, int)
            and not isinstance(ver, bool)
            and 1 <= ver <= version
        )
        if not ok:
            raise ValueError(f"corrupt rows file ({where}): row {i} has a wrong type or value")
    return rows


def load_snapshot(directory: str | os.PathLike[str]) -> LoadedStore:
    """Read and check a store saved by :func:`save_snapshot`.

    Raises:
        FileNotFoundError: the directory, its manifest or a file the manifest lists is missing.
        ValueError: the manifest or a file is corrupt, unsafe (a file name that could leave the
            directory) or inconsistent (dimensions, counts, checksums, duplicate ids).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no saved store at {root}: not a directory")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no saved store at {root}: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"corrupt store manifest {manifest_path}: not valid JSON ({exc})") from None
    where = str(manifest_path)
    if not isinstance(manifest, dict):
        raise _fail(where, f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise _fail(where, f"'format' must be {FORMAT!r}, got {manifest.get('format')!r:.60}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _fail(where, f"unsupported 'format_version' {manifest.get('format_version')!r:.60} (this is {FORMAT_VERSION})")
    version = _int(manifest.get("version"), where, "version", 0)
    entries = manifest.get("segments")
    if not isinstance(entries, list):
        raise _fail(where, f"'segments' must be a list, got {type(entries).__name__}")
    raw_dim = manifest.get("dim")
    dim = None if raw_dim is None and not entries else _int(raw_dim, where, "dim", 1)
    segments: list[Segment] = []
    lives: list[np.ndarray | None] = []
    seen_uids: set[str] = set()
    live_ids: set[str] = set()
    for i, entry in enumerate(entries):
        here = f"{where}, segment {i}"
        if not isinstance(entry, dict):
            raise _fail(here, f"expected an object, got {type(entry).__name__}")
        uid = _str(entry.get("uid"), _UID, here, "uid")
        if uid in seen_uids:
            raise _fail(here, f"segment {uid} is listed twice")
        seen_uids.add(uid)
        index_name = _file_name(entry, "index", f"seg-{uid}.faiss", here)
        rows_name = _file_name(entry, "rows", f"seg-{uid}.json", here)
        count = _int(entry.get("count"), here, "count", 1)
        dead = entry.get("dead")
        if not isinstance(dead, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in dead):
            raise _fail(here, "'dead' must be a list of row numbers")
        if len(set(dead)) != len(dead) or any(not 0 <= r < count for r in dead) or len(dead) >= count:
            raise _fail(here, f"'dead' must hold distinct row numbers below {count}, leaving at least one live")
        index_sha = _str(entry.get("index_sha256"), _SHA, here, "index_sha256")
        rows_sha = _str(entry.get("rows_sha256"), _SHA, here, "rows_sha256")
        assert dim is not None
        index = _index_from(_read_checked(root, index_name, index_sha, here), dim, count, f"{index_name}")
        rows = _rows_from(_read_checked(root, rows_name, rows_sha, here), count, version, rows_name)
        try:
            seg = Segment(index=index, uid=uid, **rows)
        except ValueError as exc:
            raise ValueError(f"corrupt rows file ({rows_name}): {exc}") from None
        live = kill_rows(None, count, np.array(dead, dtype=np.int64)) if dead else None
        for r in np.flatnonzero(live_rows_mask(live, count)).tolist():
            if seg.ids[r] in live_ids:
                raise ValueError(f"saved store {root} is corrupt: document id {seg.ids[r]!r} is live twice")
            live_ids.add(seg.ids[r])
        segments.append(seg)
        lives.append(live)
    return LoadedStore(version=version, dim=dim, segments=tuple(segments), lives=tuple(lives))
