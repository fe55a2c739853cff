"""One directory, one writer, many readers: the writer lock, incremental saves, versions that readers pin,
retention, refresh, and several OS processes with the writer SIGKILLed at random points."""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import filelock
import pytest

import chatkit
import chatkit.store.directory as directory_module
import chatkit.store.files as files
import chatkit.store.persist as persist
from chatkit import CowVectorStore, DirectoryLocked, HashEmbeddings
from chatkit.store.directory import DirectoryWriter, Retention, generations

from ._store_processes import check_version

DIM = 16
OPTIONS: dict[str, Any] = {"chunk_size": 40, "chunk_overlap": 0, "progress": False, "compaction": "off"}
ROOT = Path(chatkit.__file__).resolve().parent.parent


@pytest.fixture
def stores() -> Iterator[list[CowVectorStore]]:
    """Stores a test opens as writers; their directories are released when it ends."""
    opened: list[CowVectorStore] = []
    yield opened
    for store in opened:
        store._release_directory()


def open_writer(stores: list[CowVectorStore], directory: Path, **options: Any) -> CowVectorStore:
    store = CowVectorStore.open(directory, HashEmbeddings(dim=DIM), **OPTIONS, **options)
    stores.append(store)
    return store


def load(directory: Path) -> CowVectorStore:
    return CowVectorStore.load(directory, HashEmbeddings(dim=DIM), **OPTIONS)


def new_store(stores: list[CowVectorStore]) -> CowVectorStore:
    store = CowVectorStore(HashEmbeddings(dim=DIM), **OPTIONS)
    stores.append(store)
    return store


def fingerprint(store: CowVectorStore) -> tuple[int, list[tuple[Any, ...]]]:
    docs = store.snapshot().documents()
    return store.version, sorted((d.id, d.page_content, json.dumps(d.metadata, sort_keys=True)) for d in docs)


def manifests(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("manifest-*.json"))


def needed_files(directory: Path) -> set[str]:
    """The segment files the manifests in ``directory`` list."""
    names: set[str] = set()
    for name in manifests(directory):
        for entry in json.loads((directory / name).read_text())["segments"]:
            names |= {entry["index"], entry["rows"]}
    return names


def assert_tidy(directory: Path) -> None:
    """Only the lock, manifests and the segment files they list; every listed file present."""
    names = {p.name for p in directory.iterdir()}
    needed = needed_files(directory)
    assert needed <= names, f"missing: {sorted(needed - names)}"
    assert names == {"writer.lock", *manifests(directory), *needed}, sorted(names)


def child_env() -> dict[str, str]:
    """The environment for a child Python: this tree's chatkit (and tests package) first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def spawn(role: str, *args: object, stderr: Path) -> subprocess.Popen[str]:
    with open(stderr, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tests._store_processes", role, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
            env=child_env(),
        )


def next_report(child: subprocess.Popen[str]) -> dict[str, Any] | None:
    """The child's next JSON line; ``None`` once its stdout is closed (it died)."""
    line = child.stdout.readline()  # type: ignore[union-attr]
    return json.loads(line) if line else None


async def build(store: CowVectorStore) -> None:
    await store.aadd_document("a.md", "alpha one\n\nalpha two is longer than forty chars", {"lang": "en"})
    await store.aadd_document("b.md", "bravo")
    store.add_texts(["loose", "gone"], [{"n": 1}, {}], ids=["t1", "t2"])
    store.delete(["t2"])


# ---------------------------------------------------------------------- one writer


async def test_a_second_writer_in_the_same_process_is_refused(tmp_path: Path, stores: list[CowVectorStore]) -> None:
    first = open_writer(stores, tmp_path)
    await build(first)
    first.save()
    with pytest.raises(DirectoryLocked, match=rf"has a writer already \(pid {os.getpid()} on .*lock_timeout=") as info:
        open_writer(stores, tmp_path)
    assert info.value.directory == tmp_path.resolve() and str(os.getpid()) in info.value.holder
    with pytest.raises(DirectoryLocked):
        new_store(stores).save(tmp_path)
    first._release_directory()
    second = open_writer(stores, tmp_path)
    assert fingerprint(second) == fingerprint(first)


