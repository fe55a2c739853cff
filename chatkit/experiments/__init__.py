"""Ready-made race experiments: each runs the naive version and the fixed one and reports what went wrong.

The notebooks, the demo's race lab and the tests all call these, so every experiment exists once.
Every race shows on *every* run, by construction rather than by luck:

* an :class:`InFlight` gate holds each model call until every request of the experiment is *in flight*:
  inside its own model call (the naive run), or queued for the lock (the fixed run). In the naive run
  this makes certain that all requests read the same state before any of them writes; in the fixed run
  it changes nothing, because the lock already orders the turns.
* after the gate, chosen latencies decide who finishes first (the first request is the slowest, so the
  naive run also finishes in reverse order), and a :class:`FakeLLM` makes that order certain: a request
  done thinking waits for the quicker ones still thinking.

The timelines carry the steps that race: what each request *read* and *wrote* (``saw 2 messages``,
``wrote 4 messages``; a :class:`RecordingSaver` marks them for ``SessionManager``), and each damage mark
says what caused it, where it happened (:func:`mark_lost_updates`: ``overwritten by request 2`` at request
2's write; :func:`mark_reordered_writes`: ``ahead of request 1``).

:func:`compare_scaleout_race` runs its race across two OS processes sharing one checkpointer (the naive
version: a lock per process; the fix: ``RedisKeyedLock`` and a fenced saver, on a throwaway Redis server).

Each experiment returns a frozen result with its :class:`~chatkit.Timeline`, what was expected, what was
observed and the :class:`Anomaly` list (lost messages, reordered messages, lost LangGraph turns,
partial documents). ``result.summary()`` is one deterministic line (no timings), which is what the
notebooks print and nbval compares.

Example:
    >>> import chatkit
    >>> from chatkit import experiments
    >>> before = chatkit.run(experiments.checkpointer_race(locked=False))
    >>> before.summary()
    'raw graph.ainvoke: 3 concurrent turns, 2 of 6 messages kept, 2 turns lost; 3 checkpoint branches'
    >>> after = chatkit.run(experiments.checkpointer_race(locked=True))
    >>> after.summary()
    'graph.ainvoke under KeyedLock: 3 concurrent turns, 6 of 6 messages kept, nothing lost; 1 checkpoint branch'
"""

from __future__ import annotations

from ._common import (
    QUESTIONS,
    Anomaly,
    Comparison,
    FakeLLM,
    InFlight,
    RaceResult,
    RecordingSaver,
    find_history_anomalies,
    mark_lost_updates,
    mark_reordered_writes,
)
from .checkpointer import CheckpointRaceResult, checkpointer_race, compare_checkpointer_race
from .locks import LockDemoResult, lock_fifo, multi_key_deadlock, shared_across_threads
from .policies import PolicyComparison, PolicyResult, compare_double_texting, double_texting
from .scaleout import ScaleoutRaceResult, compare_scaleout_race, scaleout_race
from .sessions import SessionRaceResult, compare_session_race, session_race
from .store import StoreRaceResult, compare_store_race, store_race

__all__ = [
    "Anomaly",
    "RaceResult",
    "CheckpointRaceResult",
    "Comparison",
    "InFlight",
    "FakeLLM",
    "RecordingSaver",
    "find_history_anomalies",
    "mark_lost_updates",
    "mark_reordered_writes",
    "checkpointer_race",
    "compare_checkpointer_race",
    "QUESTIONS",
    "LockDemoResult",
    "lock_fifo",
    "multi_key_deadlock",
    "shared_across_threads",
    "SessionRaceResult",
    "session_race",
    "compare_session_race",
    "PolicyResult",
    "PolicyComparison",
    "double_texting",
    "compare_double_texting",
    "StoreRaceResult",
    "store_race",
    "compare_store_race",
    "ScaleoutRaceResult",
    "scaleout_race",
    "compare_scaleout_race",
]
