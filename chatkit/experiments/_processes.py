"""The scale-out experiments' two worker processes: what runs in each, and the parent's side.

:class:`WorkerProcesses` starts two processes (multiprocessing's "spawn") and keeps them for several runs. A
run sends each process a *job*: the turns it runs (as tasks named after their timeline lanes), which lock and
saver it makes, and the worker file whose ``chat()`` runs each turn (or ``SessionManager.chat``). Each process
records its turns on a :class:`~chatkit.Timeline` of its own, on the machine's monotonic clock, and sends back
what each turn's sender was told, its timeline's origin and its rows. Cross-process events (:class:`_Gates`)
sequence the turns so that every race is certain (see :mod:`chatkit.experiments.scaleout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import multiprocessing
import os
import signal
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .._optional import optional_import
from ..timeline import Timeline, lane
from ._common import _plural, _RecordingMixin

__all__ = ["WorkerProcesses", "PROCESSES", "SESSION", "saver_class"]

#: The worker processes' names (their timeline lanes).
PROCESSES: tuple[str, ...] = ("process A", "process B")
SESSION = "s1"  # the session both processes are sent a message for
_WAIT = 60.0  # generous bound on every cross-process wait: not reached means something failed
_TURNS = 2


# ------------------------------------------------------------------------------------------- the gates


@dataclass(frozen=True)
class _Gates:
    """Cross-process events, one per turn (index 0: the first and slowest), shared with the processes at spawn.

    ``in_flight``: the turn is in its model call (having read), or queued behind the other for a shared
    lock. ``finished``: its turn ended (any way). ``committing``/``go``: a held commit is on its way / may
    go on.
    """

    in_flight: tuple[Any, ...]
    finished: tuple[Any, ...]
    committing: tuple[Any, ...]
    go: tuple[Any, ...]

    @classmethod
    def make(cls, context: Any) -> _Gates:
        return cls(*(tuple(context.Event() for _ in range(_TURNS)) for _ in dataclasses.fields(cls)))

    def clear(self) -> None:
        for field in dataclasses.fields(self):
            for event in getattr(self, field.name):
                event.clear()


def _wait(event: Any, what: str) -> None:
    if not event.wait(_WAIT):
        raise TimeoutError(f"{what} did not happen within {_WAIT:g} s")


# ------------------------------------------------------------------------------------------- in each process


def _process_main(name: str, commands: Connection, results: Connection, gates: _Gates) -> None:
    """A worker process: for each ``("run", job)`` command, run the job's turns and report them."""
    import logging

    from .. import sessions  # noqa: F401  (imported before the first run, so both processes start it together)

    # A paused holder's lost lock is logged as a warning; from a worker process it would reach the caller's
    # stderr (a notebook's output) at an unforeseeable moment. The timeline shows it instead.
    logging.getLogger("chatkit").addHandler(logging.NullHandler())

    with contextlib.suppress(ImportError):  # imported before the first run, as above
        optional_import("langgraph.checkpoint.sqlite.aio", extra="sqlite")
    results.send(("ready", os.getpid()))
    while True:
        command = commands.recv()
        if command[0] == "quit":
            return
        try:
            outcome: tuple[Any, ...] = asyncio.run(_run_job(command[1], gates))
        except Exception:  # reported to the parent, which raises it
            outcome = ("failed", f"{name}: {traceback.format_exc()}")
            for turn in command[1]["turns"]:  # nobody waits for these turns any more
                gates.in_flight[turn["index"]].set()
                gates.finished[turn["index"]].set()
        results.send(outcome)