WITHOUT_LOCK = pytest.mark.xfail(
    strict=True, raises=FileNotFoundError, reason="without the lock, the second saver deletes the first one's new files"
)


@pytest.mark.parametrize("locked", [True, pytest.param(False, marks=WITHOUT_LOCK)], ids=["writer-lock", "no-lock"])
async def test_two_savers_never_break_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stores: list[CowVectorStore], locked: bool
) -> None:
    """Issue 10 item 6. Before: the second saver deleted the first one's new segment files between their
    writing and its manifest, and the directory became unloadable (FileNotFoundError). The baseline
    ("no-lock") is this code with the writer lock switched off."""
    if not locked:
        monkeypatch.setattr(filelock.UnixFileLock, "acquire", lambda self, *args, **kwargs: None)
    first = new_store(stores)
    await build(first)
    first.save(tmp_path)
    second = new_store(stores)
    await second.aadd_document("other.md", "a store of its own")
    first.add_texts(["new in v5"], ids=["t5"])
    expected = fingerprint(first)
    real = files.fsync_dir
    outcome: list[object] = []

    def fsync_dir(directory: Any) -> None:
        if not outcome:  # first's new segment files are written, its manifest is not: second saves now
            outcome.append("started")
            try:
                outcome[0] = second.save(tmp_path)
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome[0] = exc
        real(directory)

    monkeypatch.setattr(files, "fsync_dir", fsync_dir)
    first.save(tmp_path)
    monkeypatch.setattr(files, "fsync_dir", real)
    assert fingerprint(load(tmp_path)) == expected  # the directory holds first's version, complete
    assert isinstance(outcome[0], DirectoryLocked)  # second was refused
    assert_tidy(tmp_path)


async def test_a_second_writer_in_another_process_is_refused_or_waits_and_a_killed_writer_frees_the_directory(
    tmp_path: Path, stores: list[CowVectorStore]
) -> None:
    child = spawn("holder", tmp_path, stderr=tmp_path.parent / "holder.err")
    try:
        report = next_report(child)
        assert report is not None, (tmp_path.parent / "holder.err").read_text()
        with pytest.raises(DirectoryLocked, match=f"pid {report['pid']} on "):
            open_writer(stores, tmp_path)
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(open_writer(stores, tmp_path, lock_timeout=None)))
        waiter.start()  # waits for the lock (or gets it right after the kill, if it starts late)
        child.kill()  # SIGKILL: no cleanup in the child; the kernel drops its lock
        child.wait()
        waiter.join(timeout=120)
        assert got and isinstance(got[0], CowVectorStore) and got[0]._writer is not None
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -9


async def test_bad_options_and_a_failed_open_leave_the_directory_free(tmp_path: Path, stores: list[CowVectorStore]) -> None:
    for bad, error, message in [
        ({"lock_timeout": -1}, ValueError, "lock_timeout must be at least 0"),
        ({"lock_timeout": "5"}, TypeError, "lock_timeout must be a number"),
        ({"keep_versions": 0}, ValueError, "keep_versions must be at least 1"),
        ({"keep_versions": 1.5}, TypeError, "keep_versions must be an int"),
        ({"keep_seconds": float("inf")}, ValueError, "keep_seconds must be finite"),
        ({"keep_seconds": None}, TypeError, "keep_seconds must be a number"),
    ]:
        with pytest.raises(error, match=message):
            CowVectorStore.open(tmp_path, HashEmbeddings(dim=DIM), **bad)
    writer = open_writer(stores, tmp_path)
    await build(writer)
    writer.save()
    writer._release_directory()
    with pytest.raises(ValueError, match="holds 16-d vectors but HashEmbeddings gives 8-d"):
        CowVectorStore.open(tmp_path, HashEmbeddings(dim=8))  # fails after taking the lock ...
    assert open_writer(stores, tmp_path).version == writer.version  # ... and let go of it


# ---------------------------------------------------------------------- incremental saves


