"""Saving and loading CowVectorStore: round trips, crash injection at every step, a killed saver,
and manifests that are corrupt or malicious."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

import chatkit.store.persist as persist
from chatkit import CowVectorStore, HashEmbeddings

DIM = 32


def open_store(directory: Path | None = None) -> CowVectorStore:
    options: dict[str, Any] = {"chunk_size": 40, "chunk_overlap": 0, "progress": False, "compaction": "off"}
    if directory is None:
        return CowVectorStore(HashEmbeddings(dim=DIM), **options)
    return CowVectorStore.load(directory, HashEmbeddings(dim=DIM), **options)


def fingerprint(store: CowVectorStore) -> tuple[int, list[tuple[Any, ...]]]:
    docs = store.snapshot().documents()
    return store.version, sorted((d.id, d.page_content, json.dumps(d.metadata, sort_keys=True)) for d in docs)


async def build_v1() -> CowVectorStore:
    store = open_store()
    await store.aadd_document("a.md", "alpha one\n\nalpha two is longer than forty chars", {"lang": "en"})
    await store.aadd_document("b.md", "bravo")
    store.add_texts(["loose", "gone"], [{"n": 1, "f": 0.5, "l": [1, "x"], "none": None}, {}], ids=["t1", "t2"])
    store.delete(["t2"])  # a tombstone that must survive the round trip
    return store


async def make_v2(store: CowVectorStore) -> None:
    await store.aadd_document("a.md", "alpha replaced")  # tombstones rows of an existing segment
    await store.aremove_document("b.md")  # b's segment dies entirely: its files become stale
    store.add_texts(["new text"], ids=["t3"])


@pytest.fixture
async def saved_v1(tmp_path: Path) -> tuple[Path, CowVectorStore, Any]:
    store = await build_v1()
    store.save(tmp_path / "v1")
    return tmp_path / "v1", store, fingerprint(store)


# ---------------------------------------------------------------------- round trips


async def test_round_trip_keeps_documents_tombstones_versions_and_search(saved_v1: Any) -> None:
    directory, store, v1 = saved_v1
    loaded = open_store(directory)
    assert fingerprint(loaded) == v1 and loaded.version == 4
    assert loaded.sources() == ["a.md", "b.md"] and loaded.get_by_ids(["t2"]) == []
    assert loaded.statistics() == store.statistics()
    assert [d.id for d in loaded.similarity_search("bravo", k=2)] == [d.id for d in store.similarity_search("bravo", k=2)]
    assert loaded.get_by_ids(["t1"])[0].metadata == {"n": 1, "f": 0.5, "l": [1, "x"], "none": None}
    names = sorted(p.name for p in directory.iterdir())
    assert names[0] == "manifest.json" and len(names) == 7 and all(n.startswith("seg-") for n in names[1:])
    assert not any(p.suffix == ".pkl" or b"pickle" in p.read_bytes()[:100] for p in directory.iterdir())
    await loaded.aadd_document("c.md", "charlie")  # a loaded store is a normal store
    assert loaded.version == 5


async def test_saving_again_reuses_immutable_segments_and_removes_stale_files(saved_v1: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, store, _ = saved_v1
    written: list[str] = []
    real_write = persist._write_file
    monkeypatch.setattr(persist, "_write_file", lambda path, data: (written.append(path.name), real_write(path, data)))
    store.save(directory)
    assert [n for n in written if n.startswith("seg-")] == []  # nothing changed but the manifest
    await make_v2(store)
    written.clear()
    store.save(directory)
    assert len([n for n in written if n.startswith("seg-")]) == 4  # only the two new segments
    manifest = json.loads((directory / "manifest.json").read_text())
    listed = {e["index"] for e in manifest["segments"]} | {e["rows"] for e in manifest["segments"]}
    assert {p.name for p in directory.iterdir()} == listed | {"manifest.json"}
    assert fingerprint(open_store(directory)) == fingerprint(store)


async def test_an_empty_store_round_trips(tmp_path: Path) -> None:
    open_store().save(tmp_path)
    loaded = open_store(tmp_path)
    assert loaded.version == 0 and len(loaded) == 0 and loaded.snapshot().dim is None


async def test_save_refuses_to_overwrite_a_foreign_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(ValueError, match="refusing to overwrite"):
        (await build_v1()).save(tmp_path)
    assert (tmp_path / "manifest.json").read_text() == '{"name": "my web app"}'


async def test_metadata_that_is_not_json_fails_the_save_and_keeps_the_previous_one(saved_v1: Any) -> None:
    directory, store, v1 = saved_v1
    store.add_texts(["odd"], [{"when": object()}], ids=["odd"])
    with pytest.raises(TypeError, match="metadata of document 'odd' is not JSON-serializable"):
        store.save(directory)
    assert fingerprint(open_store(directory)) == v1


async def test_asave_runs_off_the_loop(tmp_path: Path) -> None:
    store = await build_v1()
    path = await store.asave(tmp_path)
    assert path == tmp_path / "manifest.json" and fingerprint(open_store(tmp_path)) == fingerprint(store)


# ---------------------------------------------------------------------- crash injection


class Crash(Exception):
    pass


def inject(monkeypatch: pytest.MonkeyPatch, fail_at: int, torn: bool) -> dict[str, Any]:
    """Make the ``fail_at``-th file-system step of a save fail (a torn write, if ``torn``)."""
    state: dict[str, Any] = {"steps": 0, "manifest_replaced": False, "failed": False}
    originals = {name: getattr(persist, name) for name in ("_write_file", "_fsync", "_replace", "_fsync_dir")}

    def wrap(name: str) -> Callable[..., Any]:
        def step(*args: Any) -> Any:
            state["steps"] += 1
            if state["steps"] == fail_at and not state["failed"]:
                state["failed"] = True
                if name == "_write_file" and torn:
                    path, data = args
                    with open(path, "xb") as f:
                        f.write(bytes(memoryview(data))[: len(data) // 2])
                raise Crash(f"crash at step {fail_at} ({name})")
            result = originals[name](*args)
            if name == "_replace" and Path(args[1]).name == "manifest.json":
                state["manifest_replaced"] = True
            return result

        return step

    for name in originals:
        monkeypatch.setattr(persist, name, wrap(name))
    return state


@pytest.mark.parametrize("torn", [False, True], ids=["fail-before-step", "torn-write"])
async def test_a_crash_at_any_step_of_save_leaves_a_loadable_version(
    saved_v1: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: bool
) -> None:
    directory, store, v1 = saved_v1
    await make_v2(store)
    v2 = fingerprint(store)
    fail_at = 0
    while True:
        fail_at += 1
        target = tmp_path / f"crash-{fail_at}"
        shutil.copytree(directory, target)
        with monkeypatch.context() as m:
            state = inject(m, fail_at, torn)
            try:
                store.save(target)
            except Crash:
                pass
        if not state["failed"]:
            break  # the save finished before reaching step `fail_at`: every step has been tried
        expected = v2 if state["manifest_replaced"] else v1
        assert fingerprint(open_store(target)) == expected, f"after a crash at step {fail_at}"
        store.save(target)  # the next save works and clears the debris
        assert fingerprint(open_store(target)) == v2
        assert not [p.name for p in target.iterdir() if ".tmp-" in p.name]
    assert fail_at > 10  # segment files (write+fsync, rename) x 4, directory fsyncs, manifest


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import chatkit.store.persist as p
    from chatkit import CowVectorStore, HashEmbeddings

    directory, point = Path(sys.argv[1]), sys.argv[2]
    store = CowVectorStore.load(directory, HashEmbeddings(dim=32), compaction="off", progress=False)
    store.add_texts(["written by the child"], ids=["child"])
    store.delete(["t1"])

    def hang():
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        sys.stdin.read()  # the parent kills us while we wait here

    real_write, real_replace = p._write_file, p._replace

    def torn_write(path, data):
        with open(path, "xb") as f:
            f.write(bytes(memoryview(data))[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        hang()

    def replace(src, dst):
        if point == "before-manifest-replace" and Path(dst).name == "manifest.json":
            hang()
        real_replace(src, dst)
        if point == "after-manifest-replace" and Path(dst).name == "manifest.json":
            hang()

    if point == "torn-segment-write":
        p._write_file = torn_write
    p._replace = replace
    store.save(directory)
    sys.stdout.write("finished without being killed\\n")
    """
)


