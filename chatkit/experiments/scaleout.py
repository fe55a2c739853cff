"""The lost update one level up: two worker *processes* sharing one checkpointer, each sent one message at once.

Before: each process runs a :class:`~chatkit.SessionManager` with its own in-process lock on one shared
``AsyncSqliteSaver`` file. Both read the session's history (one turn), both wait for their model, both
write: each is told "turn 2", and the later write replaces the earlier one, so one message is gone.
After: the same two processes with a :class:`~chatkit.RedisKeyedLock` (one queue per session across
processes) and a ``FencedSqliteSaver`` (a commit is refused unless it starts from the latest checkpoint
and holds the newest lock token): the second turn waits for the first, they are told turns 2 and 3, and
both are kept.

Each run records, per process, when it *read* the session (the checkpointer's ``aget_tuple``), awaited its
*model*, and *wrote* (``aput``), plus the lock's ``wait``/``hold`` spans, on the machine's monotonic clock
(the same in every process), and returns them as one :class:`~chatkit.Timeline` with one lane per process.
As in the other experiments, a cross-process gate holds each model call until both processes are in
flight (inside their model call, or, in the fixed run, queued for the Redis lock), so the race shows on
every run; then process A's model takes twice as long as B's.

The processes are started with multiprocessing's "spawn" (about two seconds each: they import chatkit and
LangGraph) and reused by :func:`compare_scaleout_race` for both runs; from a script, call the experiment
under ``if __name__ == "__main__":`` (spawn imports the main module again in each process; a notebook
needs nothing). The fixed run needs ``redis-server``
(started on a free loopback port with :func:`chatkit.testing.redis_server`); without it,
:class:`~chatkit.testing.ServerUnavailable` says so. Both runs need ``langgraph-checkpoint-sqlite``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .._optional import optional_import
from ..timeline import Timeline, TimelineRow
from ._common import Comparison, RaceResult, find_history_anomalies

__all__ = ["ScaleoutRaceResult", "scaleout_race", "compare_scaleout_race", "PROCESSES"]

PROCESSES: tuple[str, ...] = ("process A", "process B")
_SESSION = "shared-session"
_WAIT = 60.0  # generous bound on every cross-process wait


@dataclass(frozen=True, slots=True)
class ScaleoutRaceResult(RaceResult):
    """A :class:`RaceResult` for the two-process race.

    Attributes:
        turns_told: the turn number each process was told, in :data:`PROCESSES` order.
        refused: how many commits a fenced checkpointer refused (each caller was told).
    """

    turns_told: tuple[int, ...] = ()
    refused: int = 0

    def summary(self) -> str:
        told = " and ".join(str(t) for t in sorted(self.turns_told))
        lost = self.count("lost message")
        damage = f"{lost} lost" if lost else "nothing lost"
        if self.refused:
            damage += f", {self.refused} refused (its caller told)"
        return (
            f"{self.variant}: {len(PROCESSES)} processes told turns {told}, {len(self.observed)} of "
            f"{len(self.expected)} messages kept, {damage}"
        )



def _mark_overwrites(timeline: Timeline, lost: list[str], end_of: dict[str, float], *, key: str, what: str) -> None:
    """Mark each lost turn at the moment the next writer saved a state without it."""
    finish_order = sorted(end_of, key=end_of.__getitem__)
    for name in lost:
        later = [n for n in finish_order if end_of[n] > end_of[name]]
        when = end_of[later[0]] if later else end_of[name]
        timeline.add(TimelineRow(name, what, when, None, key, None, f"overwritten by {later[0] if later else '?'}"))

# ------------------------------------------------------------------------------------------- in each process


def _process_main(name: str, commands: Connection, results: Connection, arrived: dict[str, Any]) -> None:
    """A worker process: for each ``("run", spec)`` command, one ``chat()`` on the shared session."""
    from .. import sessions  # noqa: F401  (imported before the first run, so both processes start it together)

    with contextlib.suppress(ImportError):  # imported before the first run, as above
        optional_import("langgraph.checkpoint.sqlite.aio", extra="sqlite")
    results.send(("ready",))
    while True:
        command = commands.recv()
        if command[0] == "quit":
            return
        try:
            outcome = asyncio.run(_one_turn(name, command[1], arrived))
        except Exception as exc:  # reported to the parent, which raises it
            outcome = ("failed", f"{type(exc).__name__}: {exc}", [])
        results.send(outcome)


async def _one_turn(name: str, spec: dict[str, Any], arrived: dict[str, Any]) -> tuple[Any, ...]:
    from ..locks import KeyedLock, LockEvent
    from ..models import ExtractiveChatModel
    from ..sessions import SessionManager

    rows: list[tuple[str, float, float | None, str | None]] = []  # (phase, start, end, outcome), monotonic s
    fixed = spec["fixed"]
    mine = arrived[name]
    lock_open: dict[str, float] = {}

    def observe(event: LockEvent) -> None:
        if event.kind == "requested":
            lock_open["wait"] = event.time
            if fixed:
                mine.set()  # queued for the cross-process lock: in flight
        elif event.kind == "acquired":
            rows.append(("wait", lock_open.pop("wait", event.time), event.time, "ok"))
            lock_open["hold"] = event.time
        elif event.kind == "released":
            rows.append(("hold", lock_open.pop("hold", event.time), event.time, "ok"))

    async def latency(_text: str) -> None:
        start = time.monotonic()
        mine.set()
        await asyncio.to_thread(_wait_all, arrived)  # the gate: both processes are in flight
        await asyncio.sleep(spec["latency"])
        rows.append(("model", start, time.monotonic(), "ok"))

    saver_cls = _saver_class(fixed)

    class Recorded(saver_cls):  # type: ignore[misc, valid-type]
        async def aget_tuple(self, config: Any) -> Any:
            start = time.monotonic()
            try:
                return await super().aget_tuple(config)
            finally:
                rows.append(("read", start, time.monotonic(), "ok"))

        async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
            start = time.monotonic()
            outcome = "error"
            try:
                result = await super().aput(config, checkpoint, metadata, new_versions)
                outcome = "ok"
                return result
            finally:
                rows.append(("write", start, time.monotonic(), outcome))

    async with Recorded.from_conn_string(spec["path"]) as saver:
        if fixed:
            from ..locks.redis import RedisKeyedLock

            lock: Any = RedisKeyedLock(spec["redis_url"], namespace=spec["namespace"], observer=observe)
        else:
            lock = KeyedLock(observer=observe)
        manager = SessionManager(model=ExtractiveChatModel(latency=latency), checkpointer=saver, lock=lock)
        try:
            result = await manager.chat(_SESSION, spec["text"])
            told: Any = result.turn
        except Exception as exc:  # StaleCommit: the caller is told
            told = f"{type(exc).__name__}"
        finally:
            await manager.aclose()
            if fixed:
                await lock.aclose()
    return ("done", told, rows)


def _wait_all(arrived: dict[str, Any]) -> None:
    for event in arrived.values():
        if not event.wait(_WAIT):
            raise TimeoutError("the other process never reached its model call or the lock's queue")


def _saver_class(fixed: bool) -> Any:
    if fixed:
        from ..sessions.fencing import FencedSqliteSaver

        return FencedSqliteSaver
    return optional_import("langgraph.checkpoint.sqlite.aio", extra="sqlite", feature="the scale-out experiment").AsyncSqliteSaver


# ------------------------------------------------------------------------------------------- in the parent


class _Processes:
    """The two worker processes, reused across runs."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.arrived = {name: context.Event() for name in PROCESSES}
        self.pipes: list[tuple[Connection, Connection]] = []
        self.procs = []
        for name in PROCESSES:
            cmd_r, cmd_w = context.Pipe(duplex=False)
            res_r, res_w = context.Pipe(duplex=False)
            proc = context.Process(target=_process_main, args=(name, cmd_r, res_w, self.arrived), daemon=True, name=name)
            proc.start()
            cmd_r.close()
            res_w.close()
            self.pipes.append((cmd_w, res_r))
            self.procs.append(proc)
        for (_, res_r), proc in zip(self.pipes, self.procs, strict=True):
            if not res_r.poll(_WAIT) or res_r.recv() != ("ready",):
                self.close()
                raise RuntimeError(f"{proc.name} did not start within {_WAIT:g} s")

    def run(self, specs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        for event in self.arrived.values():
            event.clear()
        for (cmd_w, _), spec in zip(self.pipes, specs, strict=True):
            cmd_w.send(("run", spec))
        outcomes = []
        for (_, res_r), proc in zip(self.pipes, self.procs, strict=True):
            if not res_r.poll(_WAIT):
                raise TimeoutError(f"{proc.name} did not finish its turn within {_WAIT:g} s")
            outcomes.append(res_r.recv())
        return outcomes

    def close(self) -> None:
        for (cmd_w, res_r), proc in zip(self.pipes, self.procs, strict=True):
            with contextlib.suppress(OSError):
                cmd_w.send(("quit",))
            proc.join(_WAIT)
            if proc.is_alive():
                proc.kill()
                proc.join()
            cmd_w.close()
            res_r.close()


@contextlib.contextmanager
def _processes() -> Iterator[_Processes]:
    procs = _Processes()
    try:
        yield procs
    finally:
        procs.close()


@contextlib.contextmanager
def _redis(fixed: bool) -> Iterator[str | None]:
    if not fixed:
        yield None
        return
    from ..testing import ServerUnavailable, redis_server

    try:
        server_cm = redis_server()
        server = server_cm.__enter__()
    except ServerUnavailable as exc:
        raise ServerUnavailable(f"the fixed run of the scale-out experiment needs a Redis server: {exc}") from exc
    try:
        yield server.url
    finally:
        server_cm.__exit__(None, None, None)


async def _seed(path: str, fixed: bool) -> None:
    """The session with its first turn, written before the processes start."""
    from ..models import ExtractiveChatModel
    from ..sessions import SessionManager

    async with _saver_class(fixed).from_conn_string(path) as saver:
        await saver.setup()
        async with SessionManager(model=ExtractiveChatModel(), checkpointer=saver) as manager:
            await manager.chat(_SESSION, "first", create_if_missing=True)


async def _history(path: str, fixed: bool) -> list[str]:
    from ..sessions import SessionManager

    async with _saver_class(fixed).from_conn_string(path) as saver:
        async with SessionManager(checkpointer=saver) as manager:
            return [m.content for m in await manager.get_history(_SESSION) if m.role == "user"]


async def _race(procs: _Processes, *, fixed: bool, latency: float) -> ScaleoutRaceResult:
    texts = {name: f"from {name}" for name in PROCESSES}
    with tempfile.TemporaryDirectory(prefix="chatkit-scaleout-") as tmp, _redis(fixed) as redis_url:
        path = os.path.join(tmp, "sessions.sqlite")
        await _seed(path, fixed)
        namespace = f"chatkit-experiment:{os.getpid()}:{time.monotonic_ns()}"  # one lock for both processes
        specs = [
            {
                "fixed": fixed,
                "path": path,
                "text": texts[name],
                "latency": latency * (len(PROCESSES) - i),  # A is the slowest
                "redis_url": redis_url,
                "namespace": namespace,
            }
            for i, name in enumerate(PROCESSES)
        ]
        outcomes = await asyncio.to_thread(procs.run, specs)
        history = await _history(path, fixed)
    for name, outcome in zip(PROCESSES, outcomes, strict=True):
        if outcome[0] == "failed":
            raise RuntimeError(f"{name} failed: {outcome[1]}")
    # One lane per process, on the machine's monotonic clock (the same in both), from the first step on.
    timeline = Timeline()
    first = min((start for outcome in outcomes for _, start, _, _ in outcome[2]), default=0.0)
    end_of: dict[str, float] = {}
    for name, (_, _, rows) in zip(PROCESSES, outcomes, strict=True):
        for phase, start, end, result in rows:
            timeline.add(TimelineRow(name, phase, start - first, None if end is None else end - first, _SESSION, result))
            if phase == "write" and result == "ok" and end is not None:
                end_of[name] = end - first
    told = tuple(outcome[1] for outcome in outcomes)
    expected = tuple(texts[name] for name in PROCESSES)
    observed = tuple(h for h in history if h != "first")
    owner = {text: name for name, text in texts.items()}
    # Who runs first under the lock is up to the lock: the expected order is the order they were kept in.
    in_order = tuple(t for t in observed if t in owner) + tuple(t for t in expected if t not in observed)
    anomalies = find_history_anomalies(in_order, observed, who=lambda m: owner.get(m, "?"))
    lost = [owner[text] for text in expected if text not in observed]
    _mark_overwrites(timeline, lost, end_of, key=_SESSION, what="lost message")
    refused = sum(1 for t in told if not isinstance(t, int))
    return ScaleoutRaceResult(
        experiment="two-process session race",
        variant="RedisKeyedLock + FencedSqliteSaver" if fixed else "a KeyedLock per process, one AsyncSqliteSaver",
        fixed=fixed,
        timeline=timeline,
        expected=expected,
        observed=observed,
        anomalies=anomalies,
        turns_told=tuple(t if isinstance(t, int) else 0 for t in told),
        refused=refused,
    )


async def scaleout_race(*, fixed: bool, latency: float = 0.05) -> ScaleoutRaceResult:
    """Two worker processes, one shared SQLite checkpointer, one message each at once (see the module docstring).

    Args:
        fixed: run the fix (``RedisKeyedLock`` + ``FencedSqliteSaver``) instead of a ``KeyedLock`` per
            process on a plain ``AsyncSqliteSaver``.
        latency: seconds; process B's model answers after ``latency``, process A's after twice that.

    Raises:
        ValueError: a negative latency.
        chatkit.testing.ServerUnavailable: ``fixed=True`` and ``redis-server`` is not installed.
        ImportError: ``langgraph-checkpoint-sqlite`` (or, for the fix, ``redis``) is missing.

    Example:
        >>> import chatkit
        >>> result = chatkit.run(scaleout_race(fixed=False))          # doctest: +SKIP
        >>> result.summary()                                          # doctest: +SKIP
        'a KeyedLock per process, one AsyncSqliteSaver: 2 processes told turns 2 and 2, 1 of 2 messages kept, 1 lost'
    """
    _check_latency(latency)
    with _processes() as procs:
        return await _race(procs, fixed=fixed, latency=latency)


async def compare_scaleout_race(*, latency: float = 0.05) -> Comparison:
    """Run :func:`scaleout_race` naive, then fixed, on the same two processes.

    Raises:
        chatkit.testing.ServerUnavailable: ``redis-server`` is not installed (checked before anything runs).
    """
    _check_latency(latency)
    from ..testing import ServerUnavailable, redis_server

    try:
        with redis_server():
            pass
    except ServerUnavailable as exc:
        raise ServerUnavailable(f"the fixed run of the scale-out experiment needs a Redis server: {exc}") from exc
    with _processes() as procs:
        before = await _race(procs, fixed=False, latency=latency)
        after = await _race(procs, fixed=True, latency=latency)
    return Comparison(before, after)


def _check_latency(latency: float) -> None:
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not latency >= 0:
        raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