async def _run_job(job: dict[str, Any], gates: _Gates) -> tuple[Any, ...]:
    """Run this process's turns of one race (as tasks named after their lanes); return what happened."""
    from ..errors import ChatkitError
    from ..locks import KeyedLock, LockEvent

    timeline = Timeline()
    turns: list[dict[str, Any]] = job["turns"]
    index_of = {turn["lane"]: turn["index"] for turn in turns}
    by_text = {turn["text"]: turn for turn in turns}

    def observe(event: LockEvent) -> None:
        timeline.observe_lock(event)
        i = index_of.get(event.label)
        if job["shared_lock"] and event.kind == "requested" and i is not None and i > 0:
            gates.in_flight[i].set()  # queued behind the earlier turn: in flight

    async def think(turn: dict[str, Any]) -> None:
        """The model's thinking time, gated (see :mod:`chatkit.experiments.scaleout`), recorded as a ``model`` span."""
        i = turn["index"]
        with timeline.span("model", key=SESSION):
            gates.in_flight[i].set()
            if job["gated"]:
                for event in gates.in_flight:
                    await asyncio.to_thread(_wait, event, "the other turn going in flight")
            await asyncio.sleep(turn["latency"])
            if not job["shared_lock"]:  # the quicker turns answer and write first
                for j in range(i + 1, _TURNS):
                    await asyncio.to_thread(_wait, gates.finished[j], "the quicker turn's end")

    async def llm(history: Sequence[Any], text: str) -> str:
        turn = by_text.get(text)
        if turn is not None:
            await think(turn)
        return f'answer to "{text}" (saw {_plural(len(history), "message")})'

    saver_cls = _recorded(saver_class(job["fenced"]), gates, held={t["lane"]: t["index"] for t in turns if t["hold_commit"]})
    async with saver_cls.from_conn_string(job["path"]) as saver:
        saver.timeline = timeline
        if job["fixed"]:
            from ..locks.redis import RedisKeyedLock

            lock: Any = RedisKeyedLock(job["redis_url"], namespace=job["namespace"], lease=job["lease"], observer=observe)
        else:
            lock = KeyedLock(observer=observe)
        closers: list[Callable[[], Awaitable[None]]] = [lock.aclose] if job["fixed"] else []
        if job["worker"] is not None:
            chat = _load_worker(job["worker"])

            async def send(turn: dict[str, Any]) -> Any:
                return await chat(SESSION, turn["text"], saver=saver, lock=lock, llm=llm)
        else:
            from ..models import ExtractiveChatModel
            from ..sessions import SessionManager

            def latency(text: str) -> Awaitable[None] | None:
                turn = by_text.get(text)
                return None if turn is None else think(turn)

            manager = SessionManager(model=ExtractiveChatModel(latency=latency), checkpointer=saver, lock=lock)
            closers.insert(0, manager.aclose)

            async def send(turn: dict[str, Any]) -> Any:  # type: ignore[misc]  (one of two definitions)
                return (await manager.chat(SESSION, turn["text"])).turn

        async def one(turn: dict[str, Any]) -> tuple[int | None, str | None]:
            try:
                if turn["after"] is not None:  # starts once the earlier turn is in flight
                    await asyncio.to_thread(_wait, gates.in_flight[turn["after"]], "the earlier turn going in flight")
                with lane(turn["lane"]):
                    told = await send(turn)
                if isinstance(told, bool) or not isinstance(told, int):
                    raise TypeError(f"the worker's chat() must return the turn number (an int), got {told!r}")
                return told, None
            except ChatkitError as exc:  # StaleCommit, LockLost: the sender is told its message was not saved
                return None, f"{type(exc).__name__}: {exc}"
            finally:
                gates.in_flight[turn["index"]].set()  # (a turn that ended early must not hold the others up)
                gates.finished[turn["index"]].set()

        try:
            tasks = [asyncio.create_task(one(turn), name=turn["lane"]) for turn in turns]
            outcomes = await asyncio.gather(*tasks)
        finally:
            for close in closers:
                await close()
    origin = time.monotonic() - timeline.now()  # the process's timeline origin, on the shared monotonic clock
    rows = [dataclasses.astuple(row) for row in timeline.rows()]
    return ("done", [(turn["lane"], *outcome) for turn, outcome in zip(turns, outcomes, strict=True)], origin, rows)


def _recorded(base: type, gates: _Gates, *, held: dict[str, int]) -> Any:
    """``base`` marking its reads, writes and refusals (:class:`_RecordingMixin`); a held lane's commit
    reports that it is on its way and waits for the parent's go before it reaches the database."""
    from ..timeline import _LANE

    class Recorded(_RecordingMixin, base):  # type: ignore[misc, valid-type]
        async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
            i = held.get(_LANE.get() or "")
            if i is not None and not gates.committing[i].is_set():
                gates.committing[i].set()
                await asyncio.to_thread(_wait, gates.go[i], "the go for the held commit")
            return await super().aput(config, checkpoint, metadata, new_versions)

    return Recorded


def saver_class(fenced: bool) -> Any:
    if fenced:
        from ..sessions.fencing import FencedSqliteSaver

        return FencedSqliteSaver
    sqlite = optional_import("langgraph.checkpoint.sqlite.aio", extra="sqlite", feature="the scale-out experiments")
    return sqlite.AsyncSqliteSaver


