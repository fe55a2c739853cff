"""Saving and loading CowVectorStore: the file format (round trips, chatkit 0.1's format), crash injection
at every file-system step, a killed saver, and directories that are corrupt or malicious."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

import chatkit.store.files as files
from chatkit import CowVectorStore, HashEmbeddings
from chatkit.store.persist import MAX_NESTING

from .test_store_directory import assert_tidy, child_env, manifests

DIM = 32
OPTIONS: dict[str, Any] = {"chunk_size": 40, "chunk_overlap": 0, "progress": False, "compaction": "off"}


def open_store(directory: Path | None = None) -> CowVectorStore:
    """A new store, or (with ``directory``) a reader of the newest version saved there."""
    if directory is None:
        return CowVectorStore(HashEmbeddings(dim=DIM), **OPTIONS)
    return CowVectorStore.load(directory, HashEmbeddings(dim=DIM), **OPTIONS)


def open_writer(directory: Path, **options: Any) -> CowVectorStore:
    return CowVectorStore.open(directory, HashEmbeddings(dim=DIM), **OPTIONS, **options)


def fingerprint(store: CowVectorStore) -> tuple[int, list[tuple[Any, ...]]]:
    docs = store.snapshot().documents()
    return store.version, sorted((d.id, d.page_content, json.dumps(d.metadata, sort_keys=True)) for d in docs)


def newest_manifest(directory: Path) -> Path:
    return directory / manifests(directory)[-1]


async def build_v1(store: CowVectorStore) -> CowVectorStore:
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
async def saved_v1(tmp_path: Path) -> Iterator[tuple[Path, CowVectorStore, Any]]:
    """Version 1 saved in ``tmp_path/v1`` by a store that stays its writer until the test ends."""
    store = await build_v1(open_store())
    store.save(tmp_path / "v1")
    yield tmp_path / "v1", store, fingerprint(store)
    store._release_directory()


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
    assert names[0] == "manifest-000000000001.json" and names[-1] == "writer.lock"
    assert len(names) == 8 and all(n.startswith("seg-") for n in names[1:-1])  # 3 segments, 2 files each
    assert not any(p.suffix == ".pkl" or b"pickle" in p.read_bytes()[:100] for p in directory.iterdir())
    await loaded.aadd_document("c.md", "charlie")  # a loaded store is a normal store (in memory)
    assert loaded.version == 5


async def test_saving_again_writes_only_new_segments_and_retention_removes_stale_files(tmp_path: Path) -> None:
    store = await build_v1(open_writer(tmp_path, keep_versions=1, keep_seconds=0))
    try:
        first = store.save()
        assert (first.generation, first.segments, first.segments_written) == (1, 3, 3)
        assert store.save() is first  # nothing changed: nothing written
        await make_v2(store)
        second = store.save()
        assert (second.generation, second.segments, second.segments_written, second.versions_removed) == (2, 3, 2, 1)
        assert manifests(tmp_path) == ["manifest-000000000002.json"]
        assert_tidy(tmp_path)  # b.md's segment files went with version 1
        assert fingerprint(open_store(tmp_path)) == fingerprint(store)
    finally:
        store._release_directory()


async def test_an_empty_store_round_trips(tmp_path: Path) -> None:
    store = open_store()
    assert store.save(tmp_path).segments == 0
    loaded = open_store(tmp_path)
    assert loaded.version == 0 and len(loaded) == 0 and loaded.snapshot().dim is None
    store._release_directory()


async def test_save_refuses_a_directory_holding_a_foreign_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"name": "my web app"}')
    store = await build_v1(open_store())
    with pytest.raises(ValueError, match="refusing to write into .*manifest.json is not a chatkit store manifest"):
        store.save(tmp_path)
    assert (tmp_path / "manifest.json").read_text() == '{"name": "my web app"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "writer.lock"]


async def test_metadata_that_cannot_be_saved_fails_the_save_and_keeps_the_previous_version(saved_v1: Any) -> None:
    directory, store, v1 = saved_v1
    store.add_texts(["odd"], [{"when": object()}], ids=["odd"])
    with pytest.raises(TypeError, match="metadata of document 'odd' is not JSON-serializable"):
        store.save()
    store.delete(["odd"])
    deep: Any = "bottom"
    for _ in range(MAX_NESTING):
        deep = [deep]
    with pytest.raises(ValueError, match="nested more than"):  # refused when added, so a save never meets it
        store.add_texts(["deep"], [{"deep": deep}], ids=["deep"])
    assert fingerprint(open_store(directory)) == v1
    assert store.save().generation == 2  # the writer still works
    assert_tidy(directory)


async def test_asave_runs_off_the_loop(tmp_path: Path) -> None:
    store = await build_v1(open_store())
    saved = await store.asave(tmp_path)
    assert saved.manifest == tmp_path.resolve() / "manifest-000000000001.json"
    assert fingerprint(open_store(tmp_path)) == fingerprint(store)
    assert await open_store(tmp_path).arefresh() is False
    store._release_directory()


async def test_a_directory_saved_by_chatkit_0_1_loads_and_is_upgraded_by_its_next_writer(saved_v1: Any) -> None:
    directory, store, v1 = saved_v1
    store._release_directory()
    manifest = json.loads(newest_manifest(directory).read_text())
    for key in ("generation", "saved_at"):
        del manifest[key]
    manifest["format_version"] = 1
    newest_manifest(directory).unlink()
    (directory / "manifest.json").write_text(json.dumps(manifest))  # chatkit 0.1's layout
    assert fingerprint(open_store(directory)) == v1
    writer = open_writer(directory, keep_versions=1, keep_seconds=0)
    try:
        writer.add_texts(["after the upgrade"], ids=["up"])
        assert writer.save().generation == 1
        assert manifests(directory) == ["manifest-000000000001.json"] and not (directory / "manifest.json").exists()
        assert fingerprint(open_store(directory)) == fingerprint(writer)
    finally:
        writer._release_directory()


# ---------------------------------------------------------------------- crash injection


class Crash(Exception):
    pass


STEPS = ("write_file", "fsync", "replace", "fsync_dir", "remove")


def inject(monkeypatch: pytest.MonkeyPatch, fail_at: int, torn: bool) -> dict[str, Any]:
    """Make the ``fail_at``-th file-system step of a save fail (a torn write, if ``torn``)."""
    state: dict[str, Any] = {"steps": 0, "manifest_replaced": False, "failed": False}
    originals = {name: getattr(files, name) for name in STEPS}

    def wrap(name: str) -> Callable[..., Any]:
        def step(*args: Any) -> Any:
            state["steps"] += 1
            if state["steps"] == fail_at and not state["failed"]:
                state["failed"] = True
                if name == "write_file" and torn:
                    path, data = args
                    with open(path, "xb") as f:
                        f.write(bytes(memoryview(data))[: len(data) // 2])
                raise Crash(f"crash at step {fail_at} ({name})")
            result = originals[name](*args)
            if name == "replace" and Path(args[1]).name.startswith("manifest-"):
                state["manifest_replaced"] = True
            return result

        return step

    for name in originals:
        monkeypatch.setattr(files, name, wrap(name))
    return state


@pytest.mark.parametrize("torn", [False, True], ids=["fail-before-step", "torn-write"])
async def test_a_crash_at_any_step_of_save_leaves_a_loadable_version(
    saved_v1: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: bool
) -> None:
    """Every step of an incremental save (new segment files, the manifest, deleting version 1 under
    retention) fails in turn; the newest version on disk is always whole, and the same writer's next
    save works and clears the debris."""
    directory, store, v1 = saved_v1
    store._release_directory()
    fail_at = 0
    while True:
        fail_at += 1
        target = tmp_path / f"crash-{fail_at}"
        shutil.copytree(directory, target)
        writer = open_writer(target, keep_versions=1, keep_seconds=0)
        try:
            await make_v2(writer)
            v2 = fingerprint(writer)
            with monkeypatch.context() as m:
                state = inject(m, fail_at, torn)
                try:
                    writer.save()
                except Crash:
                    pass
            if not state["failed"]:
                break  # the save finished before reaching step `fail_at`: every step has been tried
            expected = v2 if state["manifest_replaced"] else v1
            assert fingerprint(open_store(target)) == expected, f"after a crash at step {fail_at}"
            writer.save()  # the next save works and clears the debris
            assert fingerprint(open_store(target)) == v2
            assert_tidy(target)
        finally:
            writer._release_directory()
    assert fail_at > 15  # segment files (write, fsync, rename) x 4, directory fsyncs, manifest, deletions


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import chatkit.store.files as files
    from chatkit import CowVectorStore, HashEmbeddings

    directory, point = Path(sys.argv[1]), sys.argv[2]
    store = CowVectorStore.open(directory, HashEmbeddings(dim=32), compaction="off", progress=False)
    store.add_texts(["written by the child"], ids=["child"])
    store.delete(["t1"])

    def hang():
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        sys.stdin.read()  # the parent kills us while we wait here

    real_replace = files.replace

    def torn_write(path, data):
        with open(path, "xb") as f:
            f.write(bytes(memoryview(data))[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        hang()

    def replace(src, dst):
        if point == "before-manifest-replace" and Path(dst).name.startswith("manifest-"):
            hang()
        real_replace(src, dst)
        if point == "after-manifest-replace" and Path(dst).name.startswith("manifest-"):
            hang()

    if point == "torn-segment-write":
        files.write_file = torn_write
    files.replace = replace
    store.save()
    sys.stdout.write("finished without being killed\\n")
    """
)


