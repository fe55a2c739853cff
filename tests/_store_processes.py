"""Child processes for the store-directory tests: a writer that saves continuously (and can SIGKILL itself
at its N-th file-system step), a reader that loads and refreshes, and the check every version must pass.

Run as ``python -m tests._store_processes writer DIR KILL_AT MAX_STEPS`` or ``... reader DIR``; each
reports on stdout, one JSON object per line.

What the writer builds, step by step (so any version can be checked on its own): at step ``s`` it
publishes ids ``a``, ``b``, ``c`` (text ``"step s"``) and ``n-s``, all with metadata ``{"step": s}``,
in one ``add_texts`` call (replacing the previous ``a``, ``b``, ``c``); when ``s % 3 == 0`` it deletes
``n-(s-1)``; when ``s % 4 == 0`` it compacts; then it saves and reports the step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DIM = 16
STEP_FUNCTIONS = ("write_file", "fsync", "replace", "fsync_dir", "remove")


def say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def expected_ids(step: int) -> set[str]:
    """The live ids of the version saved after ``step``."""
    ids = {"a", "b", "c"} | {f"n-{k}" for k in range(1, step + 1)}
    return ids - {f"n-{s - 1}" for s in range(3, step + 1, 3)}


def expected_version(step: int) -> int:
    """The store version after ``step``: one publish per step, plus one per delete."""
    return step + step // 3


def check_version(snap: Any) -> int:
    """Check that a snapshot is one complete version the writer saved; return its step.

    Raises:
        AssertionError: it is not (mixed steps, missing or extra documents, a wrong version number).
    """
    docs = {d.id: d for d in snap.documents()}
    step = docs["a"].metadata["step"]
    for doc_id in "abc":
        assert docs[doc_id].metadata == {"step": step}, (doc_id, docs[doc_id].metadata, step)
        assert docs[doc_id].page_content == f"step {step}", (doc_id, docs[doc_id].page_content, step)
    assert set(docs) == expected_ids(step), sorted(set(docs) ^ expected_ids(step))
    for doc_id, doc in docs.items():
        if doc_id.startswith("n-"):
            assert doc.metadata == {"step": int(doc_id[2:])}, (doc_id, doc.metadata)
    assert snap.version == expected_version(step), (snap.version, step)
    hits = snap.similarity_search(f"step {step}", k=5)
    assert hits and all(h.id in docs for h in hits)
    return step


def _kill_at(n: int) -> None:
    """SIGKILL this process at its ``n``-th file-system step (a write is torn: half its bytes first)."""
    import chatkit.store.files as files

    count = 0

    def counted(name: str) -> Any:
        real = getattr(files, name)

        def step(*args: Any) -> Any:
            nonlocal count
            count += 1
            if count == n:
                if name == "write_file":
                    path, data = args
                    with open(path, "xb") as f:
                        f.write(bytes(memoryview(data))[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)

        return step

    for name in STEP_FUNCTIONS:
        setattr(files, name, counted(name))


def writer(directory: Path, kill_at: int, max_steps: int) -> None:
    from chatkit import CowVectorStore, HashEmbeddings

    _kill_at(kill_at)
    store = CowVectorStore.open(
        directory, HashEmbeddings(dim=DIM), compaction="off", progress=False, keep_versions=1, keep_seconds=0
    )
    found = store.get_by_ids(["a"])
    step = found[0].metadata["step"] if found else 0
    say(opened=step)
    for _ in range(max_steps):
        step += 1
        store.add_texts([f"step {step}"] * 4, [{"step": step}] * 4, ids=["a", "b", "c", f"n-{step}"])
        if step % 3 == 0:
            store.delete([f"n-{step - 1}"])
        if step % 4 == 0:
            store.compact()
        saved = store.save()
        say(saved=step, generation=saved.generation)
    say(done=step)
    sys.stdin.read()  # the parent kills us here


def reader(directory: Path) -> None:
    """Load, then refresh (and now and then load afresh) until stdin closes; check every version seen,
    and that a snapshot taken before a refresh still answers from its own version."""
    from chatkit import CowVectorStore, HashEmbeddings

    os.nice(10)  # readers spin; let the writers (whose progress the test waits for) have the CPU first
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    def load() -> Any:
        return CowVectorStore.load(directory, HashEmbeddings(dim=DIM), progress=False)

    store = load()
    last = check_version(store.snapshot())
    say(ready=last)
    loads, refreshes, moved, seen, errors = 1, 0, 0, {last}, []
    i = 0
    while not stop.is_set() and len(errors) < 20:
        i += 1
        try:
            before = store.snapshot()
            if i % 4 == 0:
                store = load()
                loads += 1
            else:
                moved += store.refresh()
                refreshes += 1
            step = check_version(store.snapshot())
            assert step >= last, f"went back from step {last} to {step}"
            assert check_version(before) == last  # the old version, still whole in memory
            last = step
            seen.add(step)
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
            errors.append(f"{type(exc).__name__}: {exc}")
    say(loads=loads, refreshes=refreshes, moved=moved, steps_seen=len(seen), last=last, errors=errors)


def holder(directory: Path) -> None:
    """Open ``directory`` as its writer, say so, and hold it until killed."""
    from chatkit import CowVectorStore, HashEmbeddings

    store = CowVectorStore.open(directory, HashEmbeddings(dim=DIM), progress=False)
    say(pid=os.getpid())
    sys.stdin.read()
    store._release_directory()


if __name__ == "__main__":
    role, where = sys.argv[1], Path(sys.argv[2])
    if role == "writer":
        writer(where, int(sys.argv[3]), int(sys.argv[4]))
    elif role == "reader":
        reader(where)
    elif role == "holder":
        holder(where)
    else:
        raise SystemExit(f"unknown role {role!r}")
