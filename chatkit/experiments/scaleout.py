"""The lost update one level up: worker *processes* sharing one checkpointer, each sent a message at once.

A chat service that runs as several worker processes shares its checkpointer (a database file or server),
but each process has its own memory, so its own lock. Two real OS processes (``process A``, ``process B``)
share one SQLite file here; each is sent one message for the same session at once. The session already
holds one turn.

* **Before** (``fixed=False``): each process has its own :class:`~chatkit.KeyedLock` on a plain
  ``AsyncSqliteSaver``. Both read the history (2 messages), both await their model, both write: each is
  told "turn 2", and the later write replaces the earlier one: one message is gone.
* **After** (``fixed=True``): one :class:`~chatkit.RedisKeyedLock` for all processes (one FIFO queue per
  session in Redis) on a ``FencedSqliteSaver`` (a commit is refused unless it starts from the thread's
  latest checkpoint and carries the newest fencing token): B waits for A, they are told turns 2 and 3,
  and both turns are kept.
* ``fenced=`` picks the saver on its own (say, a lock per process on a fenced saver: the loser of the race
  is told ``StaleCommit`` instead of losing its turn silently); ``one_process=True`` sends both messages
  to process A, as two tasks sharing its lock (the control: one process's lock works).
* :func:`paused_holder`: process A holds the session's Redis lock and is stopped (``SIGSTOP``) while its
  commit is on its way to the database; its lease runs out, process B takes the session and commits;
  A continues (``SIGCONT``) and its late commit is refused for its stale fencing token.

Each turn runs :class:`~chatkit.SessionManager` ``.chat()``, or ``chat()`` from a worker file of your own
(``worker=``), a Python file defining::

    async def chat(session_id: str, text: str, *, saver, lock, llm) -> int:
        ...  # read the session from `saver`, `await llm(history, text)`, write; return the turn number

where ``saver`` is the process's connection to the shared SQLite file, ``lock`` the process's lock (a
``KeyedLock``, or the shared ``RedisKeyedLock``) and ``llm`` the fake model, which answers
``answer to "<text>" (saw N messages)``. The file is loaded again in each process for every run.

What each process did is recorded on the machine's monotonic clock (the same in every process) and
merged into one :class:`~chatkit.Timeline`, one lane per process (per task with ``one_process``): each
*read* of the session (``saw 2 messages``), each *write* (``wrote 4 messages``) or refused write, the
model calls, and the lock's ``wait``/``hold`` spans; :func:`~chatkit.experiments.mark_lost_updates` marks
each lost turn at the write that erased it (``overwritten by process A``).

The race is certain by construction, never by luck: process B's turn starts once A's is in flight
(inside its model call, having read), and each model call waits until both turns are in flight (inside
the model, or queued behind the other for a shared lock). A thinks twice as long as B, and, when the
two turns do not share a lock, A answers only once B's turn has ended. So B always writes first and A
always writes last.

The processes are started with multiprocessing's "spawn" (each spends a few seconds importing chatkit and
LangGraph): :class:`WorkerProcesses` keeps them for several runs. From a script, call the experiments
under ``if __name__ == "__main__":`` (spawn imports the main module again in each process; a notebook
needs nothing). Runs with ``fixed=True`` need ``redis-server`` (started on a free loopback port with
:func:`chatkit.testing.redis_server`); without it, :class:`~chatkit.testing.ServerUnavailable` says so.
Every run needs ``langgraph-checkpoint-sqlite``; :func:`paused_holder` needs POSIX signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..timeline import Timeline, TimelineRow
from ._common import Comparison, RaceResult, find_history_anomalies, mark_lost_updates
from ._processes import _TURNS, PROCESSES, SESSION, WorkerProcesses, saver_class

__all__ = [
    "ScaleoutRaceResult",
    "WorkerProcesses",
    "scaleout_race",
    "compare_scaleout_race",
    "paused_holder",
    "PROCESSES",
]

FIRST = "Hi, I'm Ana."  # the session's first message, written before the race


@dataclass(frozen=True, slots=True)
class ScaleoutRaceResult(RaceResult):
    """A :class:`RaceResult` for the races across processes.

    ``expected`` holds the messages whose senders were told they were saved, ``observed`` the sent
    messages the history kept.

    Attributes:
        lanes: who sent each message (the timeline's lanes), in sending order.
        turns_told: the turn number each sender was told (``None``: told it was not saved).
        errors: for each sender told it was not saved, the exception (``"StaleCommit: ..."``), else ``None``.
        refused: how many senders were told their message was not saved (a refused commit, a lost lock).
        history: the session's messages afterwards (their text), oldest first.
    """

    lanes: tuple[str, ...] = ()
    turns_told: tuple[int | None, ...] = ()
    errors: tuple[str | None, ...] = ()
    refused: int = 0
    history: tuple[str, ...] = ()

    def summary(self) -> str:
        """One deterministic line: what each sender was told, what the history kept."""
        if all(t is not None for t in self.turns_told):
            told = "told turns " + " and ".join(str(t) for t in self.turns_told)
        else:
            told = "told " + " and ".join(
                f"turn {t}" if t is not None else (e or "?").split(":")[0]
                for t, e in zip(self.turns_told, self.errors, strict=True)
            )
        kept = len(self.observed)
        lost = self.count("lost message")
        outcome = f"{kept} of {len(self.lanes)} kept, " + (f"{lost} lost" if lost else "nothing lost")
        if self.refused:
            outcome += f", {self.refused} refused"
        return f"{self.variant}: {told}, {outcome}"


@contextlib.contextmanager
def _processes(given: WorkerProcesses | None) -> Iterator[WorkerProcesses]:
    if given is not None:
        if not isinstance(given, WorkerProcesses):
            raise TypeError(f"processes must be WorkerProcesses, got {type(given).__name__}")
        given._check_open()
        yield given
        return
    with WorkerProcesses() as started:
        yield started


@contextlib.contextmanager
def _redis(needed: bool) -> Iterator[str | None]:
    if not needed:
        yield None
        return
    from ..testing import ServerUnavailable, redis_server

    try:
        server_cm = redis_server()
        server = server_cm.__enter__()
    except ServerUnavailable as exc:
        raise ServerUnavailable(f"the scale-out experiments' shared lock needs a Redis server: {exc}") from exc
    try:
        yield server.url
    finally:
        server_cm.__exit__(None, None, None)


def _require_redis() -> None:
    """Fail early, before any process starts, when ``redis-server`` is missing."""
    with _redis(True):
        pass


async def _seed(path: str, *, fenced: bool, manager: bool) -> None:
    """The session with its first turn, written before the race (by a ``SessionManager``, or raw)."""
    from langgraph.checkpoint.base import empty_checkpoint

    from ..models import ExtractiveChatModel
    from ..sessions import SessionManager

    async with saver_class(fenced).from_conn_string(path) as saver:
        await saver.setup()
        if manager:
            async with SessionManager(model=ExtractiveChatModel(), checkpointer=saver) as sessions:
                await sessions.chat(SESSION, FIRST, create_if_missing=True)
            return
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"]["messages"] = [FIRST, f'answer to "{FIRST}" (saw 0 messages)']
        await saver.aput({"configurable": {"thread_id": SESSION, "checkpoint_ns": ""}}, checkpoint, {}, {})


async def _history(path: str) -> tuple[str, ...]:
    """The text of every message of the session's latest checkpoint."""
    async with saver_class(False).from_conn_string(path) as saver:
        saved = await saver.aget_tuple({"configurable": {"thread_id": SESSION, "checkpoint_ns": ""}})
    messages = saved.checkpoint["channel_values"].get("messages", []) if saved is not None else []
    return tuple(str(getattr(m, "content", m)) for m in messages)


def _job(**settings: Any) -> dict[str, Any]:
    return {"lease": 10.0, "gated": True, **settings}


def _turn(index: int, who: str, *, latency: float, after: int | None, hold_commit: bool = False) -> dict[str, Any]:
    """One turn of a job: its lane, message and thinking time, which turn it starts after, whether its commit is held."""
    return {"index": index, "lane": who, "text": f"from {who}", "latency": latency, "after": after,
            "hold_commit": hold_commit}


def _variant(*, worker: str | None, fixed: bool, fenced: bool, one_process: bool, lease: float | None = None) -> str:
    who = Path(worker).name if worker is not None else "SessionManager"
    if fixed:
        lock = "one RedisKeyedLock" + (f" (lease {lease:g} s)" if lease is not None else "")
    else:
        lock = "one KeyedLock" if one_process else "a KeyedLock per process"
    where = ", one process" if one_process else ""
    return f"{who}, {lock}, {'FencedSqliteSaver' if fenced else 'AsyncSqliteSaver'}{where}"


def _result(
    *,
    experiment: str,
    variant: str,
    fixed: bool,
    turns: Sequence[dict[str, Any]],
    reports: Sequence[tuple[Any, ...] | None],
    sent_at: float,
    history: tuple[str, ...],
    extra_rows: Sequence[TimelineRow] = (),
) -> ScaleoutRaceResult:
    """Merge the processes' reports into one timeline (time 0: the first step recorded) and judge the history.

    ``extra_rows`` are on the same clock as the reports, counted from ``sent_at``.
    """
    told: dict[str, tuple[int | None, str | None]] = {}
    merged: list[TimelineRow] = list(extra_rows)
    for report in reports:
        if report is None:
            continue
        _, outcomes, origin, rows = report
        for who, turn, error in outcomes:
            told[who] = (turn, error)
        shift = origin - sent_at
        merged += [TimelineRow(w, p, start + shift, None if end is None else end + shift, k, o, d)
                   for w, p, start, end, k, o, d in rows]
    first = min((row.start for row in merged), default=0.0)
    timeline = Timeline()
    for row in sorted(merged, key=lambda r: r.start):
        end = None if row.end is None else row.end - first
        timeline.add(dataclasses.replace(row, start=row.start - first, end=end))
    lanes = tuple(t["lane"] for t in turns)
    text_of = {t["lane"]: t["text"] for t in turns}
    owner = {text: who for who, text in text_of.items()}
    expected = tuple(text_of[who] for who in lanes if told[who][0] is not None)  # told "saved"
    observed = tuple(m for m in history if m in owner)
    # Who runs first under a lock is up to the lock: the expected order is the order they were kept in.
    in_order = tuple(m for m in observed if m in expected) + tuple(m for m in expected if m not in observed)
    anomalies = find_history_anomalies(in_order, observed, who=lambda m: owner.get(m, "?"))
    mark_lost_updates(timeline, what="lost message")
    return ScaleoutRaceResult(
        experiment=experiment,
        variant=variant,
        fixed=fixed,
        timeline=timeline,
        expected=expected,
        observed=observed,
        anomalies=anomalies,
        lanes=lanes,
        turns_told=tuple(told[who][0] for who in lanes),
        errors=tuple(told[who][1] for who in lanes),
        refused=sum(1 for who in lanes if told[who][0] is None),
        history=history,
    )


async def _race(
    procs: WorkerProcesses, *, fixed: bool, fenced: bool, one_process: bool, worker: str | None, latency: float
) -> ScaleoutRaceResult:
    if one_process:
        lanes = ("process A, task 1", "process A, task 2")
    else:
        lanes = PROCESSES
    # the first turn is the slowest; each later one starts once the one before it is in flight
    turns = [_turn(i, who, latency=latency * (_TURNS - i), after=None if i == 0 else i - 1)
             for i, who in enumerate(lanes)]
    with tempfile.TemporaryDirectory(prefix="chatkit-scaleout-") as tmp, _redis(fixed) as redis_url:
        path = os.path.join(tmp, "sessions.sqlite")
        await _seed(path, fenced=fenced, manager=worker is None)
        namespace = f"chatkit-experiment:{os.getpid()}:{time.monotonic_ns()}"  # one lock for both processes
        settings = {"fixed": fixed, "fenced": fenced, "worker": worker, "path": path, "redis_url": redis_url,
                    "namespace": namespace, "shared_lock": fixed or one_process}
        if one_process:
            jobs: list[dict[str, Any] | None] = [_job(turns=turns, **settings), None]
        else:
            jobs = [_job(turns=[turn], **settings) for turn in turns]
        sent_at = time.monotonic()
        reports = await asyncio.to_thread(procs._run, jobs)
        history = await _history(path)
    return _result(
        experiment="one-process session race" if one_process else "two-process session race",
        variant=_variant(worker=worker, fixed=fixed, fenced=fenced, one_process=one_process),
        fixed=fixed,
        turns=turns,
        reports=reports,
        sent_at=sent_at,
        history=history,
    )


async def scaleout_race(
    *,
    fixed: bool,
    fenced: bool | None = None,
    one_process: bool = False,
    worker: str | os.PathLike[str] | None = None,
    latency: float = 0.05,
    processes: WorkerProcesses | None = None,
) -> ScaleoutRaceResult:
    """Two messages for one session at once, from two worker processes sharing one SQLite checkpointer.

    See the module docstring for the scenario, the worker file and the timeline.

    Args:
        fixed: one ``RedisKeyedLock`` shared by the processes (on a throwaway Redis server) instead of a
            ``KeyedLock`` per process.
        fenced: a ``FencedSqliteSaver`` instead of a plain ``AsyncSqliteSaver`` (default: ``fixed``).
        one_process: send both messages to process A, as two tasks sharing its lock.
        worker: a Python file defining ``async def chat(session_id, text, *, saver, lock, llm) -> int``
            to run each turn (default: ``SessionManager.chat``).
        latency: seconds; process B's model answers after ``latency``, process A's after twice that.
        processes: the :class:`WorkerProcesses` to run on (default: start two, and stop them after).

    Raises:
        ValueError: a negative latency, or ``fixed=True, fenced=False`` without a worker file (``SessionManager``
            refuses a ``RedisKeyedLock`` with a saver that is not fenced).
        FileNotFoundError: ``worker`` names no file.
        RuntimeError: a worker process failed (the message holds its traceback).
        chatkit.testing.ServerUnavailable: ``fixed=True`` and ``redis-server`` is not installed.
        ImportError: ``langgraph-checkpoint-sqlite`` (or, for ``fixed=True``, ``redis``) is missing.

    Example:
        >>> import chatkit
        >>> result = chatkit.run(scaleout_race(fixed=False))          # doctest: +SKIP
        >>> result.summary()                                          # doctest: +SKIP
        'SessionManager, a KeyedLock per process, AsyncSqliteSaver: told turns 2 and 2, 1 of 2 kept, 1 lost'
    """
    _check_seconds("latency", latency)
    fenced = fixed if fenced is None else fenced
    path = _check_worker(worker)
    if fixed and not fenced and path is None:
        raise ValueError(
            "fixed=True, fenced=False: SessionManager refuses a RedisKeyedLock with a saver that is not fenced; "
            "use fenced=True (or a worker file of your own)"
        )
    if fixed:
        _require_redis()
    with _processes(processes) as procs:
        return await _race(procs, fixed=fixed, fenced=fenced, one_process=one_process, worker=path, latency=latency)


async def compare_scaleout_race(*, latency: float = 0.05, processes: WorkerProcesses | None = None) -> Comparison:
    """Run :func:`scaleout_race` naive, then fixed, on the same two processes (``SessionManager`` turns).

    Raises:
        chatkit.testing.ServerUnavailable: ``redis-server`` is not installed (checked before anything runs).
    """
    _check_seconds("latency", latency)
    _require_redis()
    with _processes(processes) as procs:
        before = await _race(procs, fixed=False, fenced=False, one_process=False, worker=None, latency=latency)
        after = await _race(procs, fixed=True, fenced=True, one_process=False, worker=None, latency=latency)
    return Comparison(before, after)


async def paused_holder(
    *, lease: float = 0.5, latency: float = 0.05, processes: WorkerProcesses | None = None
) -> ScaleoutRaceResult:
    """A lock holder stopped past its lease: its late commit is refused for its stale fencing token.

    Both processes run ``SessionManager`` on one ``RedisKeyedLock`` (``lease`` seconds) and one
    ``FencedSqliteSaver``. Process A takes the session, reads it, asks its model, and sends its commit;
    while the commit is on its way to the database, A is stopped (``SIGSTOP``: what a long garbage
    collection, a frozen VM or a swapped-out process do). Its lease runs out; process B, sent a message
    meanwhile, takes the session (with a newer fencing token), and commits turn 2. Then A continues
    (``SIGCONT``): it learns it lost the lock, and its commit, already on its way, reaches the database,
    which refuses it (``StaleCommit``: its token is older than the thread's newest). The timeline shows A's
    ``paused`` span, when its lease ran out (B's lock grant), both holds overlapping (A still believed it held
    the session), and A's refused write.

    Args:
        lease: the lock's lease in seconds (at least 0.1); B waits about this long.
        latency: each model call's thinking time, in seconds.
        processes: the :class:`WorkerProcesses` to run on (default: start two, and stop them after).

    Raises:
        ValueError: a lease under 0.1 s or a negative latency.
        RuntimeError: no POSIX signals (``SIGSTOP``) on this platform, or a worker process failed.
        chatkit.testing.ServerUnavailable: ``redis-server`` is not installed.

    Example:
        >>> import chatkit
        >>> result = chatkit.run(paused_holder())                          # doctest: +SKIP
        >>> result.turns_told, result.refused, result.errors[0].split(":")[0]  # doctest: +SKIP
        ((None, 2), 1, 'StaleCommit')
    """
    _check_seconds("latency", latency)
    _check_seconds("lease", lease, minimum=0.1)
    if not hasattr(signal, "SIGSTOP"):
        raise RuntimeError("paused_holder() stops a process with SIGSTOP, which this platform does not have")
    _require_redis()
    turns = [
        _turn(0, PROCESSES[0], latency=latency, after=None, hold_commit=True),
        _turn(1, PROCESSES[1], latency=latency, after=None),  # sent by the parent once A is stopped
    ]
    with (
        _processes(processes) as procs,
        tempfile.TemporaryDirectory(prefix="chatkit-scaleout-") as tmp,
        _redis(True) as url,
    ):
        path = os.path.join(tmp, "sessions.sqlite")
        await _seed(path, fenced=True, manager=True)
        namespace = f"chatkit-experiment:{os.getpid()}:{time.monotonic_ns()}"
        settings = {"fixed": True, "fenced": True, "worker": None, "path": path, "redis_url": url, "lease": lease,
                    "namespace": namespace, "shared_lock": True, "gated": False}
        job_a, job_b = ({**settings, "turns": [turn]} for turn in turns)
        sent_at = time.monotonic()
        report_a, report_b, stopped, continued = await asyncio.to_thread(procs._paused, job_a, job_b)
        history = await _history(path)
    paused = TimelineRow(PROCESSES[0], "paused", stopped - sent_at, continued - sent_at, SESSION, None, "SIGSTOP to SIGCONT")
    result = _result(
        experiment="paused lock holder",
        variant=_variant(worker=None, fixed=True, fenced=True, one_process=False, lease=lease),
        fixed=True,
        turns=turns,
        reports=[report_a, report_b],
        sent_at=sent_at,
        history=history,
        extra_rows=[paused],
    )
    taken = next((r.start for r in result.timeline.rows() if r.who == PROCESSES[1] and r.phase == "hold"), None)
    if taken is not None:  # Redis found A's ticket dead (its lease ran out) and granted B's
        ran_out = TimelineRow(PROCESSES[0], "lease ran out", taken, None, SESSION, None, "lease ran out: B took the lock")
        result.timeline.add(ran_out)
    result.timeline.style("paused", colour="#e08214", label="paused (SIGSTOP to SIGCONT)")
    return result


def _check_seconds(name: str, value: float, *, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value < float("inf"):
        raise ValueError(f"{name} must be finite seconds >= {minimum:g}, got {value!r}")


def _check_worker(worker: str | os.PathLike[str] | None) -> str | None:
    if worker is None:
        return None
    if not isinstance(worker, (str, os.PathLike)):
        raise TypeError(f"worker must be the path of a Python file, got {type(worker).__name__} {worker!r}")
    path = Path(worker).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"worker file {str(worker)!r} does not exist")
    return str(path)