KILL_POINTS = {"torn-segment-write": "v1", "before-manifest-replace": "v1", "after-manifest-replace": "v2"}


async def test_a_saver_killed_mid_save_leaves_a_loadable_version_and_a_free_directory(saved_v1: Any, tmp_path: Path) -> None:
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
            env=child_env(),
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
        writer = open_writer(tmp_path / point)  # the lock died with the child; opening clears its debris
        assert fingerprint(writer) == fingerprint(loaded)
        assert_tidy(tmp_path / point)
        writer._release_directory()


# ---------------------------------------------------------------------- corrupt and malicious directories


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = newest_manifest(directory)
    manifest = json.loads(path.read_text())
    result = change(manifest)
    path.write_text(json.dumps(manifest if result is None else result))


def set_segment(key: str, value: Any, index: int = 0) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["segments"][index].__setitem__(key, value)


MANIFEST_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("json list", lambda m: [m], "expected a JSON object"),
    ("other format", lambda m: m.__setitem__("format", "faiss-langchain"), "'format' must be"),
    ("future format", lambda m: m.__setitem__("format_version", 3), "unsupported 'format_version'"),
    ("another generation", lambda m: m.__setitem__("generation", 7), "'generation' is 7 but the file name says 1"),
    ("saved_at as str", lambda m: m.__setitem__("saved_at", "noon"), "'saved_at' must be a time"),
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


