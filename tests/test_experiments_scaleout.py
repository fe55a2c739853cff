"""chatkit.experiments.scaleout: two OS processes, one checkpointer. A lock per process always loses a message;
one RedisKeyedLock + a fenced saver never does; a fenced saver refuses the loser of a race and a paused holder's
late commit. The experiments start their own processes (one pair for the module) and Redis servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chatkit.experiments import scaleout
from chatkit.experiments.scaleout import PROCESSES, ScaleoutRaceResult, WorkerProcesses, compare_scaleout_race
from chatkit.testing import ServerUnavailable
from chatkit.timeline import TimelineRow
from tests.conftest import _unavailable

pytest.importorskip("redis")
pytest.importorskip("langgraph.checkpoint.sqlite.aio")

LATENCY = 0.02
BEFORE = "SessionManager, a KeyedLock per process, AsyncSqliteSaver: told turns 2 and 2, 1 of 2 kept, 1 lost"
AFTER = "SessionManager, one RedisKeyedLock, FencedSqliteSaver: told turns 2 and 3, 2 of 2 kept, nothing lost"

NAIVE_WORKER = '''
from langgraph.checkpoint.base import empty_checkpoint


async def chat(session_id, text, *, saver, lock, llm):
    thread = {"configurable": {"thread_id": session_id, "checkpoint_ns": ""}}
    async with lock(session_id):
        saved = await saver.aget_tuple(thread)
        history = saved.checkpoint["channel_values"]["messages"]
        answer = await llm(history, text)
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"]["messages"] = [*history, text, answer]
        await saver.aput(saved.config, checkpoint, {}, {})
    return len(history) // 2 + 1
'''

RETRYING_WORKER = '''
from langgraph.checkpoint.base import empty_checkpoint

from chatkit import StaleCommit, fence


async def chat(session_id, text, *, saver, lock, llm):
    thread = {"configurable": {"thread_id": session_id, "checkpoint_ns": ""}}
    while True:
        async with lock(session_id):
            saved = await saver.aget_tuple(thread)
            history = saved.checkpoint["channel_values"]["messages"]
            answer = await llm(history, text)
            checkpoint = empty_checkpoint()
            checkpoint["channel_values"]["messages"] = [*history, text, answer]
            try:
                await saver.aput(fence(saved.config, token=None), checkpoint, {}, {})
            except StaleCommit:
                continue  # another process committed first: read again
        return len(history) // 2 + 1
'''


@pytest.fixture(scope="module")
def procs() -> Iterator[WorkerProcesses]:
    """The experiments' two worker processes, started once for the module (each spends ~2 s importing)."""
    with WorkerProcesses() as started:
        yield started


@pytest.fixture
def worker_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "naive_worker.py"
    path.write_text(NAIVE_WORKER, encoding="utf-8")
    yield path


async def race(procs: WorkerProcesses, **options: object) -> ScaleoutRaceResult:
    try:
        return await scaleout.scaleout_race(latency=LATENCY, processes=procs, **options)  # type: ignore[arg-type]
    except ServerUnavailable as exc:
        _unavailable(exc)
        raise


def marks(result: ScaleoutRaceResult, phase: str) -> list[tuple[str, str | None]]:
    return [(r.who, r.detail) for r in result.timeline.rows() if r.phase == phase]


def first(result: ScaleoutRaceResult, who: str, phase: str) -> TimelineRow:
    return next(r for r in result.timeline.rows() if r.who == who and r.phase == phase)


@pytest.mark.parametrize(
    "fixed",
    [
        pytest.param(False, marks=pytest.mark.xfail(strict=True, reason="a lock per process stops at the process boundary")),
        True,
    ],
    ids=["a KeyedLock per process", "one RedisKeyedLock + FencedSqliteSaver"],
)
async def test_two_processes_sending_at_once_lose_nothing(procs: WorkerProcesses, fixed: bool) -> None:
    result = await race(procs, fixed=fixed)
    assert result.ok and result.turns_told == (2, 3) and result.observed == ("from process A", "from process B")