KILL_POINTS = {"torn-segment-write": "v1", "before-manifest-replace": "v1", "after-manifest-replace": "v2"}


async def test_a_saver_killed_mid_save_leaves_a_loadable_version(saved_v1: Any, tmp_path: Path) -> None:
    """Three children (run side by side) each SIGKILLed at one point of a save, after telling us they got there."""
    directory, store, v1 = saved_v1
    children = {}
    for point in KILL_POINTS:
        shutil.copytree(directory, tmp_path / point)
        children[point] = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path / point), point],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        for point, child in children.items():
            line = child.stdout.readline()  # type: ignore[union-attr]
            assert line == "ready\n", f"{point}: {child.stderr.read()}"  # type: ignore[union-attr]
            child.kill()  # SIGKILL: no cleanup, no finally blocks, no flushing
    finally:
        for child in children.values():
            child.kill()
            child.communicate()
    for point, survives in KILL_POINTS.items():
        assert children[point].returncode == -9
        loaded = open_store(tmp_path / point)
        if survives == "v1":
            assert fingerprint(loaded) == v1, point
        else:
            assert loaded.version == v1[0] + 2, point
            assert [d.id for d in loaded.get_by_ids(["child", "t1"])] == ["child"], point


# ---------------------------------------------------------------------- corrupt and malicious directories


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    result = change(manifest)
    path.write_text(json.dumps(manifest if result is None else result))


