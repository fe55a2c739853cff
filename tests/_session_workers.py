"""A SessionManager worker process for the multi-process session tests, driven by commands over a pipe.

Each worker runs what one uvicorn/Gradio worker of a chat service would: a ``RedisKeyedLock`` and a
``SessionManager`` on a ``FencedPostgresSaver`` (or ``FencedSqliteSaver``). The test sends commands and
waits for the worker's events; nothing sleeps. A message can be *gated* (its model call reports
``("entered", text)`` and waits for ``release``), *held at its commit* (the saver reports
``("committing", text)`` before the write reaches the database and waits for ``release_commit``) and
*watched* (the lock reports ``("requested", text)`` once the message is in the session's queue in Redis).

:class:`WorkerProcess` is the test's side: it starts a worker and routes its events; every wait is bounded
by ``WAIT``. Workers are forked from multiprocessing's fork server, which imports chatkit, LangGraph,
psycopg and redis-py once (a spawned worker spends ~2 s importing them; a forked one starts in ~40 ms).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

WAIT = 60.0  # generous: an event that does not come within this is a failure, not a slow machine
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(
    [
        "chatkit",
        "chatkit.models",
        "chatkit.sessions",
        "chatkit.sessions._fenced_sql",
        "chatkit.locks.redis",
        "langgraph.checkpoint.postgres.aio",
        "langgraph.checkpoint.sqlite.aio",
        "redis.asyncio",
        "tests._session_workers",
    ]
)


# ------------------------------------------------------------------------------------------------ worker side


def serve(config: dict[str, Any], commands: Connection, events: Connection) -> None:
    """The worker process's body (see the module docstring)."""
    asyncio.run(_serve(config, commands, events))


async def _serve(config: dict[str, Any], commands: Connection, events: Connection) -> None:
    from chatkit import ExtractiveChatModel, LockEvent, RedisKeyedLock, SessionManager
    from chatkit.sessions.fencing import FencedPostgresSaver, FencedSqliteSaver

    loop = asyncio.get_running_loop()
    gates: dict[str, asyncio.Event] = {}
    gated: set[str] = set()
    held: set[str] = set()
    watched: set[str] = set()

    def gate(name: str) -> asyncio.Event:
        return gates.setdefault(name, asyncio.Event())

    def latency(text: str) -> Any:
        if text not in gated:
            return 0.0
        events.send(("entered", text))
        return gate(text).wait()

    def observe(event: LockEvent) -> None:
        if event.kind == "requested" and event.label in watched:
            events.send(("requested", event.label))

    base: Any = FencedSqliteSaver if config["store"] == "sqlite" else FencedPostgresSaver

    class Saver(base):  # type: ignore[misc, valid-type]
        async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
            messages = checkpoint["channel_values"].get("messages") or []
            users = [m.content for m in messages if getattr(m, "type", "") == "human"]
            if users and users[-1] in held:
                text = users[-1]
                held.discard(text)
                events.send(("committing", text))
                await gate("commit " + text).wait()
            return await super().aput(config, checkpoint, metadata, new_versions)

    async with Saver.from_conn_string(config["store_url"]) as saver:
        lock = RedisKeyedLock(config["redis_url"], namespace=config["namespace"], lease=config["lease"], observer=observe)
        manager = SessionManager(model=ExtractiveChatModel(latency=latency), checkpointer=saver, lock=lock)
        tasks: set[asyncio.Task[Any]] = set()

        async def outcome(call: Any) -> tuple[Any, ...]:
            try:
                result = await call
            except Exception as exc:
                return ("error", type(exc).__name__, str(exc), getattr(exc, "reason", None))
            return ("ok", result.turn, result.reply)

        async def run(rid: int, make: Callable[[], Any]) -> None:
            try:
                result = await make()
            except Exception as exc:  # a command that failed (not a turn: those report their errors)
                result = ("crashed", f"{type(exc).__name__}: {exc}")
            events.send(("result", rid, result))

        def start(rid: int, make: Callable[[], Any]) -> None:
            task = loop.create_task(run(rid, make))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        events.send(("ready", os.getpid()))
        while True:
            command = await asyncio.to_thread(commands.recv)
            kind = command[0]
            if kind == "chat":
                _, rid, sid, text, options = command
                (gated.add if options.pop("gated", False) else gated.discard)(text)
                (held.add if options.pop("hold_commit", False) else held.discard)(text)
                (watched.add if options.pop("watch", False) else watched.discard)(text)
                # a task named after the text (the lock's label), started now: turns keep command order
                call = loop.create_task(manager.chat(sid, text, **options), name=text)
                start(rid, lambda call=call: outcome(call))
            elif kind == "burst":  # messages sent at once, admitted in list order
                _, rid, messages, options = command
                calls = [loop.create_task(manager.chat(sid, text, **options), name=text) for sid, text in messages]
                start(rid, lambda calls=calls: asyncio.gather(*(outcome(c) for c in calls)))
            elif kind == "release":
                gate(command[1]).set()
            elif kind == "release_commit":
                gate("commit " + command[1]).set()
            elif kind == "history":
                _, rid, sid = command
                start(rid, lambda sid=sid: _history(manager, sid))
            elif kind == "busy":
                _, rid, sid = command
                start(rid, lambda sid=sid: manager.ais_busy(sid))
            elif kind == "statistics":
                events.send(("result", command[1], manager.statistics()))
            elif kind == "quit":
                break
        for task in list(tasks):
            task.cancel()
        await manager.aclose()
        await lock.aclose()
    events.send(("bye",))