async def test_a_lock_per_process_loses_process_bs_turn_on_every_run(procs: WorkerProcesses) -> None:
    for _ in range(2):
        before = await race(procs, fixed=False)
        assert before.summary() == BEFORE
        assert before.turns_told == (2, 2) and before.count("lost message") == 1 and before.refused == 0
        # both read the one turn before either wrote; each wrote it plus its own; A's write erased B's
        assert marks(before, "read") == [("process A", "saw 2 messages"), ("process B", "saw 2 messages")]
        assert marks(before, "write") == [("process B", "wrote 4 messages"), ("process A", "wrote 4 messages")]
        (lost,) = [r for r in before.timeline.rows() if r.phase == "lost message"]
        assert (lost.who, lost.detail, lost.start) == ("process B", "overwritten by process A", first(before, "process A", "write").start)
        assert before.history[2:] == ("from process A", 'Message 2: you said "from process A". I found no documents to answer from.')
    lanes = list(dict.fromkeys(r.who for r in before.timeline.rows()))
    assert lanes == list(PROCESSES)  # one lane per process, A (which started first) on top
    for name in PROCESSES:  # each process held its own lock and called its model inside it
        hold, model = first(before, name, "hold"), first(before, name, "model")
        assert hold.start <= model.start and model.end is not None and hold.end is not None and model.end <= hold.end


async def test_one_redis_lock_serializes_the_turns_and_records_each_process_wait_and_hold(procs: WorkerProcesses) -> None:
    after = await race(procs, fixed=True)
    assert after.summary() == AFTER
    assert marks(after, "read") == [("process A", "saw 2 messages"), ("process B", "saw 4 messages")]
    assert marks(after, "write") == [("process A", "wrote 4 messages"), ("process B", "wrote 6 messages")]
    a_write, b_read = first(after, "process A", "write"), first(after, "process B", "read")
    b_wait, b_hold = first(after, "process B", "wait"), first(after, "process B", "hold")
    assert b_wait.end is not None and b_wait.start < a_write.start < b_wait.end <= b_hold.start <= b_read.start
    assert {r.key for r in after.timeline.rows()} == {scaleout.SESSION}


async def test_a_fenced_saver_refuses_the_loser_of_the_race_instead_of_losing_its_turn(procs: WorkerProcesses) -> None:
    result = await race(procs, fixed=False, fenced=True)
    assert result.summary() == (
        "SessionManager, a KeyedLock per process, FencedSqliteSaver: told StaleCommit and turn 2, 1 of 2 kept, "
        "nothing lost, 1 refused"
    )
    assert result.ok and result.expected == ("from process B",) and result.observed == ("from process B",)
    assert (result.errors[0] or "").startswith("StaleCommit: your message on session 's1' was not saved")
    assert marks(result, "refused") == [("process A", "refused: the head moved")]
    assert marks(result, "lost message") == []


async def test_a_worker_file_runs_in_each_process(procs: WorkerProcesses, worker_file: Path) -> None:
    naive = await race(procs, fixed=False, worker=worker_file)
    assert naive.summary() == "naive_worker.py, a KeyedLock per process, AsyncSqliteSaver: told turns 2 and 2, 1 of 2 kept, 1 lost"
    assert naive.history == ("Hi, I'm Ana.", 'answer to "Hi, I\'m Ana." (saw 0 messages)', "from process A",
                             'answer to "from process A" (saw 2 messages)')
    assert marks(naive, "lost message") == [("process B", "overwritten by process A")]
    one = await race(procs, fixed=False, worker=worker_file, one_process=True)
    assert one.summary() == (
        "naive_worker.py, one KeyedLock, AsyncSqliteSaver, one process: told turns 2 and 3, 2 of 2 kept, nothing lost"
    )
    assert one.lanes == ("process A, task 1", "process A, task 2")
    assert marks(one, "read") == [("process A, task 1", "saw 2 messages"), ("process A, task 2", "saw 4 messages")]
    shared = await race(procs, fixed=True, fenced=False, worker=worker_file)
    assert shared.summary() == "naive_worker.py, one RedisKeyedLock, AsyncSqliteSaver: told turns 2 and 3, 2 of 2 kept, nothing lost"


async def test_a_worker_that_reads_again_after_a_refused_commit_keeps_both_turns(procs: WorkerProcesses, tmp_path: Path) -> None:
    path = tmp_path / "retrying_worker.py"
    path.write_text(RETRYING_WORKER, encoding="utf-8")
    result = await race(procs, fixed=False, fenced=True, worker=path)
    assert result.summary() == (
        "retrying_worker.py, a KeyedLock per process, FencedSqliteSaver: told turns 3 and 2, 2 of 2 kept, nothing lost"
    )
    steps = [(r.who, r.phase, r.detail) for r in result.timeline.rows() if r.phase in ("read", "write", "refused")]
    assert steps == [
        ("process A", "read", "saw 2 messages"),
        ("process B", "read", "saw 2 messages"),
        ("process B", "write", "wrote 4 messages"),
        ("process A", "refused", "refused: the head moved"),
        ("process A", "read", "saw 4 messages"),
        ("process A", "write", "wrote 6 messages"),
    ]
    assert [r.who for r in result.timeline.rows() if r.phase == "model"] == ["process A", "process B", "process A"]