def _load_worker(path: str) -> Callable[..., Awaitable[Any]]:
    """The ``chat`` function of the worker file at ``path``, loaded afresh (edits show on the next run)."""
    spec = importlib.util.spec_from_file_location(f"chatkit_worker_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the worker file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    chat = getattr(module, "chat", None)
    if chat is None or not callable(chat):
        raise TypeError(f"the worker file {path!r} must define async def chat(session_id, text, *, saver, lock, llm)")
    return chat  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------- in the parent


class WorkerProcesses:
    """The experiments' two worker processes (``process A``, ``process B``), kept for several runs.

    Starting them takes a few seconds (multiprocessing's "spawn": each imports chatkit and LangGraph);
    pass one ``WorkerProcesses`` as ``processes=`` to every experiment of a notebook, and close it at the
    end (or use it as a context manager). Processes left open end with the interpreter.

    Raises:
        RuntimeError: a process did not start.

    Example:
        >>> import chatkit
        >>> from chatkit.experiments import scaleout_race
        >>> with WorkerProcesses() as workers:
        ...     result = chatkit.run(scaleout_race(fixed=False, latency=0.01, processes=workers))
        ...     len(workers.pids)
        2
        >>> result.summary()
        'SessionManager, a KeyedLock per process, AsyncSqliteSaver: told turns 2 and 2, 1 of 2 kept, 1 lost'
        >>> workers
        <WorkerProcesses closed>
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._gates = _Gates.make(context)
        self._pipes: list[tuple[Connection, Connection]] = []
        self._procs: list[Any] = []
        self._pids: list[int] = []
        self._closed = False
        for name in PROCESSES:
            cmd_r, cmd_w = context.Pipe(duplex=False)
            res_r, res_w = context.Pipe(duplex=False)
            proc = context.Process(target=_process_main, args=(name, cmd_r, res_w, self._gates), daemon=True, name=name)
            proc.start()
            cmd_r.close()
            res_w.close()
            self._pipes.append((cmd_w, res_r))
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _close_all, self._pipes, self._procs)
        for (_, res_r), proc in zip(self._pipes, self._procs, strict=True):
            reply = res_r.recv() if res_r.poll(_WAIT) else None
            if not (isinstance(reply, tuple) and reply[:1] == ("ready",)):
                self.close()
                raise RuntimeError(f"{proc.name} did not start within {_WAIT:g} s")
            self._pids.append(reply[1])

    def __repr__(self) -> str:
        state = "closed" if self._closed else ", ".join(f"{p.name} pid {p.pid}" for p in self._procs)
        return f"<WorkerProcesses {state}>"

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> tuple[int, ...]:
        """The processes' ids, in :data:`PROCESSES` order."""
        return tuple(self._pids)

    def close(self) -> None:
        """Stop the processes (idempotent)."""
        self._closed = True
        self._finalizer()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("these WorkerProcesses are closed: make new ones")

    def _send(self, i: int, job: dict[str, Any]) -> None:
        self._pipes[i][0].send(("run", job))

    def _recv(self, i: int) -> tuple[Any, ...]:
        res_r, proc = self._pipes[i][1], self._procs[i]
        if not res_r.poll(_WAIT):
            raise TimeoutError(f"{proc.name} did not finish its turns within {_WAIT:g} s")
        outcome: tuple[Any, ...] = res_r.recv()
        return outcome

    @staticmethod
    def _check(reports: Sequence[tuple[Any, ...] | None]) -> None:
        for report in reports:
            if report is not None and report[0] == "failed":
                raise RuntimeError(f"a worker process failed:\n{report[1]}")

    def _run(self, jobs: Sequence[dict[str, Any] | None]) -> list[tuple[Any, ...] | None]:
        """Send each process its job (``None``: nothing to do) at once; collect their reports."""
        self._check_open()
        self._gates.clear()
        for i, job in enumerate(jobs):
            if job is not None:
                self._send(i, job)
        reports = [self._recv(i) if job is not None else None for i, job in enumerate(jobs)]
        self._check(reports)  # (after every report is in: none is left in a pipe for the next run)
        return reports

    def _paused(self, job_a: dict[str, Any], job_b: dict[str, Any]) -> tuple[tuple[Any, ...], tuple[Any, ...], float, float]:
        """A's commit held on its way, A stopped, B's turn, A continued and its commit let go."""
        self._check_open()
        self._gates.clear()
        self._send(0, job_a)
        res_a = self._pipes[0][1]
        deadline = time.monotonic() + _WAIT
        while not self._gates.committing[0].wait(0.05):  # its commit on its way, or a report that it failed
            if res_a.poll() or time.monotonic() > deadline:
                self._check([self._recv(0)])
                raise RuntimeError("process A ended its turn without committing")
        os.kill(self._pids[0], signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            self._send(1, job_b)
            outcome_b = self._recv(1)
        finally:
            os.kill(self._pids[0], signal.SIGCONT)
            continued = time.monotonic()
            self._gates.go[0].set()
        outcome_a = self._recv(0)
        self._check([outcome_a, outcome_b])
        return outcome_a, outcome_b, stopped, continued


def _close_all(pipes: list[tuple[Connection, Connection]], procs: list[Any]) -> None:
    for (cmd_w, res_r), proc in zip(pipes, procs, strict=False):
        with contextlib.suppress(OSError):
            cmd_w.send(("quit",))
        proc.join(_WAIT)
        if proc.is_alive():
            proc.kill()
            proc.join()
        cmd_w.close()
        res_r.close()