async def test_a_one_row_change_writes_and_reads_only_the_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stores: list[CowVectorStore]
) -> None:
    """Issue 10 item 7. Before: every save serialised and hashed every segment again ([2000, 1] rows
    serialised for a one-row change) and re-read the files already on disk to compare checksums."""
    store = new_store(stores)
    store.add_texts([f"row {i}" for i in range(2000)], ids=[f"r{i}" for i in range(2000)])
    store.save(tmp_path)
    old_files = {p.name for p in tmp_path.iterdir() if p.name.startswith("seg-")}
    store.add_texts(["one more row"], ids=["r-new"])
    store.delete(["r7"])
    serialized: list[int] = []
    opened: list[str] = []
    real_serialize, real_open, real_os_open = faiss.serialize_index, builtins.open, os.open
    monkeypatch.setattr(faiss, "serialize_index", lambda index: (serialized.append(index.ntotal), real_serialize(index))[1])
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: (opened.append(Path(file).name), real_open(file, *a, **k))[1])
    monkeypatch.setattr(os, "open", lambda file, *a, **k: (opened.append(Path(file).name), real_os_open(file, *a, **k))[1])
    saved = store.save(tmp_path)
    monkeypatch.undo()
    assert serialized == [1]  # the new one-row segment only
    assert not old_files & set(opened)  # the 2,000-row segment's files are neither rewritten nor re-read
    assert (saved.generation, saved.segments, saved.segments_written) == (2, 2, 1)
    assert saved.bytes_written < 2000 and saved.manifest.name == "manifest-000000000002.json"
    assert fingerprint(load(tmp_path)) == fingerprint(store)
    assert store.save() is saved  # nothing changed: nothing written, the same result
    assert manifests(tmp_path) == ["manifest-000000000001.json", "manifest-000000000002.json"]


# ---------------------------------------------------------------------- readers never miss a file


WITHOUT_PINS = pytest.mark.xfail(
    strict=True, raises=FileNotFoundError, reason="without pins, the writer deletes the files of the version being read"
)


@pytest.mark.parametrize("pins", [True, pytest.param(False, marks=WITHOUT_PINS)], ids=["pins", "no-pins"])
async def test_a_reader_loading_while_the_writer_saves_never_misses_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stores: list[CowVectorStore], pins: bool
) -> None:
    """Issue 10 item 6. Before: a save deleted the previous version's files right after its manifest
    swap, so a reader that had read the old manifest failed (FileNotFoundError, seg-....faiss missing).
    Retention here keeps nothing superseded: only the reader's pin keeps version 1 alive. The baseline
    ("no-pins") is this code with the writer ignoring pins."""
    if not pins:
        monkeypatch.setattr(directory_module, "_try_exclusive", lambda fd: True)
    writer = open_writer(stores, tmp_path, keep_versions=1, keep_seconds=0)
    await build(writer)
    writer.save()
    v1 = fingerprint(writer)
    real = persist._read_checked
    paused: list[int] = []

    def read_checked(*args: Any) -> Any:
        if not paused:  # the reader has pinned and read version 1's manifest; the writer saves 3 versions
            writer.delete(["t1"])
            paused.append(writer.save().versions_removed)
            writer.compact()  # every segment of version 1 is replaced by a merged one
            paused.append(writer.save().versions_removed)
            writer.add_texts(["later"], ids=["t9"])
            paused.append(writer.save().versions_removed)
        return real(*args)

    monkeypatch.setattr(persist, "_read_checked", read_checked)
    reader = load(tmp_path)
    monkeypatch.setattr(persist, "_read_checked", real)
    assert fingerprint(reader) == v1 and reader.snapshot().version == 4
    assert paused == [0, 1, 1]  # version 1 was pinned through all three saves; 2 and 3 were not
    assert manifests(tmp_path) == ["manifest-000000000001.json", "manifest-000000000004.json"]
    writer.add_texts(["even later"], ids=["t10"])
    assert writer.save().versions_removed == 2  # unpinned now: versions 1 and 4 go
    assert manifests(tmp_path) == ["manifest-000000000005.json"]
    assert_tidy(tmp_path)
    assert reader.refresh() and fingerprint(reader) == fingerprint(writer)