async def test_a_paused_holders_late_commit_is_refused_for_its_stale_token(procs: WorkerProcesses) -> None:
    try:
        result = await scaleout.paused_holder(lease=0.5, latency=LATENCY, processes=procs)
    except ServerUnavailable as exc:
        _unavailable(exc)
    assert result.summary() == (
        "SessionManager, one RedisKeyedLock (lease 0.5 s), FencedSqliteSaver: told StaleCommit and turn 2, 1 of 2 kept, "
        "nothing lost, 1 refused"
    )
    assert "lost the session's lock" in (result.errors[0] or "")
    assert result.history[0::2] == ("Hi, I'm Ana.", "from process B")
    paused, refused = first(result, "process A", "paused"), first(result, "process A", "refused")
    a_hold, b_hold, b_write = first(result, "process A", "hold"), first(result, "process B", "hold"), first(result, "process B", "write")
    assert refused.detail == "refused: stale token"
    assert paused.end is not None and a_hold.end is not None and b_hold.end is not None
    # B took the session while A was stopped, still believing it held it; A's commit came after B's
    assert paused.start < b_hold.start < b_write.start < paused.end <= refused.start
    assert b_hold.start < a_hold.end
    assert marks(result, "lease ran out") == [("process A", "lease ran out: B took the lock")]
    assert first(result, "process A", "lease ran out").start == b_hold.start
    assert result.timeline.styles()["paused"]["label"] == "paused (SIGSTOP to SIGCONT)"


async def test_compare_runs_both_on_the_given_processes(procs: WorkerProcesses) -> None:
    try:
        comparison = await compare_scaleout_race(latency=LATENCY, processes=procs)
    except ServerUnavailable as exc:
        _unavailable(exc)
    assert comparison.summary() == f"before: {BEFORE}\nafter:  {AFTER}"
    assert len(comparison.plot().axes) == 2


async def test_without_redis_server_it_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatkit.testing

    def missing() -> str:
        raise ServerUnavailable("redis-server is not installed (Debian: apt-get install redis-server)")

    monkeypatch.setattr(chatkit.testing, "_redis_binary", missing)
    for experiment in (compare_scaleout_race(), scaleout.scaleout_race(fixed=True), scaleout.paused_holder()):
        with pytest.raises(ServerUnavailable, match="needs a Redis server: redis-server is not installed"):
            await experiment


@pytest.mark.parametrize("latency", [-1.0, float("nan"), True])
async def test_bad_latency_is_refused(latency: float) -> None:
    with pytest.raises(ValueError, match="latency"):
        await scaleout.scaleout_race(fixed=False, latency=latency)


async def test_bad_settings_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lease must be finite seconds >= 0.1, got 0.05"):
        await scaleout.paused_holder(lease=0.05)
    with pytest.raises(FileNotFoundError, match="no_such_worker.py"):
        await scaleout.scaleout_race(fixed=False, worker=tmp_path / "no_such_worker.py")
    with pytest.raises(TypeError, match="path of a Python file, got int 3"):
        await scaleout.scaleout_race(fixed=False, worker=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fixed=True, fenced=False: SessionManager refuses a RedisKeyedLock with a saver that is not fenced"):
        await scaleout.scaleout_race(fixed=True, fenced=False)
    with pytest.raises(TypeError, match="processes must be WorkerProcesses, got str"):
        await scaleout.scaleout_race(fixed=False, processes="mine")  # type: ignore[arg-type]


async def test_a_broken_worker_file_fails_with_its_traceback(procs: WorkerProcesses, tmp_path: Path) -> None:
    no_chat = tmp_path / "no_chat.py"
    no_chat.write_text("def talk():\n    pass\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="must define async def chat"):
        await race(procs, fixed=False, worker=no_chat)
    wrong = tmp_path / "wrong_turn.py"
    wrong.write_text("async def chat(session_id, text, *, saver, lock, llm):\n    return 'two'\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="must return the turn number"):
        await race(procs, fixed=False, worker=wrong)
    assert (await race(procs, fixed=False)).summary() == BEFORE  # the processes still work


def test_closed_processes_say_so() -> None:
    workers = WorkerProcesses.__new__(WorkerProcesses)  # no processes needed to check the guard
    workers._closed = True
    with pytest.raises(RuntimeError, match="these WorkerProcesses are closed"):
        with scaleout._processes(workers):
            pass