def forge(directory: Path, suffix: str, data: bytes) -> str:
    """Replace the first segment's file and fix its checksum in the manifest, as an attacker would;
    return the file's name."""
    manifest = json.loads(newest_manifest(directory).read_text())
    entry = manifest["segments"][0]
    name = entry["index" if suffix == "faiss" else "rows"]
    (directory / name).unlink()
    (directory / name).write_bytes(data)
    entry["index_sha256" if suffix == "faiss" else "rows_sha256"] = hashlib.sha256(data).hexdigest()
    newest_manifest(directory).write_text(json.dumps(manifest))
    return name


def first_segment(directory: Path) -> tuple[dict[str, Any], np.ndarray]:
    """The first segment's rows and vectors."""
    entry = json.loads(newest_manifest(directory).read_text())["segments"][0]
    rows = json.loads((directory / entry["rows"]).read_text())
    index = faiss.deserialize_index(np.frombuffer((directory / entry["index"]).read_bytes(), dtype=np.uint8))
    return rows, faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d).copy()


async def test_files_that_fail_their_checks_are_rejected(saved_v1: Any, tmp_path: Path) -> None:
    directory, _, _ = saved_v1
    pristine = tmp_path / "pristine"
    shutil.copytree(directory, pristine)

    def fresh() -> Path:
        shutil.rmtree(directory)
        shutil.copytree(pristine, directory)
        return directory

    with pytest.raises(ValueError, match=r"manifest-000000000001\.json: not valid JSON"):
        newest_manifest(fresh()).write_bytes(b"{nope")
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
        rows, _ = first_segment(fresh())
        rows["texts"][0] = 42
        forge(directory, "json", json.dumps(rows).encode())
        open_store(directory)
    with pytest.raises(ValueError, match="expected an object with keys"):
        rows, _ = first_segment(fresh())
        del rows["versions"]
        forge(directory, "json", json.dumps(rows).encode())
        open_store(directory)
    with pytest.raises(ValueError, match="ids must be unique"):
        rows, _ = first_segment(fresh())
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
    with pytest.raises(ValueError, match=r"seg-[0-9a-f]{32}\.json is not a regular file"):
        name = json.loads(newest_manifest(fresh()).read_text())["segments"][0]["rows"]
        (directory / name).unlink()
        os.mkfifo(directory / name)  # opening a FIFO to read would block: never opened that way
        open_store(directory)
    fresh()
    assert fingerprint(open_store(directory))[0] == 4  # the pristine copy still loads