async def _history(manager: Any, sid: str) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in await manager.get_history(sid)]


# ------------------------------------------------------------------------------------------------ test side


class WorkerProcess:
    """A worker process and its events, seen from the test (see the module docstring).

    Args:
        name: shown in failures.
        redis_url, namespace, lease: its RedisKeyedLock.
        store, store_url: ``"postgres"`` and a DSN, or ``"sqlite"`` and a file path.
    """

    def __init__(self, name: str, *, redis_url: str, namespace: str, store: str, store_url: str, lease: float) -> None:
        self.name = name
        commands_out, commands_in = CONTEXT.Pipe(duplex=False)
        events_out, events_in = CONTEXT.Pipe(duplex=False)
        config = {"redis_url": redis_url, "namespace": namespace, "store": store, "store_url": store_url, "lease": lease}
        self._commands = commands_in
        self._events = events_out
        self.process = CONTEXT.Process(target=serve, args=(config, commands_out, events_in), daemon=True, name=name)
        self.process.start()
        commands_out.close()
        events_in.close()
        self._rid = 0
        self._results: dict[int, Any] = {}
        self._seen: set[tuple[str, str]] = set()
        self._changed = threading.Condition()
        self._closed = False
        self.pid: int | None = None
        self._reader = threading.Thread(target=self._read, name=f"{name} events", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name} pid={self.pid} alive={self.process.is_alive()}>"

    def _read(self) -> None:
        while True:
            try:
                event = self._events.recv()
            except (EOFError, OSError):
                event = ("gone",)
            with self._changed:
                kind = event[0]
                if kind == "result":
                    self._results[event[1]] = event[2]
                elif kind == "ready":
                    self.pid = event[1]
                    self._seen.add(("ready", ""))
                elif kind in ("gone", "bye"):
                    self._closed = True
                else:
                    self._seen.add((kind, event[1]))
                self._changed.notify_all()
            if kind in ("gone", "bye"):
                return

    def _until(self, check: Callable[[], bool], what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: check() or self._closed, WAIT):
                raise TimeoutError(f"worker {self.name} did not report {what} within {WAIT:g} s")
            if not check():
                raise RuntimeError(f"worker {self.name} ended before it reported {what}")

    def ready(self) -> WorkerProcess:
        self._until(lambda: ("ready", "") in self._seen, "that it is ready")
        return self

    def wait_for(self, kind: str, text: str) -> None:
        """Wait until the worker reported ``kind`` ("entered", "committing", "requested") for ``text`` (once
        reported, always: give each message of a worker its own text)."""
        self._until(lambda: (kind, text) in self._seen, f"{kind} {text!r}")

    def _request(self, kind: str, *args: Any) -> int:
        """Send a command that answers with a result; return its request id."""
        self._rid += 1
        self._commands.send((kind, self._rid, *args))
        return self._rid

    def chat(self, sid: str, text: str, **options: Any) -> int:
        """Send one message (``gated=``, ``hold_commit=``, ``watch=``, and ``chat()``'s keywords); its request id."""
        return self._request("chat", sid, text, options)

    def burst(self, messages: list[tuple[str, str]], **options: Any) -> int:
        """Send every message at once (admitted in list order); the result lists their outcomes."""
        return self._request("burst", messages, options)

    def release(self, text: str) -> None:
        self._commands.send(("release", text))

    def release_commit(self, text: str) -> None:
        self._commands.send(("release_commit", text))

    def result(self, rid: int) -> Any:
        """The result of request ``rid`` (a turn's outcome, a history, ...).

        Raises:
            RuntimeError: the command itself failed in the worker.
        """
        self._until(lambda: rid in self._results, f"the result of request {rid}")
        with self._changed:
            result = self._results.pop(rid)
        if isinstance(result, tuple) and result[:1] == ("crashed",):
            raise RuntimeError(f"worker {self.name}: {result[1]}")
        return result

    def history(self, sid: str) -> list[tuple[str, str]]:
        return self.result(self._request("history", sid))  # type: ignore[no-any-return]

    def busy(self, sid: str) -> bool:
        return self.result(self._request("busy", sid))  # type: ignore[no-any-return]

    def statistics(self) -> Any:
        return self.result(self._request("statistics"))

    def signal(self, signum: int) -> None:
        assert self.pid is not None
        os.kill(self.pid, signum)

    def close(self) -> None:
        """Ask the worker to finish; kill it if it does not (or is stopped or dead already)."""
        if self.process.is_alive():
            try:
                os.kill(self.process.pid, signal.SIGCONT)  # type: ignore[arg-type]
                self._commands.send(("quit",))
            except (OSError, ValueError):
                pass
            self.process.join(WAIT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(WAIT)
        self._reader.join(WAIT)
        self._commands.close()
        self._events.close()
        self.process.close()


def start_workers(names: list[str], **config: Any) -> list[WorkerProcess]:
    """Start the workers at once and wait until every one is ready."""
    workers = [WorkerProcess(n, **config) for n in names]
    try:
        for w in workers:
            w.ready()
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers
