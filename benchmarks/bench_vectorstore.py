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
5. async search p95 while 60 writers embed (0.3 s each, off the CPU) vs idle: <= 2x. Baseline: the old
   design, embedding jobs and ``asyncio.to_thread`` searches on one shared default executor.
6. the longest event-loop stall while ``aadd_sources`` indexes 1,000 / 2,000 / 4,000 documents: <= 50 ms
   (5 runs each). Baseline: the stall caused by just splitting those documents in a plain thread (GIL).
7. filtered search at 100k vs the same search unfiltered: a filter matching 1 row <= 2x; broader filters
   and a callable filter (applied after the scan) shown without a target.
8. persistence at 100k x 128 (the issue's case): a save after a 1-row change vs the first (full) save of
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
EMBED_WRITERS, EMBED_SECONDS = 60, 0.3  # issue 10: async searches while 60 writers embed for 0.3 s each
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
        v = np.random.default_rng().standard_normal(DIM, dtype=np.float32)  # instant: only writers wait
        return list(v / np.linalg.norm(v))


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
    await store.aadd_sources({f"doc-{i}": ten_chunks(f"doc-{i}") for i in range(sourced)})
    left = n - 10 * sourced
    for start in range(0, left, 5000):
        count = min(5000, left - start)
        # metadata for the filter rows: "row" is unique (a selective filter), "half" matches every other row
        rows = [{"row": start + i, "half": (start + i) % 2 == 0} for i in range(count)]
        await store.aadd_texts(["x"] * count, rows)
    store.compact()
    # the same content under the default policy (background compaction), as an application would run it
    live = CowVectorStore(store.embeddings, chunk_size=80, chunk_overlap=0, progress=False)
    snap = store.snapshot()
    live._pub.state = live._pub.new_state(snap.version, snap.dim, list(snap.segments), list(snap.lives))
    store.close()
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
            await store.aadd_document(f"new-{i}", ten_chunks(f"new-{i}"))
            adds[n].append(time.perf_counter() - t)
            store.wait_for_compaction()
            t = time.perf_counter()
            await store.aadd_document(f"doc-{i % 40}", ten_chunks(f"re-{i}"))  # tombstones rows of the big segment
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
                await store.aadd_document(f"w-{i % 50}", ten_chunks(f"w-{i}"))
                published += 1
                since_on += 1
                i += 1

        asyncio.run(loop())

    store._emb.value = RandomUnitEmbeddings(writer_latency)
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

    async def ours_atomic() -> CowVectorStore:
        store = CowVectorStore(emb, progress=False, compaction="off")
        await store.aadd_sources(docs)
        return store

    async def ours_sequential() -> CowVectorStore:
        store = CowVectorStore(emb, progress=False, compaction="off")
        for name, text in docs.items():
            await store.aadd_document(name, text)
        return store

    for _ in range(reps):  # interleaved
        t = time.perf_counter()
        model.encode(chunks, normalize_embeddings=True)
        raw_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        done = asyncio.run(ours_atomic())
        atomic_t.append(time.perf_counter() - t)
        done.close()  # untimed: its worker threads end
        t = time.perf_counter()
        for file_chunks in per_file:
            model.encode(file_chunks, normalize_embeddings=True)
        raw_files_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        done = asyncio.run(ours_sequential())
        seq_t.append(time.perf_counter() - t)
        done.close()
    n = len(chunks)
    return {
        "chunks": n,
        "raw": n / min(raw_t),
        "raw_files": n / min(raw_files_t),
        "atomic": n / min(atomic_t),
        "sequential": n / min(seq_t),
    }


# ----------------------------------------------------------------------------- 8. persistence


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
# ----------------------------------------------------------------------------- 5. async readers vs embedding writers


async def readers_under_embedding(store: CowVectorStore, writers: int, embed_seconds: float) -> dict[str, float]:
    """p95 of sequential ``asimilarity_search`` calls while ``writers`` writers each embed for
    ``embed_seconds`` (off the CPU), vs idle. Baseline: the old design, where embedding jobs and async
    searches share the event loop's default executor (``run_in_executor(None)`` / ``asyncio.to_thread``)."""
    store._emb.value = RandomUnitEmbeddings(embed_seconds)  # embed_query is instant; embed_documents sleeps

    async def searches_until(done: asyncio.Future[Any] | None, count: int) -> list[float]:
        out = []
        while (done is not None and not done.done()) or (done is None and len(out) < count):
            t = time.perf_counter()
            await store.asimilarity_search("query", k=4)
            out.append(time.perf_counter() - t)
        return out

    idle = await searches_until(None, 200)
    writing = asyncio.gather(*(store.aadd_document(f"writer-{i}", ten_chunks(f"writer-{i}")) for i in range(writers)))
    busy = await searches_until(writing, 0)
    await writing
    idle += await searches_until(None, 200)

    # baseline: the same load through one shared executor (the store before issue 10)
    loop = asyncio.get_running_loop()
    snap = store.snapshot()
    q = unit_vectors(1, seed=3)[0]
    jobs = asyncio.gather(*(loop.run_in_executor(None, time.sleep, embed_seconds) for _ in range(writers)))
    shared: list[float] = []
    while not jobs.done():
        t = time.perf_counter()
        await asyncio.to_thread(snap.similarity_search_by_vector, q, 4)
        shared.append(time.perf_counter() - t)
    await jobs
    return {
        "idle_p95": p(idle, 95),
        "busy_p95": p(busy, 95),
        "busy_n": float(len(busy)),
        "shared_p95": p(shared, 95),
        "shared_n": float(len(shared)),
    }


# ----------------------------------------------------------------------------- 6. event-loop stalls of a big batch


GC_PAUSES: list[float] = []  # the garbage collector's full collections (they stop every thread)


def _gc_watch(phase: str, info: dict[str, Any], started: list[float] = [0.0]) -> None:  # noqa: B006
    if info["generation"] != 2:
        return
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        GC_PAUSES.append(time.perf_counter() - started[0])


async def longest_stall(documents: int) -> tuple[float, float]:
    """The longest time the event loop was blocked while ``aadd_sources`` indexed ``documents`` short
    documents (a 1 ms ticker measures every gap), and the same while a plain thread only splits those
    documents (no store), again and again for as long as the store took: the floor set by the GIL, which a
    thread running Python code (the write pool's splitting and checking) shares with the loop, and by the
    machine. Full garbage collections are recorded in ``GC_PAUSES``."""
    store = CowVectorStore(RandomUnitEmbeddings(), chunk_size=80, chunk_overlap=0, progress=False, compaction="off")
    docs = {f"doc-{i}.md": f"document {i}: " + "lorem ipsum " * 4 for i in range(documents)}
    worst = 0.0
    stop = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t = time.perf_counter()
    records = await store.aadd_sources(docs)
    took = time.perf_counter() - t
    stop = True
    await tick
    assert len(records) == documents
    store.close()
    busy, worst, stop = worst, 0.0, False
    splitter = CowVectorStore(RandomUnitEmbeddings(), chunk_size=80, chunk_overlap=0, progress=False)
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    def split_for(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for text in docs.values():
                splitter._split(text)
                if time.perf_counter() >= end:
                    break

    await asyncio.to_thread(split_for, took)
    stop = True
    await tick
    splitter.close()
    return busy, worst


# ----------------------------------------------------------------------------- 7. filters before the scan


def filter_latency(store: CowVectorStore, queries: int, rows: int) -> dict[str, float]:
    """Median search latency with filters of different selectivity, vs the same search unfiltered
    (``rows``: how many rows carry the ``row`` / ``half`` metadata of :func:`build_store`)."""
    store.compact()
    qs = unit_vectors(queries, seed=11)
    n = len(store)
    one = rows // 2
    filters = {
        "1 row": {"row": one},
        "100 rows ($in)": {"row": {"$in": list(range(0, rows, rows // 100))[:100]}},
        "1% ($gte/$lt)": {"row": {"$gte": 0, "$lt": n // 100}},
        "50% (half)": {"half": True},
        "50% or 1 row ($or)": {"$or": [{"half": True}, {"row": 1}]},
    }
    t = time.perf_counter()
    store.similarity_search_by_vector(qs[0], k=4, filter={"row": 0, "half": True})  # indexes both fields once
    build = time.perf_counter() - t
    times: dict[str, list[float]] = {"none": [], **{name: [] for name in filters}}
    for q in qs:  # interleaved
        t = time.perf_counter()
        store.similarity_search_by_vector(q, k=4)
        times["none"].append(time.perf_counter() - t)
        for name, flt in filters.items():
            t = time.perf_counter()
            got = store.similarity_search_by_vector(q, k=4, filter=flt)
            times[name].append(time.perf_counter() - t)
            assert got, name
    callable_t = []
    for q in qs[:3]:  # a callable filter can only be applied to candidates: the search fetches ever more
        t = time.perf_counter()
        store.similarity_search_by_vector(q, k=4, filter=lambda md: md.get("row") == one)
        callable_t.append(time.perf_counter() - t)
    out = {name: statistics.median(v) for name, v in times.items()}
    out["build"] = build
    out["callable"] = statistics.median(callable_t)
    return out


# ----------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a smoke run)")
    parser.add_argument("--no-model", action="store_true", help="skip the real-model throughput part")
    parser.add_argument("--persist-only", action="store_true", help="run only the persistence part (8.)")
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
    flt = filter_latency(stores[big], 30 if args.quick else 100, rows=big - 400)
    readers = asyncio.run(readers_under_embedding(stores[sizes[1]], EMBED_WRITERS, EMBED_SECONDS))
    for store in stores.values():
        store.close()
    del stores
    asyncio.run(longest_stall(100))  # warm-up: the first write of a process imports what it needs
    import gc

    gc.callbacks.append(_gc_watch)
    stalls = {n: [asyncio.run(longest_stall(n)) for _ in range(5)] for n in (1_000, 2_000, 4_000)}
    gc.callbacks.remove(_gc_watch)
    objects = len(gc.get_objects())
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
    lines.append(
        (
            f"async search p95, {EMBED_WRITERS} writers embedding ({EMBED_SECONDS:g} s each) @ {sizes[1]:,}",
            f"{ms(readers['busy_p95'])} ({int(readers['busy_n'])} searches)",
            f"idle {ms(readers['idle_p95'])}; one shared executor {ms(readers['shared_p95'])}",
            f"{readers['busy_p95'] / readers['idle_p95']:.2f}x <= 2: {verdict(readers['busy_p95'] <= 2 * readers['idle_p95'])}",
        )
    )
    for n, runs in stalls.items():
        stall, typical = max(r[0] for r in runs), statistics.median(r[0] for r in runs)
        floor, floor_typical = max(r[1] for r in runs), statistics.median(r[1] for r in runs)
        lines.append(
            (
                f"longest loop stall, aadd_sources of {n:,} docs",
                f"{ms(stall)} (median run {ms(typical)})",
                f"only splitting, in a thread {ms(floor)} (median {ms(floor_typical)})",
                f"<= 50 ms: {verdict(stall <= 0.05)}",
            )
        )
    longest_gc = max(GC_PAUSES, default=0.0)
    lines.append(
        (
            "  (full garbage collections during those runs)",
            f"{len(GC_PAUSES)}, longest {ms(longest_gc)}",
            f"the process tracks {objects:,} objects",
            "they stop every thread, the loop's too",
        )
    )
    lines.append((f"filtered search @ {big // 1000}k: building the field index", ms(flt["build"]), "once per segment and field", ""))
    for name in ("1 row", "100 rows ($in)", "1% ($gte/$lt)", "50% (half)", "50% or 1 row ($or)"):
        r = flt[name] / flt["none"]
        target = f"{r:.2f}x <= 2: {verdict(r <= 2)}" if name == "1 row" else f"{r:.2f}x"
        lines.append((f"search @ {big // 1000}k, filter matching {name}", ms(flt[name]), f"unfiltered {ms(flt['none'])}", target))
    lines.append(
        (
            f"search @ {big // 1000}k, callable filter matching 1 row",
            ms(flt["callable"]),
            f"unfiltered {ms(flt['none'])}",
            f"{flt['callable'] / flt['none']:.0f}x (applied after the scan, no target)",
        )
    )
    if thr is not None:
        for label, key, base, base_label in (
            ("one aadd_sources call", "atomic", "raw", "one encode call"),
            ("aadd_document per file", "sequential", "raw_files", "encode per file"),
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