def set_segment(key: str, value: Any, index: int = 0) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["segments"][index].__setitem__(key, value)


MANIFEST_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("json list", lambda m: [m], "expected a JSON object"),
    ("other format", lambda m: m.__setitem__("format", "faiss-langchain"), "'format' must be"),
    ("future format", lambda m: m.__setitem__("format_version", 2), "unsupported 'format_version'"),
    ("version as str", lambda m: m.__setitem__("version", "5"), "'version' must be an int"),
    ("negative version", lambda m: m.__setitem__("version", -1), "'version' must be at least 0"),
    ("dim as str", lambda m: m.__setitem__("dim", "32"), "'dim' must be an int"),
    ("dim mismatch", lambda m: m.__setitem__("dim", 16), "holds 32-d vectors but the manifest says 16"),
    ("segments not a list", lambda m: m.__setitem__("segments", {}), "'segments' must be a list"),
    ("segment not an object", lambda m: m["segments"].__setitem__(0, "seg"), "expected an object"),
    ("uid traversal", set_segment("uid", "../../../etc/passwd"), "'uid' has an invalid value"),
    ("index traversal", set_segment("index", "../../../etc/passwd"), "unsafe or unexpected file name"),
    ("index absolute", set_segment("index", "/etc/passwd"), "unsafe or unexpected file name"),
    ("rows of another segment", set_segment("rows", "seg-" + "0" * 32 + ".json"), "unsafe or unexpected file name"),
    ("count zero", set_segment("count", 0), "'count' must be at least 1"),
    ("count bool", set_segment("count", True), "'count' must be an int"),
    ("dead out of range", set_segment("dead", [999]), "'dead' must hold distinct row numbers"),
    ("dead repeated", set_segment("dead", [0, 0]), "'dead' must hold distinct row numbers"),
    ("dead as str", set_segment("dead", ["0"]), "'dead' must be a list of row numbers"),
    ("bad checksum format", set_segment("index_sha256", "abc"), "'index_sha256' has an invalid value"),
    ("wrong checksum", set_segment("rows_sha256", "0" * 64), "does not match its checksum"),
    ("count differs from the file", set_segment("count", 7), "expected 7 vectors"),
    ("segment listed twice", lambda m: m["segments"].append(m["segments"][0]), "listed twice"),
    ("version older than rows", lambda m: m.__setitem__("version", 1), "wrong type or value"),
]