async def test_a_reader_that_opened_a_manifest_as_it_was_deleted_reads_the_newest_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stores: list[CowVectorStore]
) -> None:
    writer = open_writer(stores, tmp_path, keep_versions=1, keep_seconds=0)
    await build(writer)
    writer.save()
    real_pin = directory_module._pin
    pins: list[int] = []

    def pin(fd: int) -> None:
        if not pins:  # the reader opened manifest 1 but has no pin yet: the writer replaces and deletes it
            writer.add_texts(["new"], ids=["t3"])
            assert writer.save().versions_removed == 1
        pins.append(fd)
        real_pin(fd)

    monkeypatch.setattr(directory_module, "_pin", pin)
    reader = load(tmp_path)
    monkeypatch.undo()
    assert len(pins) == 2  # manifest 1 turned out unlinked once pinned: the reader started over
    assert fingerprint(reader) == fingerprint(writer)


async def test_retention_keeps_the_newest_versions_and_those_replaced_recently(tmp_path: Path) -> None:
    now = [1000.0]
    writer = DirectoryWriter(tmp_path, retention=Retention(keep_versions=2, keep_seconds=10), clock=lambda: now[0])
    store = CowVectorStore(HashEmbeddings(dim=DIM), **OPTIONS)
    try:
        for i in range(1, 5):  # generations 1..4, one second apart
            store.add_texts([f"text {i}"], ids=[f"id{i}"])
            if i == 3:
                store.compact()  # version 3 holds one merged segment; 1 and 2 list the small ones
            assert writer.commit(store.snapshot()).versions_removed == 0
            now[0] += 1
        assert generations(tmp_path) == [1, 2, 3, 4]  # 1 and 2 were replaced less than 10 s ago
        now[0] += 7.5  # version 1 was replaced (by 2) at 1001: 10.5 s ago; version 2 (by 3) 9.5 s ago
        store.add_texts(["text 5"], ids=["id5"])
        assert writer.commit(store.snapshot()).versions_removed == 1
        assert generations(tmp_path) == [2, 3, 4, 5]
        now[0] += 100  # all old now: the newest two stay
        store.add_texts(["text 6"], ids=["id6"])
        assert writer.commit(store.snapshot()).versions_removed == 3
        assert generations(tmp_path) == [5, 6]
        assert_tidy(tmp_path)  # the small segments of versions 1 and 2 went with them
    finally:
        writer.release()


async def test_a_version_a_reader_pins_outlives_retention_until_the_pin_is_dropped(tmp_path: Path) -> None:
    writer = DirectoryWriter(tmp_path, retention=Retention(keep_versions=1, keep_seconds=0))
    store = CowVectorStore(HashEmbeddings(dim=DIM), **OPTIONS)
    try:
        store.add_texts(["one"], ids=["1"])
        writer.commit(store.snapshot())
        fd = os.open(tmp_path / "manifest-000000000001.json", os.O_RDONLY)  # a reader in mid-load (any process)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            for text in ("two", "three"):
                store.delete([store.snapshot().documents()[0].id])
                store.add_texts([text], ids=[text])
                writer.commit(store.snapshot())
            assert generations(tmp_path) == [1, 3]  # 1 is pinned; 2 was not
            assert needed_files(tmp_path) <= {p.name for p in tmp_path.iterdir()}
        finally:
            os.close(fd)
        store.add_texts(["four"], ids=["four"])
        assert writer.commit(store.snapshot()).versions_removed == 2
        assert generations(tmp_path) == [4]
        assert_tidy(tmp_path)
    finally:
        writer.release()


# ---------------------------------------------------------------------- readers follow versions


async def test_refresh_reads_only_new_segments_and_pinned_snapshots_keep_their_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stores: list[CowVectorStore]
) -> None:
    writer = open_writer(stores, tmp_path)
    await build(writer)
    writer.save()
    reader = load(tmp_path)
    assert reader.refresh() is False and writer.refresh() is False
    before = reader.snapshot()
    v1 = fingerprint(reader)
    await writer.aadd_document("c.md", "charlie")
    await writer.aremove_document("b.md")
    writer.save()
    read: list[str] = []
    real = files.read_regular
    monkeypatch.setattr(files, "read_regular", lambda path: (read.append(Path(path).suffix), real(path))[1])
    assert reader.refresh() is True
    monkeypatch.undo()
    assert sorted(read) == [".faiss", ".json"]  # the one new segment; the others are reused
    assert fingerprint(reader) == fingerprint(writer) and reader.sources() == ["a.md", "c.md"]
    assert before.version == v1[0] and sorted(d.metadata.get("source", "") for d in before.documents()) == [
        "",
        "a.md",
        "a.md",
        "b.md",
    ]


