"""chatkit.experiments.scaleout: two OS processes, one checkpointer; the naive run always loses a message,
the fixed one (RedisKeyedLock + FencedSqliteSaver) never does. The experiment starts its own processes and
Redis server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from chatkit.experiments import scaleout
from chatkit.experiments.scaleout import PROCESSES, compare_scaleout_race
from chatkit.testing import ServerUnavailable
from tests.conftest import _unavailable

pytest.importorskip("redis")
pytest.importorskip("langgraph.checkpoint.sqlite.aio")

BEFORE = "a KeyedLock per process, one AsyncSqliteSaver: 2 processes told turns 2 and 2, 1 of 2 messages kept, 1 lost"
AFTER = "RedisKeyedLock + FencedSqliteSaver: 2 processes told turns 2 and 3, 2 of 2 messages kept, nothing lost"


@pytest.fixture(scope="module")
def procs() -> Iterator[scaleout._Processes]:
    """The experiment's two worker processes, started once for the module (each spends ~2 s importing)."""
    with scaleout._processes() as started:
        yield started


async def test_the_naive_run_always_loses_a_message_and_the_fix_never_does(procs: scaleout._Processes) -> None:
    for _ in range(2):
        try:
            before = await scaleout._race(procs, fixed=False, latency=0.02)
            after = await scaleout._race(procs, fixed=True, latency=0.02)
        except ServerUnavailable as exc:
            _unavailable(exc)
        assert (before.summary(), after.summary()) == (BEFORE, AFTER)
        assert before.count("lost message") == 1 and before.turns_told == (2, 2) and not before.ok
        assert after.ok and sorted(after.turns_told) == [2, 3] and after.refused == 0
    for result in (before, after):
        lanes = {row.who for row in result.timeline.rows()}
        assert lanes == set(PROCESSES)
        for name in PROCESSES:  # each process read, awaited its model and wrote, holding a lock
            phases = [row.phase for row in result.timeline.rows() if row.who == name]
            assert {"read", "model", "write", "wait", "hold"} <= set(phases), (name, phases)
    (lost,) = [row for row in before.timeline.rows() if row.phase == "lost message"]
    assert lost.who == "process B" and lost.detail == "overwritten by process A"
    first, second = _turns(after)
    assert first[1] <= second[0]  # one turn at a time: read, model and write of one, then of the other
    first, second = _turns(before)
    assert second[0] < first[1]  # a lock per process: the second read before the first wrote


def _turns(result: scaleout.ScaleoutRaceResult) -> list[tuple[float, float]]:
    """Each process's turn, from its read to the end of its write, earliest first."""
    spans = []
    for name in PROCESSES:
        rows = [r for r in result.timeline.rows() if r.who == name and r.phase in ("read", "model", "write")]
        spans.append((min(r.start for r in rows), max(r.end or r.start for r in rows)))
    return sorted(spans)


async def test_compare_runs_both_on_the_same_processes(procs: scaleout._Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scaleout, "_processes", lambda: contextlib.nullcontext(procs))  # the module's processes
    try:
        comparison = await compare_scaleout_race(latency=0.02)
    except ServerUnavailable as exc:
        _unavailable(exc)
    assert comparison.summary() == f"before: {BEFORE}\nafter:  {AFTER}"
    assert len(comparison.plot().axes) >= 2


async def test_without_redis_server_it_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatkit.testing

    def missing() -> str:
        raise ServerUnavailable("redis-server is not installed (Debian: apt-get install redis-server)")

    monkeypatch.setattr(chatkit.testing, "_redis_binary", missing)
    with pytest.raises(ServerUnavailable, match="needs a Redis server: redis-server is not installed"):
        await compare_scaleout_race()


@pytest.mark.parametrize("latency", [-1.0, float("nan"), True])
async def test_bad_latency_is_refused(latency: float) -> None:
    with pytest.raises(ValueError, match="latency"):
        await scaleout.scaleout_race(fixed=False, latency=latency)