@pytest.mark.parametrize(("change", "message"), [pytest.param(c, msg, id=name) for name, c, msg in MANIFEST_EDITS])
async def test_corrupt_or_malicious_manifests_fail_with_a_clear_error(
    saved_v1: Any, change: Callable[[dict[str, Any]], Any], message: str
) -> None:
    directory, _, _ = saved_v1
    edit_manifest(directory, change)
    with pytest.raises(ValueError, match=message):
        open_store(directory)


def forge(directory: Path, suffix: str, data: bytes) -> None:
    """Replace the first segment's file and fix its checksum in the manifest, as an attacker would."""
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = manifest["segments"][0]
    name = entry["index" if suffix == "faiss" else "rows"]
    (directory / name).write_bytes(data)
    entry["index_sha256" if suffix == "faiss" else "rows_sha256"] = hashlib.sha256(data).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def rows_of_first_segment(directory: Path) -> dict[str, Any]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return json.loads((directory / manifest["segments"][0]["rows"]).read_text())


async def test_files_that_fail_their_checks_are_rejected(saved_v1: Any, tmp_path: Path) -> None:
    directory, _, _ = saved_v1
    pristine = tmp_path / "pristine"
    shutil.copytree(directory, pristine)

    def fresh() -> Path:
        shutil.rmtree(directory)
        shutil.copytree(pristine, directory)
        return directory

    with pytest.raises(ValueError, match="not valid JSON"):
        (fresh() / "manifest.json").write_bytes(b"{nope")
        open_store(directory)
    with pytest.raises(FileNotFoundError, match="is missing"):
        next(fresh().glob("seg-*.faiss")).unlink()
        open_store(directory)
    with pytest.raises(ValueError, match="does not match its checksum"):
        victim = next(fresh().glob("seg-*.faiss"))
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
        open_store(directory)
    with pytest.raises(ValueError, match="not an IndexFlatIP"):
        l2 = faiss.IndexFlatL2(DIM)
        l2.add(np.zeros((2, DIM), dtype=np.float32))
        forge(fresh(), "faiss", faiss.serialize_index(l2).tobytes())
        open_store(directory)
    with pytest.raises(ValueError, match="only 3 bytes"):
        forge(fresh(), "faiss", b"Ix!")
        open_store(directory)
    with pytest.raises(ValueError, match="row 0 has a wrong type"):
        rows = rows_of_first_segment(fresh())
        rows["texts"][0] = 42
        forge(directory, "json", json.dumps(rows).encode())
        open_store(directory)
    with pytest.raises(ValueError, match="expected an object with keys"):
        rows = rows_of_first_segment(fresh())
        del rows["versions"]
        forge(directory, "json", json.dumps(rows).encode())
        open_store(directory)
    with pytest.raises(ValueError, match="ids must be unique"):
        rows = rows_of_first_segment(fresh())
        rows["ids"][1] = rows["ids"][0]
        forge(directory, "json", json.dumps(rows).encode())
        open_store(directory)
    with pytest.raises(ValueError, match="is live twice"):

        def duplicate(m: dict[str, Any]) -> None:
            clone = dict(m["segments"][0], uid="f" * 32, index=f"seg-{'f' * 32}.faiss", rows=f"seg-{'f' * 32}.json")
            shutil.copy(directory / m["segments"][0]["index"], directory / clone["index"])
            shutil.copy(directory / m["segments"][0]["rows"], directory / clone["rows"])
            m["segments"].append(clone)

        edit_manifest(fresh(), duplicate)
        open_store(directory)
    fresh()
    assert fingerprint(open_store(directory))[0] == 4  # the pristine copy still loads


async def test_missing_store_and_dimension_mismatch_are_explained(saved_v1: Any, tmp_path: Path) -> None:
    directory, _, _ = saved_v1
    with pytest.raises(FileNotFoundError, match="not a directory"):
        CowVectorStore.load(tmp_path / "nowhere", HashEmbeddings(dim=DIM))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        CowVectorStore.load(tmp_path / "empty", HashEmbeddings(dim=DIM))
    with pytest.raises(ValueError, match="holds 32-d vectors but HashEmbeddings gives 16-d"):
        CowVectorStore.load(directory, HashEmbeddings(dim=16))