async def test_refresh_still_refuses_an_id_live_twice(tmp_path: Path, stores: list[CowVectorStore]) -> None:
    """A refresh checks only the new segments' ids when the segments it reuses merely lost rows, and
    every id when one got rows back: a forged manifest is caught either way."""
    writer = open_writer(stores, tmp_path)
    writer.add_texts(["one", "two"], ids=["t1", "t2"])
    writer.save()
    reader = load(tmp_path)
    writer.add_texts(["two again"], ids=["t2"])  # replaces t2: a tombstone in the first segment
    writer.save()
    assert reader.refresh()
    writer.add_texts(["three"], ids=["t3"])
    writer.save()
    manifest_path = tmp_path / manifests(tmp_path)[-1]
    manifest = json.loads(manifest_path.read_text())
    pristine = manifest_path.read_text()
    manifest["segments"][0]["dead"] = []  # t2's old row comes back: t2 is live twice
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="document id 't2' is live twice"):
        reader.refresh()
    manifest_path.write_text(pristine)
    assert reader.refresh() and fingerprint(reader) == fingerprint(writer)
    writer.add_texts(["four"], ids=["t4"])
    writer.save()
    manifest_path = tmp_path / manifests(tmp_path)[-1]
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["segments"][-1]
    rows = json.loads((tmp_path / entry["rows"]).read_text())
    rows["ids"] = ["t1"]  # the new segment claims an id the first segment holds live
    data = json.dumps(rows).encode()
    (tmp_path / entry["rows"]).unlink()
    (tmp_path / entry["rows"]).write_bytes(data)
    entry["rows_sha256"] = hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="document id 't1' is live twice"):
        reader.refresh()
    assert reader.get_by_ids(["t4"]) == [] and reader.version == 3  # unchanged


async def test_refresh_refuses_to_drop_changes_of_the_readers_own(tmp_path: Path, stores: list[CowVectorStore]) -> None:
    writer = open_writer(stores, tmp_path)
    await build(writer)
    writer.save()
    reader = load(tmp_path)
    reader.add_texts(["mine"], ids=["mine"])
    writer.add_texts(["theirs"], ids=["theirs"])
    writer.save()
    with pytest.raises(ValueError, match="changes of its own .* never saved"):
        reader.refresh()
    assert reader.get_by_ids(["mine"]) and not reader.get_by_ids(["theirs"])  # unchanged
    with pytest.raises(ValueError, match="follows no directory"):
        new_store(stores).refresh()


async def test_who_may_save_where(tmp_path: Path, stores: list[CowVectorStore]) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    writer = new_store(stores)
    await build(writer)
    with pytest.raises(ValueError, match="needs a directory"):
        writer.save()
    writer.save(one)
    with pytest.raises(ValueError, match="writes to .*one; it cannot also save into"):
        writer.save(two)
    writer._release_directory()
    with pytest.raises(ValueError, match="already holds a saved store .* CowVectorStore.open"):
        new_store(stores).save(one)
    saved = writer.save(one)  # taken again: nothing was saved there meanwhile
    assert (saved.generation, saved.segments_written) == (2, 0)
    writer._release_directory()

    reader = load(one)  # a loaded store may save back into its directory if nothing was saved since
    stores.append(reader)
    reader.add_texts(["from the reader"], ids=["r"])
    assert reader.save(one).generation == 3
    reader._release_directory()
    writer.add_texts(["x"], ids=["x"])
    with pytest.raises(ValueError, match="moved on: this store was loaded from generation 2, and generation 3"):
        writer.save(one)
    assert fingerprint(load(one)) == fingerprint(reader)
    assert writer.save(one, overwrite=True).generation == 4  # explicitly: writer's content replaces reader's
    assert fingerprint(load(one)) == fingerprint(writer)
    writer._release_directory()
    other = new_store(stores)
    other.add_texts(["another store"], ids=["o"])
    assert (await other.asave(one, overwrite=True)).generation == 5
    assert fingerprint(load(one)) == fingerprint(other)


