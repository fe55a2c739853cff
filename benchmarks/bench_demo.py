"""Benchmark the demo end to end: simulated users chatting through ``gradio_client`` on loopback.

Every user is one ``gradio_client.Client`` (its own Gradio session, so its own chatkit session) and sends
its messages one after another through the Chat tab's ``/chat`` endpoint; all users run at once. We
measure per-message latency (p50, p95) and throughput, then check every history: exactly the messages
sent, in order, each followed by its reply (an anomaly is any difference; target 0).

The same load then runs against a baseline: the same app with Gradio's default of one running event
per endpoint (``concurrency_limit=1``), the "one global queue" that makes every user wait for every other.

Usage::

    .venv/bin/python benchmarks/bench_demo.py            # 50 users x 10 messages, MiniLM embeddings
    .venv/bin/python benchmarks/bench_demo.py --quick    # 10 users x 3 messages, hash embeddings
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # demo_app.py is a script next to the package, not part of it
    sys.path.insert(0, str(REPO))

import chatkit  # noqa: E402
import demo_app  # noqa: E402


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One load run: latencies (seconds), wall time and anomalies found afterwards."""

    label: str
    latencies: tuple[float, ...]
    wall: float
    anomalies: int
    errors: int

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p95(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_history(history: list[dict], sent: list[str], replies: list[str]) -> int:
    """Anomalies in one user's final history: every difference from [q1, a1, q2, a2, ...]."""
    expected = [m for pair in zip(sent, replies, strict=True) for m in pair]
    got = [m.get("content") for m in history]
    roles = [m.get("role") for m in history]
    anomalies = sum(1 for a, b in zip(expected, got) if a != b) + abs(len(expected) - len(got))
    anomalies += sum(1 for i, r in enumerate(roles) if r != ("user" if i % 2 == 0 else "assistant"))
    return anomalies


def run_load(url: str, *, users: int, messages: int, label: str) -> LoadResult:
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in range(users)]
    latencies: list[float] = []
    anomalies = 0
    errors = 0
    guard = threading.Lock()
    start_line = threading.Barrier(users)

    def user(u: int) -> None:
        nonlocal anomalies, errors
        client = clients[u]
        sent: list[str] = []
        replies: list[str] = []
        start_line.wait()
        for i in range(messages):
            text = f"User {u} message {i}: how does a per-key lock prevent a lost update?"
            t0 = time.perf_counter()
            try:
                history, _sources, _box = client.predict(text, api_name="/chat")
            except Exception:  # noqa: BLE001 - counted, the run goes on
                with guard:
                    errors += 1
                continue
            elapsed = time.perf_counter() - t0
            sent.append(text)
            # this turn's reply is the message right after this turn's question
            idx = max(i for i, m in enumerate(history) if m.get("content") == text)
            replies.append(history[idx + 1]["content"] if idx + 1 < len(history) else "")
            with guard:
                latencies.append(elapsed)
        final = client.predict(client.predict(api_name="/my_session"), api_name="/history")
        bad = _check_history(final, sent, replies)
        with guard:
            anomalies += bad

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=users) as pool:
        list(pool.map(user, range(users)))
    wall = time.perf_counter() - t0
    for client in clients:
        client.close()
    return LoadResult(label, tuple(latencies), wall, anomalies, errors)


def _serve(services: demo_app.DemoServices, *, chat_concurrency: int | None):
    app = demo_app.build_demo(services=services, chat_concurrency=chat_concurrency)
    app.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 users x 3 messages, hash embeddings")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--latency", type=float, default=0.05, help="model seconds per reply (default 0.05)")
    parser.add_argument("--embeddings", choices=("minilm", "hash"), default=None)
    args = parser.parse_args(argv)
    users = args.users or (10 if args.quick else 50)
    messages = args.messages or (3 if args.quick else 10)
    embeddings = args.embeddings or ("hash" if args.quick else "minilm")

    config = demo_app.DemoConfig(embeddings=embeddings, latency=args.latency)
    services = demo_app.DemoServices(config)
    print(f"loading the demo ({embeddings} embeddings, data/)…", flush=True)
    t0 = time.perf_counter()
    chatkit.run(services.ready())
    print(f"ready in {time.perf_counter() - t0:.1f} s; {users} users x {messages} messages, "
          f"model latency {args.latency * 1000:.0f} ms", flush=True)

    results: list[LoadResult] = []
    for label, limit in (("chatkit demo", demo_app.CHAT_LIMIT), ("global queue (limit 1)", 1)):
        app = _serve(services, chat_concurrency=limit)
        try:
            results.append(run_load(app.local_url.rstrip("/"), users=users, messages=messages, label=label))
        finally:
            app.close()

    ours, base = results
    print()
    print(f"| run | messages | p50 ms | p95 ms | throughput msg/s | anomalies | errors |")
    print(f"|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.label} | {len(r.latencies)} | {r.p50 * 1000:.0f} | {r.p95 * 1000:.0f} | "
              f"{r.throughput:.1f} | {r.anomalies} | {r.errors} |")
    print()
    speedup = ours.throughput / base.throughput
    p95_ratio = ours.p95 / base.p95
    print("| measure | measured | target |")
    print("|---|---|---|")
    print(f"| anomalies (lost, reordered, foreign messages) | {ours.anomalies} | 0 |")
    print(f"| errors | {ours.errors} | 0 |")
    print(f"| throughput, ours / global queue | {speedup:.1f}x | >= 3x |")
    print(f"| p95 latency, ours / global queue | {p95_ratio:.2f}x | <= 0.5x |")
    ok = ours.anomalies == 0 and ours.errors == 0 and speedup >= 3 and p95_ratio <= 0.5
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return 0 if ours.anomalies == 0 and ours.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
