"""Benchmark the demo end to end: simulated users chatting through ``gradio_client`` on loopback.

Every user is one ``gradio_client.Client`` (its own Gradio session, so its own chatkit session) and sends
its messages one after another through the Chat tab's ``/chat`` endpoint; all users run at once. We
measure per-message latency (p50, p95) and throughput, then check every history: exactly the messages
sent, in order, each followed by its reply (an anomaly is any difference; target 0).

The same users then run against a baseline: the same app with Gradio's default of one running event
per endpoint (``concurrency_limit=1``), the "one global queue" that makes every user wait for every other
(with fewer messages each, since it answers one message at a time whatever the load).

The model is the offline extractive one with a fixed latency (default 250 ms, a fast LLM); the server
runs in its own process; the simulated clients share this machine's two cores with it (one
``gradio_client`` call costs ~65 ms of client CPU), so the figures are a floor, not a ceiling.

Then the server's memory (its resident set size, RSS, read from ``/proc``), on a server of its own that
expires conversations after a few idle seconds: after ``--sessions`` short conversations, after they expired,
after a second round of as many (and its expiry), after one *maximal* conversation (``--max-turns``
messages of the longest length the demo accepts) and its expiry, and after three 500 KiB documents were
added and removed. Bounded means: the maximal conversation
costs a bounded amount (the turn limit and pruned checkpoints), and the RSS after each expiry stays flat
(round 2 leaves what round 1 left: nothing per visitor is kept).

Usage::

    .venv/bin/python benchmarks/bench_demo.py            # 50 users x 10 messages, MiniLM; memory: 100 sessions
    .venv/bin/python benchmarks/bench_demo.py --quick    # 10 users x 3 messages, hash embeddings (~1 min)
    .venv/bin/python benchmarks/bench_demo.py --memory-only --sessions 300
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import subprocess
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
MAX_CHARS = 2000  # the demo's longest message (DemoConfig.max_message_chars)
SPEEDUP_TARGET = 3.0
P95_TARGET = 0.5


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


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _text(message: dict) -> str:
    """A chat message's text (the Chatbot sends content as a list of typed parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or () if isinstance(p, dict))


def _check_history(history: list[dict], sent: list[str], replies: list[str]) -> int:
    """Anomalies in one user's final history: every difference from [q1, a1, q2, a2, ...]."""
    expected = [m for pair in zip(sent, replies, strict=True) for m in pair]
    got = [_text(m) for m in history]
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
        try:
            session_id = client.predict(api_name="/my_session")  # warm up: the first call fetches the API info
        except BaseException:
            start_line.abort()  # the others must not wait at the start line for a user who will never come
            raise
        start_line.wait()
        for i in range(messages):
            text = f"User {u} message {i}: how does a per-key lock prevent a lost update?"
            t0 = time.perf_counter()
            try:
                history, _sources = client.predict(text, api_name="/chat")
            except Exception:  # noqa: BLE001 - counted, the run goes on
                with guard:
                    errors += 1
                continue
            elapsed = time.perf_counter() - t0
            sent.append(text)
            # this turn's reply is the message right after this turn's question
            idx = max((i for i, m in enumerate(history) if _text(m) == text), default=-1)
            replies.append(_text(history[idx + 1]) if 0 <= idx < len(history) - 1 else "")
            with guard:
                latencies.append(elapsed)
        final = client.predict(session_id, api_name="/history")
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