async def test_a_released_writer_follows_the_directory_as_a_reader(tmp_path: Path, stores: list[CowVectorStore]) -> None:
    first = open_writer(stores, tmp_path)
    await build(first)
    first.save()
    first._release_directory()
    first._release_directory()  # idempotent
    second = open_writer(stores, tmp_path)
    second.add_texts(["by the second writer"], ids=["2nd"])
    second.save()
    assert first.refresh() and fingerprint(first) == fingerprint(second)


# ---------------------------------------------------------------------- several processes, SIGKILL


def test_one_writer_and_reader_processes_with_the_writer_killed_at_random_points(tmp_path: Path) -> None:
    """Writers save continuously (keeping no superseded version: only pins protect readers) and are
    SIGKILLed at seeded random points: by themselves at their N-th file-system step (a write torn in
    half), or by us right after their N-th reported save. Two reader processes load and refresh all the
    while. Every version any of them sees is one complete version, never older than one seen before;
    every save a writer reported survives its death; each new writer gets the lock at once."""
    rng = random.Random(10)
    store_dir = tmp_path / "store"
    plan = [("self", rng.randint(1, 300)) for _ in range(6)] + [("parent", rng.randint(1, 6)) for _ in range(2)]
    rng.shuffle(plan)
    saved = 0
    readers: list[subprocess.Popen[str]] = []
    round_no = 0

    def run_writer(kill_at: int, max_steps: int, stop_after: int | None) -> None:
        nonlocal saved, round_no
        round_no += 1
        err = tmp_path / f"writer-{round_no}.err"
        child = spawn("writer", store_dir, kill_at, max_steps, stderr=err)
        try:
            reports = 0
            while (report := next_report(child)) is not None and "done" not in report:
                if "opened" in report:  # what the last writer reported saved is there; at most one more
                    assert saved <= report["opened"] <= saved + 1, (saved, report, err.read_text())
                    saved = report["opened"]
                else:
                    assert report["saved"] == saved + 1, (saved, report)
                    saved = report["saved"]
                    reports += 1
                    if reports == stop_after:
                        break
        finally:
            child.kill()
            # Read the rest through the same text wrapper: communicate() would read the pipe directly and
            # miss the lines that readline() already buffered (reports of saves that did happen).
            out = child.stdout.read()  # type: ignore[union-attr]
            child.stdout.close()  # type: ignore[union-attr]
            child.stdin.close()  # type: ignore[union-attr]
            child.wait()
        for line in out.splitlines():  # saves it reported between our last read and its death
            saved = max(saved, json.loads(line).get("saved", 0))
        assert child.returncode == -9, err.read_text()

    try:
        run_writer(kill_at=10**9, max_steps=1, stop_after=None)
        assert saved == 1
        readers = [spawn("reader", store_dir, stderr=tmp_path / f"reader-{i}.err") for i in range(2)]
        for i, r in enumerate(readers):
            ready = next_report(r)
            assert ready is not None and ready["ready"] >= 1, (tmp_path / f"reader-{i}.err").read_text()
        for kind, value in plan:
            if kind == "self":
                run_writer(kill_at=value, max_steps=40, stop_after=None)
            else:
                run_writer(kill_at=10**9, max_steps=40, stop_after=value)
        summaries = []
        for r in readers:
            out, _ = r.communicate("")  # closes stdin: the reader stops, reports and exits
            summaries.append(json.loads(out.splitlines()[-1]))
    finally:
        for r in readers:
            r.kill()
            r.communicate()
    for i, summary in enumerate(summaries):
        assert summary["errors"] == [], (summary, (tmp_path / f"reader-{i}.err").read_text())
        assert summary["loads"] >= 1 and summary["last"] <= saved
    final = CowVectorStore.open(store_dir, HashEmbeddings(dim=DIM), **OPTIONS, keep_versions=1, keep_seconds=0)
    try:
        step = check_version(final.snapshot())
        assert saved <= step <= saved + 1  # nothing a finished save reported is lost
        assert_tidy(store_dir)  # the debris of every killed writer is gone, and only the newest version is left
        assert manifests(store_dir) == [manifests(store_dir)[-1]]
    finally:
        final._release_directory()