@pytest.mark.parametrize("bad", ["nan", "inf", "length-30", "length-0.5"])
async def test_load_refuses_vectors_that_are_not_finite_unit_vectors(saved_v1: Any, bad: str) -> None:
    """Issue 10 item 8. Before: loaded without a word; a "cosine" score could be 894."""
    directory, _, _ = saved_v1
    _, vectors = first_segment(directory)
    vectors[-1] = {"nan": np.nan, "inf": np.inf, "length-30": 30 / np.sqrt(DIM), "length-0.5": 0.5 / np.sqrt(DIM)}[bad]
    forged = faiss.IndexFlatIP(DIM)
    forged.add(vectors)
    name = forge(directory, "faiss", faiss.serialize_index(forged).tobytes())
    expected = "holds NaN or infinite values" if bad in ("nan", "inf") else f"has length {bad[7:]}, not unit length"
    with pytest.raises(ValueError, match=rf"corrupt faiss file .*{name}: vector {len(vectors) - 1} {expected}"):
        open_store(directory)


async def test_load_accepts_zero_vectors(tmp_path: Path) -> None:
    store = open_store()
    store.add_texts(["", "words"], ids=["empty", "words"])  # HashEmbeddings embeds "" to the zero vector
    store.save(tmp_path)
    assert fingerprint(open_store(tmp_path)) == fingerprint(store)
    store._release_directory()


async def test_load_refuses_a_segment_file_linked_outside_the_directory(saved_v1: Any, tmp_path: Path) -> None:
    """Issue 10 item 8. Before: the link was followed and the outside file loaded."""
    directory, _, _ = saved_v1
    name = json.loads(newest_manifest(directory).read_text())["segments"][0]["rows"]
    outside = tmp_path / "secret.json"
    (directory / name).rename(outside)  # same bytes, same checksum: only the link is wrong
    (directory / name).symlink_to(outside)
    with pytest.raises(ValueError, match=rf"{name} is a symbolic link \(to '{outside}'\); a saved store holds only regular files"):
        open_store(directory)
    newest_manifest(directory).rename(tmp_path / "manifest.json")
    (directory / "manifest-000000000001.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match=r"manifest-000000000001\.json is a symbolic link"):
        open_store(directory)


@pytest.mark.parametrize("where", ["rows", "manifest", "metadata"])
async def test_load_refuses_deeply_nested_json(saved_v1: Any, where: str) -> None:
    """Issue 10 item 8. Before: RecursionError from json.loads (rows, manifest); metadata nested deeper
    than a save writes was accepted."""
    directory, _, _ = saved_v1
    depth = 100_000 if where != "metadata" else MAX_NESTING + 1
    deep = "[" * depth + "]" * depth
    if where == "manifest":
        path = newest_manifest(directory)
        path.write_text(path.read_text().replace('"segments": [', f'"deep": {deep}, "segments": [', 1))
        name, message = path.name, "JSON nested too deeply to read"
    else:
        rows, _ = first_segment(directory)
        text = json.dumps(rows).replace('"metadatas": [{', f'"metadatas": [{{"deep": {deep}, ', 1)
        name = forge(directory, "json", text.encode())
        message = "JSON nested too deeply to read" if where == "rows" else f"row 0 is nested deeper than {MAX_NESTING} levels"
    with pytest.raises(ValueError, match=rf"{name}.*{message}"):
        open_store(directory)


async def test_missing_store_and_dimension_mismatch_are_explained(saved_v1: Any, tmp_path: Path) -> None:
    directory, _, _ = saved_v1
    with pytest.raises(FileNotFoundError, match="not a directory"):
        CowVectorStore.load(tmp_path / "nowhere", HashEmbeddings(dim=DIM))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved store at .*empty: no manifest"):
        CowVectorStore.load(tmp_path / "empty", HashEmbeddings(dim=DIM))
    with pytest.raises(ValueError, match="holds 32-d vectors but HashEmbeddings gives 16-d"):
        CowVectorStore.load(directory, HashEmbeddings(dim=16))