class DemoServer:
    """``demo_app.py`` in its own process (so clients and server don't share a GIL)."""

    def __init__(
        self, *, port: int, embeddings: str, latency: float, chat_concurrency: int, extra: tuple[str, ...] = ()
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, str(REPO / "demo_app.py"), "--port", str(port), "--embeddings", embeddings,
               "--latency", str(latency), "--chat-concurrency", str(chat_concurrency), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:  # keeps reading, so the server never blocks on a full pipe
        assert self._proc.stdout is not None
        for line in iter(self._proc.stdout.readline, ""):
            self._lines.put(line)
        self._lines.put("")

    def wait_ready(self, timeout: float = 300.0) -> str:
        """Wait until the page answers *and* the knowledge base is indexed (the page answers first and
        shows a loading state; a load started before indexing ends would time the indexing, not the chat)."""
        seen: list[str] = []
        running = indexed = False
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError("the demo did not start:\n" + "".join(seen)) from None
            if not line:
                raise RuntimeError("the demo exited:\n" + "".join(seen))
            seen.append(line)
            running = running or "chatkit demo running at" in line
            indexed = indexed or "demo ready:" in line
            if running and indexed:
                return self.url

    def rss_mb(self) -> float:
        """The server process's resident set size now, in MB (Linux ``/proc``)."""
        for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc: this part of the benchmark needs Linux")

    def wait_empty(self, timeout: float = 120.0) -> None:
        """Wait until the server's expiry sweep reports no conversation and no page left (its log line)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("the conversations did not expire in time") from None
            if not line:
                raise RuntimeError("the demo exited")
            found = EXPIRY_LINE.search(line)
            if found and found.group(1) == "0" and found.group(2) == "0":
                return

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


EXPIRY_LINE = re.compile(r"; (\d+) conversations, (\d+) pages left")


@dataclass(frozen=True, slots=True)
class MemoryResult:
    """Server RSS (MB) at each step of the memory run."""

    steps: tuple[tuple[str, float], ...]

    def of(self, label: str) -> float:
        return dict(self.steps)[label]


def _conversations(url: str, *, sessions: int, messages: int, workers: int = 4) -> None:
    """``sessions`` short conversations (each its own client: its own browser session) of ``messages`` each."""
    from gradio_client import Client

    def one(i: int) -> None:
        client = Client(url, verbose=False)
        try:
            for j in range(messages):
                client.predict(f"Visitor {i}, message {j}: what is a lost update?", api_name="/chat")
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(sessions)))


def _maximal(url: str, *, turns: int, chars: int) -> None:
    """One conversation as long as the demo allows: ``turns`` messages of ``chars`` characters."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    try:
        for i in range(turns):
            head = f"Turn {i}: how do snapshots stop partial reads? "
            client.predict((head + "x" * chars)[:chars], api_name="/chat")
    finally:
        client.close()


def _documents(server: DemoServer, *, count: int, kib: int) -> list[tuple[str, float]]:
    """Add ``count`` documents of ``kib`` KiB (one upload), then remove them one by one; RSS after each."""
    import tempfile

    from gradio_client import Client, handle_file

    steps = []
    client = Client(server.url, verbose=False)
    try:
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for i in range(count):
                path = Path(folder) / f"bench-{i}.md"
                sentence = f"Document {i} explains how a per-key lock orders the turns of one session. "
                path.write_text((sentence * (kib * 1024 // len(sentence) + 1))[: kib * 1024 - 16])
                paths.append(path)
            client.predict([handle_file(str(p)) for p in paths], api_name="/upload")
            steps.append((f"{count} documents of {kib} KiB added", server.rss_mb()))
            for path in paths:
                client.predict(path.name, api_name="/remove")
            steps.append((f"{count} documents of {kib} KiB removed", server.rss_mb()))
    finally:
        client.close()
    return steps


def run_memory(*, sessions: int, messages: int, max_turns: int, ttl: float) -> MemoryResult:
    """The memory run (hash embeddings, no model latency): RSS after each step; see the module docstring."""
    (port,) = _free_ports(1)
    extra = ("--session-ttl", str(ttl), "--sweep-interval", str(max(0.2, ttl / 4)), "--max-turns", str(max_turns))
    server = DemoServer(port=port, embeddings="hash", latency=0.0, chat_concurrency=demo_app_chat_limit(), extra=extra)
    steps: list[tuple[str, float]] = []
    try:
        url = server.wait_ready()
        _conversations(url, sessions=2, messages=1)  # warm-up: the first requests build the services
        server.wait_empty()
        steps.append(("started (after a warm-up, expired)", server.rss_mb()))
        for rnd in (1, 2):
            _conversations(url, sessions=sessions, messages=messages)
            steps.append((f"after {sessions} sessions x {messages} messages (round {rnd})", server.rss_mb()))
            server.wait_empty()
            steps.append((f"round {rnd} expired", server.rss_mb()))
        _maximal(url, turns=max_turns, chars=MAX_CHARS)
        steps.append((f"after one maximal session ({max_turns} turns x {MAX_CHARS:,} characters)", server.rss_mb()))
        server.wait_empty()
        steps.append(("maximal session expired", server.rss_mb()))
        steps.extend(_documents(server, count=3, kib=500))
    finally:
        server.stop()
    return MemoryResult(tuple(steps))


def print_memory(result: MemoryResult) -> bool:
    """Print the memory table; ``True`` when the RSS after expiry stayed flat (round 2 within 10% or 20 MB
    of round 1)."""
    print("| server RSS | MB |")
    print("|---|---|")
    for label, mb in result.steps:
        print(f"| {label} | {mb:.0f} |")
    first, second = result.of("round 1 expired"), result.of("round 2 expired")
    flat = second - first <= max(20.0, 0.1 * first)
    print(f"\nafter expiry, round 2 - round 1: {second - first:+.0f} MB ({'flat' if flat else 'GROWING'})")
    return flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 users x 3 messages, hash embeddings")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--latency", type=float, default=0.25, help="model seconds per reply (default 0.25)")
    parser.add_argument("--baseline-messages", type=int, default=None,
                        help="messages per user for the global-queue baseline (default 1): it runs "
                        "one message at a time, so its throughput does not depend on the load's length")
    parser.add_argument("--embeddings", choices=("minilm", "hash"), default=None)
    parser.add_argument("--sessions", type=int, default=None,
                        help="memory run: short conversations per round (default 100; --quick 30)")
    parser.add_argument("--max-turns", type=int, default=50, help="memory run: the demo's turn limit (default 50)")
    parser.add_argument("--ttl", type=float, default=2.0, help="memory run: idle seconds before expiry (default 2)")
    parser.add_argument("--memory-only", action="store_true", help="skip the load run")
    args = parser.parse_args(argv)
    sessions = args.sessions or (30 if args.quick else 100)
    if args.memory_only:
        return 0 if _memory(args, sessions) else 1
    users = args.users or (10 if args.quick else 50)
    messages = args.messages or (3 if args.quick else 10)
    embeddings = args.embeddings or ("hash" if args.quick else "minilm")
    baseline_messages = args.baseline_messages or 1
    print(f"{users} users x {messages} messages through gradio_client, {embeddings} embeddings, "
          f"model latency {args.latency * 1000:.0f} ms; server in its own process", flush=True)

    results: list[LoadResult] = []
    runs = (("chatkit demo", demo_app_chat_limit(), messages), ("global queue (limit 1)", 1, baseline_messages))
    # both servers start together (loading the model overlaps); the loads then run one after the other
    servers = [
        DemoServer(port=port, embeddings=embeddings, latency=args.latency, chat_concurrency=limit)
        for port, (_, limit, _) in zip(_free_ports(len(runs)), runs, strict=True)
    ]
    try:
        for server in servers:
            server.wait_ready()
        print("  servers ready", flush=True)
        for server, (label, _, count) in zip(servers, runs, strict=True):
            results.append(run_load(server.url, users=users, messages=count, label=label))
            print(f"  {label}: done", flush=True)
    finally:
        for server in servers:
            server.stop()

    ours, base = results
    print()
    print("| run | messages | p50 ms | p95 ms | throughput msg/s | anomalies | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.label} | {len(r.latencies)} | {r.p50 * 1000:.0f} | {r.p95 * 1000:.0f} | "
              f"{r.throughput:.1f} | {r.anomalies} | {r.errors} |")
    print()
    speedup = ours.throughput / base.throughput
    p95_ratio = ours.p95 / base.p95
    print("| measure | measured | target |")
    print("|---|---|---|")
    print(f"| anomalies (lost, reordered or foreign messages) | {ours.anomalies} | 0 |")
    print(f"| errors | {ours.errors} | 0 |")
    print(f"| throughput, ours / global queue | {speedup:.1f}x | >= {SPEEDUP_TARGET:g}x |")
    print(f"| p95 latency, ours / global queue | {p95_ratio:.2f}x | <= {P95_TARGET:g}x |")
    ok = ours.anomalies == 0 and ours.errors == 0 and speedup >= SPEEDUP_TARGET and p95_ratio <= P95_TARGET
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    if args.quick:
        print("(--quick is a smoke run: 10 users are too few for the ratios to mean much; run without it)")
    print()
    flat = _memory(args, sessions)
    return 0 if ours.anomalies == 0 and ours.errors == 0 and flat else 1


def _memory(args: argparse.Namespace, sessions: int) -> bool:
    print(f"memory: {sessions} sessions x 2 messages, twice, then one maximal session; expiry after "
          f"{args.ttl:g} s idle; hash embeddings; server in its own process", flush=True)
    return print_memory(run_memory(sessions=sessions, messages=2, max_turns=args.max_turns, ttl=args.ttl))


def demo_app_chat_limit() -> int:
    """The demo's own chat concurrency (read from chatkit_demo/config.py without importing Gradio here)."""
    import re

    match = re.search(r"^CHAT_LIMIT = (\d+)", (REPO / "chatkit_demo" / "config.py").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 128


if __name__ == "__main__":
    sys.exit(main())
