"""Benchmark chatkit.SessionManager against raw LangGraph.

1. Per-turn overhead: sequential turns through ``SessionManager.chat`` vs raw ``graph.ainvoke`` of the same
   graph (same checkpointer type, zero-latency ExtractiveChatModel). Target: <= 1.2x.
2. Parallel sessions: 100 sessions x 5 messages sent at once, 50 ms model latency. Ideal wall time is
   5 x 50 ms (a session's turns run in series) plus the CPU time of those 500 turns at zero latency
   (measured in the same run, as the wall time of the same CPU-bound burst without latency). Target: wall / ideal <= 1.3. For comparison, the same load on the naive
   service (locking=False) and on raw graph.ainvoke, with how many of the 1,000 messages each kept.
3. Storage of one session: bytes an ``InMemorySaver`` holds after 50, 100 and 400 turns, with the default
   pruning (``keep_checkpoints=4``) vs without (``keep_checkpoints=None``: a plain ``InMemorySaver`` keeps
   every checkpoint, each with the whole message list). Target: linear growth (400 turns / 100 turns
   <= 4.5x; quadratic growth is 16x).

Run: ``.venv/bin/python benchmarks/bench_sessions.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver

from chatkit import ExtractiveChatModel, SessionManager


async def overhead(n_sessions: int, turns: int, rounds: int) -> tuple[float, float]:
    """Median CPU seconds per turn: (SessionManager.chat, raw graph.ainvoke of the same graph).

    Each round takes ``n_sessions`` fresh sessions to ``turns`` turns, the two services in alternating
    blocks of one session each, so drift and warm-up hit both alike. CPU time (``time.process_time``),
    not wall time, so other load on a shared machine does not count.
    """
    ours: list[float] = []
    raw: list[float] = []
    n = n_sessions * turns
    questions = [f"question {i} about the refund policy" for i in range(turns)]
    for r in range(rounds):
        manager = SessionManager(model=ExtractiveChatModel())
        graph = SessionManager(model=ExtractiveChatModel()).graph  # the same graph, its own InMemorySaver
        spent = {"ours": 0.0, "raw": 0.0}
        gc.collect()
        for s in range(n_sessions):
            sid = await manager.create_session()
            config = {"configurable": {"thread_id": f"raw-{s}"}}
            order = ("ours", "raw") if (r + s) % 2 == 0 else ("raw", "ours")
            for side in order:
                start = time.process_time()
                if side == "ours":
                    for q in questions:
                        await manager.chat(sid, q)
                else:
                    for q in questions:
                        await graph.ainvoke({"messages": [HumanMessage(q)]}, config)
                spent[side] += time.process_time() - start
        ours.append(spent["ours"] / n)
        raw.append(spent["raw"] / n)
    return statistics.median(ours), statistics.median(raw)


async def burst(service: str, n_sessions: int, per_session: int, latency: float) -> tuple[float, float, int]:
    """Send every message at once; return (wall seconds, CPU seconds, messages kept in the histories)."""
    manager = SessionManager(model=ExtractiveChatModel(latency=latency), locking=service != "naive")
    sessions = [await manager.create_session() for _ in range(n_sessions)]

    async def send(sid: str, text: str) -> object:
        if service == "raw graph.ainvoke":
            config = {"configurable": {"thread_id": sid}}
            return await manager.graph.ainvoke({"messages": [HumanMessage(text)]}, config)
        return await manager.chat(sid, text)

    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(send(sid, f"message {i} of {sid}") for i in range(per_session) for sid in sessions))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    kept = 0
    for sid in sessions:
        kept += len(await manager.get_history(sid))
    return wall, cpu, kept


def stored_bytes(saver: InMemorySaver) -> int:
    """The bytes an InMemorySaver holds: serialized checkpoints, metadata, pending writes and channel values."""
    total = 0
    for namespaces in saver.storage.values():
        for checkpoints in namespaces.values():
            for checkpoint, metadata, _parent in checkpoints.values():
                total += len(checkpoint[1]) + len(metadata[1])
    for writes in saver.writes.values():
        for _task, _channel, value, _path in writes.values():
            total += len(value[1])
    return total + sum(len(value[1]) for value in saver.blobs.values())


async def storage(turns: list[int], keep: int | None) -> list[int]:
    """Bytes held after each count of ``turns`` sequential turns of one session."""
    saver = InMemorySaver()
    manager = SessionManager(checkpointer=saver, keep_checkpoints=keep)
    sid = await manager.create_session()
    sizes: list[int] = []
    done = 0
    for target in turns:
        for i in range(done, target):
            await manager.chat(sid, f"question {i} about the refund policy")
        done = target
        sizes.append(stored_bytes(saver))
    return sizes


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


async def main(quick: bool) -> None:
    n_sessions, turns, rounds = (4, 10, 3) if quick else (10, 20, 7)
    burst_sessions, per_session, latency = (20, 5, 0.05) if quick else (100, 5, 0.05)

    ours, raw = await overhead(n_sessions, turns, rounds)
    await burst("SessionManager", burst_sessions, per_session, 0.0)  # warm-up
    zero_wall, zero_cpu, _ = await burst("SessionManager", burst_sessions, per_session, 0.0)
    wall, _, kept = await burst("SessionManager", burst_sessions, per_session, latency)
    # The zero-latency burst is CPU-bound: its wall time is the CPU time of the 500 turns (plus whatever else
    # a shared machine runs meanwhile, which then slows the timed burst alike). Both figures are printed.
    ideal = per_session * latency + zero_wall
    naive_wall, _, naive_kept = await burst("naive", burst_sessions, per_session, latency)
    raw_wall, _, raw_kept = await burst("raw graph.ainvoke", burst_sessions, per_session, latency)
    expected = 2 * burst_sessions * per_session

    marks = [50, 100, 400]
    pruned = await storage(marks, keep=4)
    plain = await storage(marks, keep=None)
    growth = pruned[2] / pruned[1]

    rows = [
        ("per-turn CPU time, zero-latency model", f"{ours * 1e3:.2f} ms vs {raw * 1e3:.2f} ms raw graph.ainvoke",
         ours / raw, "<= 1.2", ours / raw <= 1.2),
        (f"{burst_sessions} sessions x {per_session} msgs at once, {latency * 1e3:.0f} ms latency",
         f"{wall:.3f} s vs ideal {ideal:.3f} s (= {per_session} x {latency * 1e3:.0f} ms + {zero_wall:.3f} s CPU)",
         wall / ideal, "<= 1.3", wall / ideal <= 1.3),
        ("one session's storage after 50 / 100 / 400 turns",
         f"{' / '.join(map(_mb, pruned))} vs {' / '.join(map(_mb, plain))} without pruning",
         growth, "<= 4.5", growth <= 4.5),
    ]
    print(f"SessionManager benchmark{' (--quick)' if quick else ''}; overhead: {n_sessions} sessions x {turns} turns,"
          f" median of {rounds} rounds\n")
    print(f"{'measure':<48} {'figures':<68} {'ratio':>6}  {'target':<7} ok")
    for name, figures, ratio, target, ok in rows:
        print(f"{name:<48} {figures:<68} {ratio:>6.2f}  {target:<7} {'yes' if ok else 'NO'}")
    print(f"\nSame burst, messages kept (of {expected}): SessionManager {kept}, naive service (locking=False)"
          f" {naive_kept} in {naive_wall:.3f} s, raw graph.ainvoke {raw_kept} in {raw_wall:.3f} s")
    print(f"The zero-latency burst: {zero_cpu:.3f} s CPU (process time), {zero_wall:.3f} s wall")
    print(f"Storage ratio (ratio column): 400 turns / 100 turns with keep_checkpoints=4; without pruning "
          f"{plain[2] / plain[1]:.1f}x. At 400 turns: {plain[2] / pruned[2]:.0f}x less with pruning.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run with smaller loads")
    asyncio.run(main(parser.parse_args().quick))
