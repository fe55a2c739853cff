"""CowVectorStore benchmark: ratios against the named baselines, measured in one run.

    python benchmarks/bench_vectorstore.py [--quick]

Scale parts use random unit vectors (384-d, like all-MiniLM-L6-v2), so they measure the store, not a
model. The throughput part uses the real local model on the chunks of ``data/*.md``.

1. write cost vs store size: add (and replace) a 10-chunk document in stores of 1k, 10k, 100k chunks;
   target add(100k)/add(1k) <= 2. Baseline: copy-on-write by ``faiss.clone_index`` of the whole index.
2. search latency vs raw ``faiss.IndexFlatIP`` over the same vectors at 100k, after compaction: <= 1.3x.
3. search p95 while a writer publishes continuously vs idle: <= 2x. The writer publishes back to back;
   its model takes 5 ms per call off the CPU (as a GPU or an embedding service would). The same with
   an instant model (a writer that is nothing but CPU-bound Python) is shown as the worst case.
4. indexing throughput (chunks/s) with the real model vs ``SentenceTransformer.encode`` on the same
   chunks: >= 0.9x (all files in one call vs one encode call; file by file vs encode file by file).
5. persistence at 100k x 128 (the issue's case): a save after a 1-row change vs the first (full) save of
   the same store: a small fraction (<= 0.1x); loading the directory; a reader's refresh after a 1-row save.

Each figure is a median (or p95) over many calls, interleaved with its baseline where that is possible,
because the machine is shared and noisy. faiss runs every search (ours and the baselines) on
``--omp-threads`` OpenMP threads, 1 by default: a single query gains nothing from more, and on a small
busy machine the spinning threads make every search several times slower.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings

from chatkit import CowVectorStore

DIM = 384
WRITER_LATENCY = 0.005  # the continuous writer's model: 5 ms per embedding call, off the CPU
ROOT = Path(__file__).resolve().parent.parent


class RandomUnitEmbeddings(Embeddings):
    """Random unit vectors (384-d unless told), returned as one numpy array (CowVectorStore accepts that; it skips
    turning 100k vectors into Python lists, which would dominate the set-up time).

    ``latency``: seconds each call spends off the CPU, like a GPU or an embedding service would
    (0: instant, so a writer is nothing but CPU-bound Python)."""

    def __init__(self, latency: float = 0.0, dim: int = DIM) -> None:
        self.latency = latency
        self.dim = dim

    def embed_documents(self, texts: list[str]) -> Any:
        if self.latency:
            time.sleep(self.latency)
        v = np.random.default_rng().standard_normal((len(texts), self.dim), dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed_query(self, text: str) -> list[float]:
        return list(self.embed_documents([text])[0])


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def ten_chunks(tag: str) -> str:
    # ten paragraphs of ~60 characters, split into exactly ten chunks at chunk_size=80
    return "\n\n".join(f"{tag} paragraph {i} " + "lorem ipsum " * 4 for i in range(10))


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


# ----------------------------------------------------------------------------- building stores


async def build_store(n: int, *, sourced: int = 40) -> CowVectorStore:
    """A store of ``n`` chunks, compacted to one segment: ``sourced`` 10-chunk documents plus loose rows."""
    store = CowVectorStore(RandomUnitEmbeddings(), chunk_size=80, chunk_overlap=0, progress=False, compaction="off")
    await store.add_documents({f"doc-{i}": ten_chunks(f"doc-{i}") for i in range(sourced)})
    left = n - 10 * sourced
    for start in range(0, left, 5000):
        count = min(5000, left - start)
        await store.aadd_texts(["x"] * count)
    store.compact()
    # the same content under the default policy (background compaction), as an application would run it
    live = CowVectorStore(store.embeddings, chunk_size=80, chunk_overlap=0, progress=False)
    snap = store.snapshot()
    live._pub.state = live._pub.new_state(snap.version, snap.dim, list(snap.segments), list(snap.lives))
    return live


# ----------------------------------------------------------------------------- 1. write cost vs size


async def write_cost(stores: dict[int, CowVectorStore], reps: int) -> list[tuple[int, float, float, float]]:
    """Median latency of one add / one replace, the stores of every size measured in turn (so noise from
    the shared machine hits them alike). Background merges triggered by a write are waited for between
    (untimed): the figure is the write path itself."""
    import faiss

    sizes = list(stores)
    adds: dict[int, list[float]] = {n: [] for n in sizes}
    replaces: dict[int, list[float]] = {n: [] for n in sizes}
    for i in range(reps):
        for n, store in stores.items():
            t = time.perf_counter()
            await store.add_document(f"new-{i}", ten_chunks(f"new-{i}"))
            adds[n].append(time.perf_counter() - t)
            store.wait_for_compaction()
            t = time.perf_counter()
            await store.add_document(f"doc-{i % 40}", ten_chunks(f"re-{i}"))  # tombstones rows of the big segment
            replaces[n].append(time.perf_counter() - t)
            store.wait_for_compaction()
    rows = []
    for n in sizes:
        # baseline: copy-on-write by cloning the whole index, then adding the new document's vectors
        index = faiss.IndexFlatIP(DIM)
        index.add(unit_vectors(n, seed=n))
        clones = []
        for i in range(max(3, reps // 4)):
            t = time.perf_counter()
            copy = faiss.clone_index(index)
            copy.add(unit_vectors(10, seed=i))
            clones.append(time.perf_counter() - t)
        del index, copy
        rows.append((n, statistics.median(adds[n]), statistics.median(replaces[n]), statistics.median(clones)))
    return rows


# ----------------------------------------------------------------------------- 2./3. search latency


def search_latency(store: CowVectorStore, queries: int, writer_latency: float) -> dict[str, float]:
    import faiss

    store.compact()
    (seg,) = store.snapshot().segments
    raw = faiss.IndexFlatIP(DIM)
    raw.add(seg.vectors())
    qs = unit_vectors(queries, seed=7)
    ours, base = [], []
    for q in qs:  # interleaved, so both see the same machine
        t = time.perf_counter()
        store.similarity_search_by_vector(q, k=4)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        raw.search(q.reshape(1, -1), 4)
        base.append(time.perf_counter() - t)

    # p95 idle vs while a writer publishes continuously (10-chunk documents, background compaction on).
    # The writer is switched on and off in alternating windows, so idle and busy figures see the same
    # background load on the shared machine.
    active, parked, stop = threading.Event(), threading.Event(), threading.Event()
    published = 0
    since_on = 0

    def writer() -> None:
        async def loop() -> None:
            nonlocal published, since_on
            i = 0
            while not stop.is_set():
                if not active.is_set():
                    parked.set()
                    active.wait()
                    continue
                parked.clear()
                await store.add_document(f"w-{i % 50}", ten_chunks(f"w-{i}"))
                published += 1
                since_on += 1
                i += 1

        asyncio.run(loop())

    store._embeddings = RandomUnitEmbeddings(writer_latency)
    thread = threading.Thread(target=writer, name="writer")
    thread.start()
    idle: list[float] = []
    busy: list[float] = []
    windows = 6
    per_window = max(1, len(qs) // windows)
    try:
        for w in range(2 * windows):
            writing = w % 2 == 1
            if writing:
                since_on = 0
                active.set()
                while since_on < 3:  # the writer is publishing
                    time.sleep(0.0005)
            else:
                active.clear()
                parked.wait()
                store.wait_for_compaction()  # idle means idle: no merge running either
            for q in qs[(w // 2) * per_window : (w // 2 + 1) * per_window]:
                t = time.perf_counter()
                store.similarity_search_by_vector(q, k=4)
                (busy if writing else idle).append(time.perf_counter() - t)
    finally:
        stop.set()
        active.set()
        thread.join()
    store.wait_for_compaction()
    return {
        "ours": statistics.median(ours),
        "raw": statistics.median(base),
        "idle_p95": p(idle, 95),
        "busy_p95": p(busy, 95),
        "published": float(published),
    }


# ----------------------------------------------------------------------------- 4. real-model throughput


def model_throughput(files: int | None, reps: int) -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from chatkit import default_embeddings

    emb = default_embeddings()
    model = emb._client  # the SentenceTransformer inside langchain_huggingface's wrapper
    paths = sorted((ROOT / "data").glob("*.md"))[:files]
    docs = {p.name: p.read_text() for p in paths}
    probe = CowVectorStore(emb, progress=False)
    chunks = [c for text in docs.values() for c in probe._split(text)]
    per_file = [probe._split(text) for text in docs.values()]
    model.encode(chunks[:16], normalize_embeddings=True)  # warm-up
    raw_t, raw_files_t, atomic_t, seq_t = [], [], [], []

    async def ours_atomic() -> None:
        store = CowVectorStore(emb, progress=False, compaction="off")
        await store.add_documents(docs)

    async def ours_sequential() -> None:
        store = CowVectorStore(emb, progress=False, compaction="off")
        for name, text in docs.items():
            await store.add_document(name, text)

    for _ in range(reps):  # interleaved
        t = time.perf_counter()
        model.encode(chunks, normalize_embeddings=True)
        raw_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        asyncio.run(ours_atomic())
        atomic_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        for file_chunks in per_file:
            model.encode(file_chunks, normalize_embeddings=True)
        raw_files_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        asyncio.run(ours_sequential())
        seq_t.append(time.perf_counter() - t)
    n = len(chunks)
    return {
        "chunks": n,
        "raw": n / min(raw_t),
        "raw_files": n / min(raw_files_t),
        "atomic": n / min(atomic_t),
        "sequential": n / min(seq_t),
    }


# ----------------------------------------------------------------------------- 5. persistence


def persistence(n: int, dim: int, reps: int) -> dict[str, float]:
    """Full save vs a save after a 1-row change, load, refresh; each a median over ``reps`` runs."""
    import shutil
    import tempfile

    emb = RandomUnitEmbeddings(dim=dim)
    source = CowVectorStore(emb, progress=False, compaction="off")
    for start in range(0, n, 5000):
        source.add_texts([f"row {i}" for i in range(start, min(n, start + 5000))])
    source.compact()
    snap = source.snapshot()
    root = Path(tempfile.mkdtemp(prefix="bench-persist-"))
    try:
        full: list[float] = []
        for r in range(reps):  # the first save of a store, each into an empty directory
            store = CowVectorStore(emb, progress=False, compaction="off")
            store._pub.state = store._pub.new_state(snap.version, snap.dim, list(snap.segments), list(snap.lives))
            t = time.perf_counter()
            store.save(root / f"full-{r}")
            full.append(time.perf_counter() - t)
            store._release_directory()
            if r:
                shutil.rmtree(root / f"full-{r}")
        writer = CowVectorStore.open(root / "full-0", emb, progress=False, compaction="off")
        reader = CowVectorStore.load(root / "full-0", emb, progress=False)
        one_row: list[float] = []
        refresh: list[float] = []
        written = 0
        for r in range(4 * reps):
            writer.add_texts([f"one more row {r}"])
            t = time.perf_counter()
            saved = writer.save()
            one_row.append(time.perf_counter() - t)
            written = max(written, saved.bytes_written)
            t = time.perf_counter()
            reader.refresh()
            refresh.append(time.perf_counter() - t)
        writer._release_directory()
        loads: list[float] = []
        for _ in range(reps):
            t = time.perf_counter()
            CowVectorStore.load(root / "full-0", emb, progress=False)
            loads.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(root)
    return {
        "full": statistics.median(full),
        "one_row": statistics.median(one_row),
        "one_row_bytes": float(written),
        "load": statistics.median(loads),
        "refresh": statistics.median(refresh),
    }


def persistence_rows(quick: bool) -> list[tuple[str, str, str, str]]:
    rows = 10_000 if quick else 100_000
    per = persistence(rows, 128, 3)
    r_save = per["one_row"] / per["full"]
    return [
        (
            f"save after a 1-row change @ {rows // 1000}k x 128",
            f"{ms(per['one_row'])} ({per['one_row_bytes'] / 1024:.1f} KiB of segments)",
            f"first (full) save {ms(per['full'])}",
            f"{r_save:.3f}x <= 0.1: {verdict(r_save <= 0.1)}",
        ),
        (f"load @ {rows // 1000}k x 128 (every check)", ms(per["load"]), "", ""),
        ("reader refresh after a 1-row save", ms(per["refresh"]), f"load {ms(per['load'])}", f"{per['refresh'] / per['load']:.3f}x"),
    ]


# ----------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a smoke run)")
    parser.add_argument("--no-model", action="store_true", help="skip the real-model throughput part")
    parser.add_argument("--persist-only", action="store_true", help="run only the persistence part (5.)")
    parser.add_argument(
        "--omp-threads",
        type=int,
        default=1,
        help="faiss OpenMP threads for every search, ours and the baselines (default 1: a single query gains "
        "nothing from OpenMP, and on a small shared machine its spinning threads slow every search)",
    )
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.omp_threads)
    sizes = [1_000, 5_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    reps = 10 if args.quick else 40
    big = sizes[-1]
    t0 = time.perf_counter()
    if args.persist_only:
        print_table(persistence_rows(args.quick), t0, args.quick)
        return

    stores = {n: asyncio.run(build_store(n)) for n in sizes}
    cost = asyncio.run(write_cost(stores, reps))
    lat = search_latency(stores[big], 60 if args.quick else 150, WRITER_LATENCY)
    worst = search_latency(stores[big], 60 if args.quick else 150, 0.0)
    del stores
    thr = None if args.no_model else model_throughput(3 if args.quick else None, 1 if args.quick else 3)

    small, large = cost[0], cost[-1]
    lines: list[tuple[str, str, str, str]] = []
    for n, add, rep, clone in cost:
        lines.append((f"add 10-chunk doc @ {n:,} chunks", f"{ms(add)} (replace {ms(rep)})", f"clone_index {ms(clone)}", ""))
    r_add = large[1] / small[1]
    r_rep = large[2] / small[2]
    r_clone = large[3] / small[3]
    lines.append((f"add({big // 1000}k)/add(1k)", f"{r_add:.2f}x (replace {r_rep:.2f}x)", f"clone {r_clone:.1f}x", f"<= 2: {verdict(r_add <= 2)}"))
    r_search = lat["ours"] / lat["raw"]
    lines.append((f"search @ {big // 1000}k, compacted", f"{ms(lat['ours'])}", f"IndexFlatIP {ms(lat['raw'])}", f"{r_search:.2f}x <= 1.3: {verdict(r_search <= 1.3)}"))
    r_p95 = lat["busy_p95"] / lat["idle_p95"]
    lines.append(
        (
            f"search p95, writer publishing ({WRITER_LATENCY * 1e3:.0f} ms model)",
            f"{ms(lat['busy_p95'])} ({int(lat['published'])} publishes)",
            f"idle {ms(lat['idle_p95'])}",
            f"{r_p95:.2f}x <= 2: {verdict(r_p95 <= 2)}",
        )
    )
    r_worst = worst["busy_p95"] / worst["idle_p95"]
    lines.append(
        (
            "search p95, CPU-bound writer (instant model)",
            f"{ms(worst['busy_p95'])} ({int(worst['published'])} publishes)",
            f"idle {ms(worst['idle_p95'])}",
            f"{r_worst:.2f}x (worst case, no target)",
        )
    )
    if thr is not None:
        for label, key, base, base_label in (
            ("one add_documents call", "atomic", "raw", "one encode call"),
            ("add_document per file", "sequential", "raw_files", "encode per file"),
        ):
            r = thr[key] / thr[base]
            lines.append(
                (
                    f"index {int(thr['chunks'])} chunks, {label}",
                    f"{thr[key]:.0f} chunks/s",
                    f"{base_label} {thr[base]:.0f} chunks/s",
                    f"{r:.2f}x >= 0.9: {verdict(r >= 0.9)}",
                )
            )
    lines.extend(persistence_rows(args.quick))
    print_table(lines, t0, args.quick)


def print_table(lines: list[tuple[str, str, str, str]], t0: float, quick: bool) -> None:
    widths = [max(len(row[i]) for row in lines + [("measure", "CowVectorStore", "baseline", "ratio / target")]) for i in range(4)]
    header = ("measure", "CowVectorStore", "baseline", "ratio / target")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in lines:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n({'quick' if quick else 'full'} run, {time.perf_counter() - t0:.0f} s, {os.cpu_count()} cores,"
        f" load average {load:.1f}, faiss omp threads: {omp_threads()})"
    )


def omp_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


if __name__ == "__main__":
    main()
