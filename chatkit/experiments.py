"""Ready-made race experiments: each runs the naive version and the fixed one and reports what went wrong.

The notebooks, the demo's race lab and the tests all call these, so every experiment exists once.
Every race shows on *every* run, by construction rather than by luck:

* an :class:`InFlight` gate holds each model call until every request of the experiment is *in flight*:
  inside its own model call (the naive run), or queued for the lock (the fixed run). In the naive run
  this makes certain that all requests read the same state before any of them writes; in the fixed run
  it changes nothing, because the lock already orders the turns.
* after the gate, chosen latencies decide who finishes first (the first request is the slowest, so the
  naive run also finishes in reverse order).

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

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .lock import KeyedLock, LockEvent
from .timeline import Timeline, TimelineRow, plot_timelines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Anomaly",
    "RaceResult",
    "CheckpointRaceResult",
    "Comparison",
    "InFlight",
    "find_history_anomalies",
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
]

logger = logging.getLogger(__name__)

#: The three-message scenario from the original plan, one question per request.
QUESTIONS: tuple[str, ...] = (
    "First message: what is a race condition?",
    "Second message: why does a lock help?",
    "Third message: what does FIFO mean?",
)


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True, slots=True)
class Anomaly:
    """One thing the naive version got wrong.

    Attributes:
        kind: ``"lost message"``, ``"reordered message"``, ``"duplicated message"``, ``"lost turn"``
            or ``"partial document"``.
        who: the request it happened to.
        detail: the message or document concerned.
    """

    kind: str
    who: str
    detail: str


@dataclass(frozen=True, slots=True)
class RaceResult:
    """What one run of an experiment did.

    Attributes:
        experiment: the experiment's name, e.g. ``"checkpointer race"``.
        variant: which version ran, e.g. ``"raw graph.ainvoke"`` or ``"graph.ainvoke under KeyedLock"``.
        fixed: whether this is the fixed (locked / copy-on-write) version.
        timeline: the recorded spans and events; ``result.timeline.plot()`` draws them.
        expected: what a correct run leaves behind (messages in order, or documents).
        observed: what this run left behind.
        anomalies: everything that went wrong; empty for a correct run.
    """

    experiment: str
    variant: str
    fixed: bool
    timeline: Timeline = field(repr=False)
    expected: tuple[str, ...]
    observed: tuple[str, ...]
    anomalies: tuple[Anomaly, ...]

    @property
    def ok(self) -> bool:
        """True when nothing went wrong."""
        return not self.anomalies

    def count(self, kind: str | None = None) -> int:
        """How many anomalies (of ``kind``, if given) were found."""
        return sum(1 for a in self.anomalies if kind is None or a.kind == kind)

    def summary(self) -> str:
        """One deterministic line (no timings) describing the outcome."""
        return f"{self.variant}: {self._outcome()}"

    def _outcome(self) -> str:
        if self.ok:
            return f"{len(self.observed)} of {len(self.expected)} kept, nothing lost"
        kinds: dict[str, int] = {}
        for a in self.anomalies:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        return ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in kinds.items())

    def plot(self, *, width: float = 10.0) -> Figure:
        """The run's timeline as a static chart titled with its summary."""
        return self.timeline.plot(title=self.summary(), width=width)

    def _repr_html_(self) -> str:
        from ._timeline_plot import figure_html

        return figure_html(self.plot(), alt=self.summary())


@dataclass(frozen=True, slots=True)
class CheckpointRaceResult(RaceResult):
    """A :class:`RaceResult` for the LangGraph checkpointer race.

    Attributes:
        turns: how many concurrent turns were sent.
        checkpoints: how many checkpoints the saver holds for the thread.
        branches: how many leaves the checkpoint tree has (1 for a straight history; each concurrent
            turn that started from the same checkpoint adds a branch).
    """

    turns: int = 0
    checkpoints: int = 0
    branches: int = 0

    def summary(self) -> str:
        lost_turns = self.count("lost turn")
        lost = f"{lost_turns} turn{'s' if lost_turns != 1 else ''} lost" if lost_turns else "nothing lost"
        branches = f"{self.branches} checkpoint branch{'es' if self.branches != 1 else ''}"
        return (
            f"{self.variant}: {self.turns} concurrent turns, {len(self.observed)} of {len(self.expected)} "
            f"messages kept, {lost}; {branches}"
        )


@dataclass(frozen=True, slots=True)
class Comparison:
    """A naive run and a fixed run of one experiment, to show side by side.

    Attributes:
        before: the naive run.
        after: the fixed run.
    """

    before: RaceResult
    after: RaceResult

    def summary(self) -> str:
        """Two deterministic lines: before, then after."""
        return f"before: {self.before.summary()}\nafter:  {self.after.summary()}"

    def plot(self, *, width: float = 10.0) -> Figure:
        """Both timelines stacked on one time axis, titled with their summaries."""
        return plot_timelines(
            {
                f"before: {self.before.summary()}": self.before.timeline,
                f"after: {self.after.summary()}": self.after.timeline,
            },
            width=width,
        )

    def _repr_html_(self) -> str:
        from ._timeline_plot import figure_html

        return figure_html(self.plot(), alt=self.summary())


# --------------------------------------------------------------------------------------------- helpers
class InFlight:
    """A gate that opens once every named request is in flight (idempotent per name).

    The naive run calls :meth:`arrive` from inside each model call; the fixed run also counts a request
    as arrived when it queues for the lock (:meth:`observe_lock`), since it can't reach the model before
    the requests ahead of it finish.

    Example:
        >>> import asyncio
        >>> gate = InFlight(["A", "B"])
        >>> async def main():
        ...     waiter = asyncio.create_task(gate.arrive("A"))
        ...     await asyncio.sleep(0)
        ...     opened_early = waiter.done()
        ...     await gate.arrive("B")
        ...     await waiter
        ...     return opened_early, gate.is_open
        >>> asyncio.run(main())
        (False, True)
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("InFlight needs at least one request name, got none")
        self._waiting = set(names)
        self._open = asyncio.Event()

    def __repr__(self) -> str:
        return f"<InFlight open={self.is_open} waiting_for={sorted(self._waiting)}>"

    @property
    def is_open(self) -> bool:
        """Whether every request has arrived."""
        return self._open.is_set()

    def mark(self, name: str) -> None:
        """Count ``name`` as in flight without waiting (safe from lock observers)."""
        self._waiting.discard(name)
        if not self._waiting:
            self._open.set()

    async def arrive(self, name: str) -> None:
        """Count ``name`` as in flight, then wait until every request is."""
        self.mark(name)
        await self._open.wait()

    async def wait(self) -> None:
        """Wait until every request is in flight, without counting anyone."""
        await self._open.wait()

    def observe_lock(self, event: LockEvent) -> None:
        """A lock observer: a request queued for the lock is in flight."""
        if event.kind == "requested":
            self.mark(event.label)


def find_history_anomalies(
    expected: Sequence[str], observed: Sequence[str], *, who: Callable[[str], str]
) -> tuple[Anomaly, ...]:
    """Compare a history with the correct one: lost, duplicated and reordered messages.

    A message is *reordered* when it is not on the longest run of messages that kept their relative order
    (so one message moved to the front counts once, not once per message it jumped).

    Example:
        >>> for a in find_history_anomalies(["u1", "a1", "u2", "a2"], ["u2", "a2", "u1"], who=lambda m: m[1]):
        ...     print(a.kind, a.detail)
        lost message a1
        reordered message u1
    """
    position = {m: i for i, m in enumerate(expected)}
    anomalies: list[Anomaly] = []
    seen: set[str] = set()
    kept: list[str] = []
    for m in observed:
        if m in seen and m in position:
            anomalies.append(Anomaly("duplicated message", who(m), m))
        elif m in position:
            seen.add(m)
            kept.append(m)
    anomalies[:0] = [Anomaly("lost message", who(m), m) for m in expected if m not in seen]
    in_order = set(_longest_increasing([position[m] for m in kept]))
    anomalies += [Anomaly("reordered message", who(m), m) for m in kept if position[m] not in in_order]
    return tuple(anomalies)


def _longest_increasing(values: list[int]) -> list[int]:
    """The longest strictly increasing subsequence, the smallest values on ties (O(n^2); histories are short)."""
    best: list[list[int]] = []
    for i, v in enumerate(values):
        prev = [best[j] for j in range(i) if values[j] < v]
        best.append(min(prev, key=lambda seq: (-len(seq), seq), default=[]) + [v])
    return min(best, key=lambda seq: (-len(seq), seq), default=[])


def _latency(index: int, count: int, base: float) -> float:
    """The first request is the slowest: request i (0-based) takes base * (count - i)."""
    return base * (count - index)


async def _gather_named(calls: Sequence[tuple[str, Callable[[], Awaitable[Any]]]]) -> list[Any]:
    """Start each call as a task named after its request, all at once, and gather the outcomes."""
    tasks = [asyncio.create_task(_call(fn), name=name) for name, fn in calls]
    return await asyncio.gather(*tasks, return_exceptions=True)


async def _call(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


# ----------------------------------------------------------------------------- the checkpointer race
def _echo_graph(*, latencies: dict[str, float], owner: dict[str, str], gate: InFlight, timeline: Timeline) -> Any:
    """A one-node LangGraph (``model``) over messages, compiled with ``InMemorySaver``.

    The node waits at ``gate`` (all requests in flight), then for the request's latency, then answers
    ``"answer to: <question>"``.
    """
    from langchain_core.messages import AIMessage
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import END, START, MessagesState, StateGraph

    async def model(state: MessagesState) -> dict[str, Any]:
        question = str(state["messages"][-1].content)
        who = owner[question]
        with timeline.span("model", who=who, key="thread-1"):
            await gate.arrive(who)
            await asyncio.sleep(latencies[who])
        return {"messages": [AIMessage(f"answer to: {question}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", model)
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    return builder.compile(checkpointer=InMemorySaver())


def _checkpoint_tree(saver: Any, config: dict[str, Any]) -> tuple[int, int]:
    """(number of checkpoints, number of leaves) of one thread's checkpoint tree."""
    ids: set[str] = set()
    parents: set[str] = set()
    for item in saver.list(config):
        ids.add(item.config["configurable"]["checkpoint_id"])
        if item.parent_config is not None:
            parents.add(item.parent_config["configurable"]["checkpoint_id"])
    return len(ids), len(ids - parents)


async def checkpointer_race(
    *,
    locked: bool,
    questions: Sequence[str] = QUESTIONS,
    latency: float = 0.02,
) -> CheckpointRaceResult:
    """Concurrent ``graph.ainvoke`` calls on one ``thread_id`` with ``InMemorySaver``.

    Naive (``locked=False``): every call loads the same checkpoint, adds its question and answer, and saves
    a child of that checkpoint: the thread's checkpoint tree grows one branch per call, and the latest
    state (what the next turn sees) keeps only the last writer's two messages. Fixed (``locked=True``):
    each call runs under a :class:`~chatkit.KeyedLock` on the thread id, so each turn starts from the
    previous turn's checkpoint and nothing is lost (this is what :class:`~chatkit.SessionManager` does).

    Args:
        locked: run the fixed version.
        questions: one question per concurrent request (at least 2).
        latency: seconds; request ``i`` (0-based) answers after ``latency * (len(questions) - i)``.

    Returns:
        A :class:`CheckpointRaceResult`; ``anomalies`` lists each lost turn and lost message.

    Raises:
        ValueError: fewer than two questions, duplicated questions, or a negative latency.
    """
    from langchain_core.messages import HumanMessage

    questions = _check_questions(questions)
    if latency < 0:
        raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
    names = [f"request {i + 1}" for i in range(len(questions))]
    owner = {q: n for q, n in zip(questions, names, strict=True)}
    latencies = {n: _latency(i, len(names), latency) for i, n in enumerate(names)}
    timeline = Timeline()
    gate = InFlight(names)
    graph = _echo_graph(latencies=latencies, owner=owner, gate=gate, timeline=timeline)
    config: dict[str, Any] = {"configurable": {"thread_id": "thread-1"}}
    lock = KeyedLock(observer=timeline.observe_lock)
    lock.add_observer(gate.observe_lock)
    end_of: dict[str, float] = {}

    def request(name: str, question: str) -> Callable[[], Awaitable[Any]]:
        async def turn() -> Any:
            with timeline.span("turn", who=name, key="thread-1"):
                if locked:
                    async with lock("thread-1", label=name):
                        out = await graph.ainvoke({"messages": [HumanMessage(question)]}, config)
                else:
                    out = await graph.ainvoke({"messages": [HumanMessage(question)]}, config)
            end_of[name] = timeline.now()
            return out

        return turn

    timeline.clear()  # time 0 = the moment the requests are sent
    outcomes = await _gather_named([(n, request(n, q)) for n, q in zip(names, questions, strict=True)])
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    state = await graph.aget_state(config)
    observed = tuple(str(m.content) for m in state.values.get("messages", []))
    expected = tuple(m for q in questions for m in (q, f"answer to: {q}"))
    who = {m: owner[m.removeprefix("answer to: ")] for m in expected}
    anomalies = list(find_history_anomalies(expected, observed, who=who.__getitem__))
    lost_turns = [n for n, q in zip(names, questions, strict=True) if q not in observed]
    anomalies[:0] = [Anomaly("lost turn", n, q) for n, q in zip(names, questions, strict=True) if n in lost_turns]
    _mark_overwrites(timeline, lost_turns, end_of)
    checkpoints, branches = _checkpoint_tree(graph.checkpointer, config)
    return CheckpointRaceResult(
        experiment="checkpointer race",
        variant="graph.ainvoke under KeyedLock" if locked else "raw graph.ainvoke",
        fixed=locked,
        timeline=timeline,
        expected=expected,
        observed=observed,
        anomalies=tuple(anomalies),
        turns=len(questions),
        checkpoints=checkpoints,
        branches=branches,
    )


def _mark_overwrites(
    timeline: Timeline, lost: Sequence[str], end_of: dict[str, float], *, key: str = "thread-1", what: str = "lost turn"
) -> None:
    """Mark each lost turn at the moment the next writer saved a state without it."""
    finish_order = sorted(end_of, key=end_of.__getitem__)
    for name in lost:
        later = [n for n in finish_order if end_of[n] > end_of[name]]
        when = end_of[later[0]] if later else end_of[name]
        timeline.add(TimelineRow(name, what, when, None, key, None, f"overwritten by {later[0] if later else '?'}"))


async def compare_checkpointer_race(*, questions: Sequence[str] = QUESTIONS, latency: float = 0.02) -> Comparison:
    """Run :func:`checkpointer_race` naive, then fixed."""
    before = await checkpointer_race(locked=False, questions=questions, latency=latency)
    after = await checkpointer_race(locked=True, questions=questions, latency=latency)
    return Comparison(before, after)


def _check_questions(questions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(questions, str):
        raise TypeError("questions must be a sequence of strings, not one string")
    qs = tuple(questions)
    if len(qs) < 2:
        raise ValueError(f"a race needs at least 2 concurrent questions, got {len(qs)}")
    if any(not isinstance(q, str) or not q.strip() for q in qs):
        raise ValueError(f"questions must be non-empty strings, got {qs!r}")
    if len(set(qs)) != len(qs):
        raise ValueError(f"questions must be distinct (each identifies its request), got {qs!r}")
    return qs




# ------------------------------------------------------------------------------ inside KeyedLock
@dataclass(frozen=True, slots=True)
class LockDemoResult:
    """What a :class:`~chatkit.KeyedLock` demonstration did.

    Attributes:
        name: the demonstration.
        timeline: wait and hold spans per caller, plus their work.
        order: per key, the callers in the order they got it, as ``"key: a -> b -> c"`` lines.
        overlaps: how many times two callers held one key at the same time (always 0 for ``KeyedLock``).
        deadlocked: whether the callers were still stuck when the demonstration gave up on them.
    """

    name: str
    timeline: Timeline = field(repr=False)
    order: tuple[str, ...]
    overlaps: int
    deadlocked: bool = False

    def summary(self) -> str:
        """Deterministic lines: the acquisition order per key, overlaps, deadlock."""
        lines = [f"{self.name}:", *(f"  {line}" for line in self.order), f"  overlapping holders: {self.overlaps}"]
        if self.deadlocked:
            lines.append("  DEADLOCK: every caller waits for a key another caller holds")
        return "\n".join(lines)

    def plot(self, *, width: float = 10.0) -> Figure:
        """The demonstration's timeline."""
        return self.timeline.plot(title=self.name, width=width)

    def _repr_html_(self) -> str:
        from ._timeline_plot import figure_html

        return figure_html(self.plot(), alt=self.name)


class _Exclusion:
    """Counts holders per key (thread-safe) to detect two holders at once, and records acquisition order."""

    def __init__(self) -> None:
        import threading

        self._guard = threading.Lock()
        self._holders: dict[str, int] = {}
        self.overlaps = 0
        self.order: dict[str, list[str]] = {}

    def enter(self, key: str, who: str) -> None:
        with self._guard:
            self._holders[key] = self._holders.get(key, 0) + 1
            if self._holders[key] > 1:
                self.overlaps += 1
            self.order.setdefault(key, []).append(who)

    def leave(self, key: str) -> None:
        with self._guard:
            self._holders[key] -= 1

    def lines(self) -> tuple[str, ...]:
        return tuple(f"{key}: {' -> '.join(names)}" for key, names in self.order.items())


async def lock_fifo(*, requests: Sequence[tuple[str, str]] | None = None, hold: float = 0.01) -> LockDemoResult:
    """Several requests on two keys at once: one key's requests run one at a time, in arrival order,
    with direct handoff; the other key's run in parallel with them.

    Args:
        requests: ``(name, key)`` pairs in arrival order; default four on ``"s1"`` and two on ``"s2"``.
        hold: seconds each request holds its key (its simulated work).

    Raises:
        ValueError: a negative ``hold`` or duplicated request names.
    """
    if requests is None:
        requests = [("A", "s1"), ("B", "s1"), ("C", "s2"), ("D", "s1"), ("E", "s2"), ("F", "s1")]
    names = [n for n, _ in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"request names must be distinct, got {names!r}")
    if hold < 0:
        raise ValueError(f"hold must be >= 0 seconds, got {hold!r}")
    timeline = Timeline()
    lock = KeyedLock(observer=timeline.observe_lock)
    seen = _Exclusion()

    async def one(name: str, key: str) -> None:
        async with lock(key, label=name):
            seen.enter(key, name)
            with timeline.span("model", who=name, key=key):
                await asyncio.sleep(hold)
            seen.leave(key)

    await asyncio.gather(*(one(n, k) for n, k in requests))
    return LockDemoResult("FIFO handoff per key", timeline, seen.lines(), seen.overlaps)


async def multi_key_deadlock(*, keyed: bool, patience: float = 0.2) -> LockDemoResult:
    """Two callers each need keys ``a`` and ``b``, asking in opposite orders.

    Naive (``keyed=False``): a dict of ``asyncio.Lock`` taken one key at a time in the caller's order. A
    gate makes sure both hold their first key before asking for the second, so they deadlock on every run.
    ``KeyedLock`` (``keyed=True``) takes ``lock("a", "b")`` and ``lock("b", "a")`` atomically: no deadlock.

    Args:
        keyed: use ``KeyedLock`` instead of the naive dict of locks.
        patience: seconds to let a deadlock prove itself before the stuck callers are cancelled.
    """
    timeline = Timeline()
    gate = InFlight(["caller 1", "caller 2"])
    seen = _Exclusion()
    lock = KeyedLock(observer=timeline.observe_lock)
    lock.add_observer(gate.observe_lock)
    naive = {"a": asyncio.Lock(), "b": asyncio.Lock()}

    async def keyed_caller(name: str, first: str, second: str) -> None:
        async with lock(first, second, label=name):
            seen.enter("a+b", name)
            with timeline.span("model", who=name, key=(first, second)):
                await gate.arrive(name)
                await asyncio.sleep(0.01)
            seen.leave("a+b")

    async def naive_caller(name: str, first: str, second: str) -> None:
        with timeline.span("wait", who=name, key=first):
            await naive[first].acquire()
        try:
            with timeline.span("hold", who=name, key=first):
                await gate.arrive(name)  # both now hold their first key
                with timeline.span("waits for 2nd key", who=name, key=second):
                    await naive[second].acquire()
                try:
                    seen.enter("a+b", name)
                    with timeline.span("model", who=name, key=(first, second)):
                        await asyncio.sleep(0.01)
                    seen.leave("a+b")
                finally:
                    naive[second].release()
        finally:
            naive[first].release()

    caller = keyed_caller if keyed else naive_caller
    tasks = [
        asyncio.create_task(caller("caller 1", "a", "b"), name="caller 1"),
        asyncio.create_task(caller("caller 2", "b", "a"), name="caller 2"),
    ]
    _, pending = await asyncio.wait(tasks, timeout=patience)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if pending:
        for name in ("caller 1", "caller 2"):
            timeline.mark("deadlock", who=name, detail="waits for a key the other caller holds")
    title = "KeyedLock: lock(a, b) and lock(b, a)" if keyed else "dict of asyncio.Lock, one key at a time"
    return LockDemoResult(title, timeline, seen.lines(), seen.overlaps, deadlocked=bool(pending))


async def shared_across_threads(*, rounds: int = 3, hold: float = 0.005) -> LockDemoResult:
    """One ``KeyedLock`` shared by this event loop, another thread's event loop and a plain thread.

    Each caller takes the key ``"shared"`` ``rounds`` times; every acquisition is checked for overlap.
    The other loop and the plain thread are started and joined here, without blocking this loop.

    Raises:
        ValueError: ``rounds < 1`` or a negative ``hold``.
    """
    import threading
    import time

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    if hold < 0:
        raise ValueError(f"hold must be >= 0 seconds, got {hold!r}")
    timeline = Timeline()
    lock = KeyedLock(observer=timeline.observe_lock)
    seen = _Exclusion()

    async def loop_caller(name: str) -> None:
        for _ in range(rounds):
            async with lock("shared", label=name):
                seen.enter("shared", name)
                with timeline.span("write", who=name, key="shared"):
                    await asyncio.sleep(hold)
                seen.leave("shared")
            await asyncio.sleep(0)

    def thread_caller(name: str) -> None:
        for _ in range(rounds):
            with lock.sync("shared", label=name):
                seen.enter("shared", name)
                with timeline.span("write", who=name, key="shared"):
                    time.sleep(hold)  # simulated blocking work in a plain thread
                seen.leave("shared")

    other_loop = threading.Thread(target=lambda: asyncio.run(loop_caller("another event loop")), name="other-loop")
    plain = threading.Thread(target=thread_caller, args=("plain thread",), name="plain-thread")
    other_loop.start()
    plain.start()
    await loop_caller("this event loop")
    await asyncio.to_thread(other_loop.join)
    await asyncio.to_thread(plain.join)
    counts = {name: seen.order["shared"].count(name) for name in dict.fromkeys(seen.order["shared"])}
    order = tuple(f"{name}: {n} acquisitions" for name, n in sorted(counts.items()))
    return LockDemoResult("one lock, three kinds of caller", timeline, order, seen.overlaps)


# ---------------------------------------------------------------------------- the session history race
class _GatedTimeline(Timeline):
    """A timeline that also tells an :class:`InFlight` gate when a request queues for a lock.

    ``SessionManager`` feeds its lock's events to ``timeline.observe_lock``; this lets the experiment count
    a queued turn as in flight without reaching into the manager.
    """

    def __init__(self, gate: InFlight) -> None:
        super().__init__()
        self._gate = gate

    def observe_lock(self, event: LockEvent) -> None:
        super().observe_lock(event)
        self._gate.observe_lock(event)


@dataclass(frozen=True, slots=True)
class SessionRaceResult(RaceResult):
    """A :class:`RaceResult` for the session history race (``SessionManager(locking=...)``).

    Attributes:
        replies: each request's reply, in request order.
        branches: leaves of the session thread's checkpoint tree (1 = one straight history).
    """

    replies: tuple[str, ...] = ()
    branches: int = 0

    def summary(self) -> str:
        lost = self.count("lost message")
        reordered = self.count("reordered message")
        damage = [f"{lost} lost"] if lost else []
        damage += [f"{reordered} reordered"] if reordered else []
        return (
            f"{self.variant}: {len(self.expected) // 2} concurrent messages, {len(self.observed)} of "
            f"{len(self.expected)} history entries kept, "
            + (", ".join(damage) if damage else "nothing lost or reordered")
        )


def _gated_latency(
    gate: InFlight, owner: dict[str, str], latencies: dict[str, float]
) -> Callable[[str], Awaitable[None]]:
    """An ``ExtractiveChatModel`` latency: wait until every request is in flight, then its own latency."""

    async def wait(text: str) -> None:
        who = owner.get(text)
        if who is None:  # a message the experiment did not send (should not happen)
            return
        await gate.arrive(who)
        await asyncio.sleep(latencies[who])

    return lambda text: wait(text)


def _reply_owner(reply: str, questions: Sequence[str]) -> str | None:
    """Which question an ``ExtractiveChatModel`` reply answers (it quotes the question)."""
    for q in questions:
        if f'"{q}"' in reply:
            return q
    return None


async def session_race(
    *,
    locking: bool,
    questions: Sequence[str] = QUESTIONS,
    latency: float = 0.02,
) -> SessionRaceResult:
    """The original plan's scenario: three concurrent ``chat()`` calls on one session.

    Naive (``locking=False``): every turn reads the same history, the model runs, and each turn commits
    on the state it read: the last commit wins and the other turns' messages are lost. Fixed
    (``locking=True``): the session's lock runs the turns one at a time in arrival order and the history is
    ``[user1, assistant1, user2, assistant2, user3, assistant3]``.

    Args:
        locking: run ``SessionManager(locking=True)`` (the fix) instead of ``locking=False``.
        questions: one message per concurrent request (at least 2, distinct).
        latency: seconds; request ``i`` (0-based) answers after ``latency * (len(questions) - i)``.

    Raises:
        ValueError: fewer than two or duplicated questions, or a negative latency.
    """
    from .models import ExtractiveChatModel
    from .sessions import SessionManager

    questions = _check_questions(questions)
    if latency < 0:
        raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
    names = [f"request {i + 1}" for i in range(len(questions))]
    owner = dict(zip(questions, names, strict=True))
    latencies = {n: _latency(i, len(names), latency) for i, n in enumerate(names)}
    gate = InFlight(names)
    timeline = _GatedTimeline(gate)
    model = ExtractiveChatModel(latency=_gated_latency(gate, owner, latencies))
    manager = SessionManager(model=model, locking=locking, timeline=timeline)
    sid = manager.create_session()
    end_of: dict[str, float] = {}

    def request(name: str, question: str) -> Callable[[], Awaitable[Any]]:
        async def send() -> Any:
            result = await manager.chat(sid, question)
            end_of[name] = timeline.now()
            return result

        return send

    timeline.clear()
    outcomes = await _gather_named([(n, request(n, q)) for n, q in zip(names, questions, strict=True)])
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    history = await manager.get_history(sid)
    observed = tuple(
        m.content if m.role == "user" else f"answer to: {_reply_owner(m.content, questions)}" for m in history
    )
    expected = tuple(m for q in questions for m in (q, f"answer to: {q}"))
    who = {m: owner[m.removeprefix("answer to: ")] for m in expected}
    anomalies = find_history_anomalies(expected, observed, who=lambda m: who.get(m, "?"))
    lost_turns = [n for n, q in zip(names, questions, strict=True) if q not in observed]
    _mark_overwrites(timeline, lost_turns, end_of, key=sid, what="lost message")
    _, branches = _checkpoint_tree(manager.checkpointer, {"configurable": {"thread_id": sid}})
    return SessionRaceResult(
        experiment="session history race",
        variant="SessionManager(locking=True)" if locking else "SessionManager(locking=False)",
        fixed=locking,
        timeline=timeline,
        expected=expected,
        observed=observed,
        anomalies=anomalies,
        replies=tuple(getattr(o, "reply", "") for o in outcomes),
        branches=branches,
    )


async def compare_session_race(*, questions: Sequence[str] = QUESTIONS, latency: float = 0.02) -> Comparison:
    """Run :func:`session_race` naive, then fixed."""
    before = await session_race(locking=False, questions=questions, latency=latency)
    after = await session_race(locking=True, questions=questions, latency=latency)
    return Comparison(before, after)


# ------------------------------------------------------------------------------- double texting
@dataclass(frozen=True, slots=True)
class PolicyResult:
    """What one double-texting policy did with a second message sent while the first was being answered.

    Attributes:
        policy: ``"enqueue"``, ``"reject"``, ``"interrupt"``, ``"rollback"``, or ``"no lock"`` (the naive
            service, for contrast).
        outcomes: per message, ``"replied"`` or the exception's class name (``SessionBusy``, ``TurnInterrupted``).
        history: the session's history afterwards, as ``"user: ..."`` / ``"assistant: ..."`` lines.
        expected: the history the policy promises.
        timeline: the two turns, and when the second message arrived.
    """

    policy: str
    outcomes: tuple[str, ...]
    history: tuple[str, ...]
    expected: tuple[str, ...]
    timeline: Timeline = field(repr=False)

    @property
    def ok(self) -> bool:
        """Whether the history is exactly what the policy promises."""
        return self.history == self.expected

    def summary(self) -> str:
        """Deterministic lines: each message's outcome, then the history."""
        lines = [f"{self.policy}: " + ", ".join(f"message {i + 1} {o}" for i, o in enumerate(self.outcomes))]
        lines += [f"    {h}" for h in self.history] or ["    (empty history)"]
        if not self.ok:
            lines.append("    ANOMALY: expected " + " | ".join(self.expected))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class PolicyComparison:
    """All double-texting policies, side by side."""

    results: tuple[PolicyResult, ...]

    def summary(self) -> str:
        """Every policy's summary."""
        return "\n".join(r.summary() for r in self.results)

    def plot(self, *, width: float = 10.0) -> Figure:
        """One timeline per policy, on one time axis."""
        return plot_timelines({r.policy: r.timeline for r in self.results}, width=width)

    def _repr_html_(self) -> str:
        from ._timeline_plot import figure_html

        return figure_html(self.plot(), alt="double-texting policies")


_DOUBLE_TEXT = ("Tell me about locks.", "Actually, tell me about FIFO queues.")


async def double_texting(policy: str, *, latency: float = 0.06) -> PolicyResult:
    """Send message 1, and while its reply is being computed, send message 2 with ``policy``.

    Sequenced by events, not timing: message 2 is sent the moment message 1's model call has started, and
    message 1's model answers only after message 2 has arrived (queued for the lock, been refused, or,
    without a lock, reached the model); then it takes ``latency`` seconds, message 2's model ``latency / 3``.
    ``policy="no lock"`` runs the naive ``SessionManager(locking=False)`` instead, for contrast.

    Raises:
        ValueError: an unknown policy or a negative latency.
    """
    from ._session_types import POLICIES
    from .models import ExtractiveChatModel
    from .sessions import SessionManager

    if policy not in (*POLICIES, "no lock"):
        raise ValueError(f"policy must be one of {(*POLICIES, 'no lock')!r}, got {policy!r}")
    if latency < 0:
        raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
    first, second = _DOUBLE_TEXT
    first_started = asyncio.Event()
    # message 2 is "in flight" once it queued for the lock, was refused, or (no lock) reached the model
    second_arrived = InFlight(["message 2"])

    async def model_latency(text: str) -> None:
        if text == first:
            first_started.set()
            await second_arrived.wait()  # message 1 is still running when message 2 arrives, always
            await asyncio.sleep(latency)
        else:
            second_arrived.mark("message 2")
            await asyncio.sleep(latency / 3)

    timeline = _GatedTimeline(second_arrived)
    locking = policy != "no lock"
    manager = SessionManager(
        model=ExtractiveChatModel(latency=model_latency),
        locking=locking,
        timeline=timeline,
        policy="enqueue",
    )
    sid = manager.create_session()
    end_of: dict[str, float] = {}

    async def send(name: str, text: str, how: str | None) -> Any:
        try:
            return await manager.chat(sid, text, policy=how)  # type: ignore[arg-type]
        except Exception as exc:
            if type(exc).__name__ != "TurnInterrupted":  # the manager marks interruptions itself
                timeline.mark(type(exc).__name__, who=name, key=sid)
                second_arrived.mark(name)  # refused at once (policy "reject"): it did arrive
            raise
        finally:
            end_of[name] = timeline.now()

    timeline.clear()
    one = asyncio.create_task(send("message 1", first, None), name="message 1")
    await first_started.wait()
    timeline.mark("2nd message sent", who="message 2", key=sid)
    two = asyncio.create_task(send("message 2", second, policy if locking else None), name="message 2")
    outcomes = await asyncio.gather(one, two, return_exceptions=True)
    history = await manager.get_history(sid)
    lines = tuple(f"{m.role}: {_short(m.content, (first, second))}" for m in history)
    u1, u2 = f"user: {first}", f"user: {second}"
    a1, a2 = "assistant: reply to message 1", "assistant: reply to message 2"
    expected = {
        "enqueue": (u1, a1, u2, a2),
        "reject": (u1, a1),
        "interrupt": (u1, u2, a2),
        "rollback": (u2, a2),
        "no lock": (u1, a1, u2, a2),  # what the user wanted; the naive service does not deliver it
    }[policy]
    sent = (("message 1", first), ("message 2", second))
    replied = {n for (n, _), o in zip(sent, outcomes, strict=True) if not isinstance(o, BaseException)}
    lost = [n for n, text in sent if n in replied and f"user: {text}" not in lines]
    _mark_overwrites(timeline, lost, end_of, key=sid, what="lost reply")
    return PolicyResult(
        policy=policy,
        outcomes=tuple("replied" if not isinstance(o, BaseException) else type(o).__name__ for o in outcomes),
        history=lines,
        expected=expected,
        timeline=timeline,
    )


def _short(content: str, questions: tuple[str, str]) -> str:
    """A user message as is; a reply as ``reply to message N`` (N = the question it quotes)."""
    if content in questions:
        return content
    owner = _reply_owner(content, questions)
    return f"reply to message {questions.index(owner) + 1}" if owner is not None else content


async def compare_double_texting(*, latency: float = 0.06, include_naive: bool = True) -> PolicyComparison:
    """Run :func:`double_texting` for every policy (and the naive service first, if ``include_naive``)."""
    from ._session_types import POLICIES

    policies = (("no lock",) if include_naive else ()) + tuple(POLICIES)
    return PolicyComparison(tuple([await double_texting(p, latency=latency) for p in policies]))


# ---------------------------------------------------------------------- the vector-store partial read
@dataclass(frozen=True, slots=True)
class StoreRaceResult(RaceResult):
    """A :class:`RaceResult` for searches running while a document is replaced.

    ``expected`` holds the chunk counts of the complete versions (``"v1: 6 chunks"``); ``observed`` one line
    per search, ``"v1: 6"``, ``"v1: 3"``, ``"v1: 2, v2: 1"``, ... (what that search saw of the document).

    Attributes:
        searches: how many searches ran while the writer worked (varies with timing for the copy-on-write
            store, whose embedding runs in a worker thread; deterministic for the naive store).
        versions_seen: which versions of the document (1, 2) the searches saw.
    """

    searches: int = 0
    versions_seen: tuple[int, ...] = ()

    def summary(self) -> str:
        partial = self.count("partial document")
        return (
            f"{self.variant}: "
            + (f"{partial} searches saw a partial document" if partial else "every search saw one complete version")
        )


def _versioned_text(version: int, parts: int) -> str:
    words = ("locks", "queues", "snapshots", "segments", "embeddings", "timelines", "sessions", "checkpoints")
    return "\n\n".join(
        f"Guide version {version}, part {i + 1}: how {words[i % len(words)]} keep a chatbot correct."
        for i in range(parts)
    )


async def store_race(*, cow: bool, parts: int = 6, max_searches: int = 500) -> StoreRaceResult:
    """Replace a document (``guide.md`` v1 -> v2, ``parts`` chunks each) while a reader keeps searching.

    The reader runs one search each time the event loop lets it (``await asyncio.sleep(0)`` between
    searches) until the writer is done, and checks each result set: the document must be there completely,
    in exactly one version. The naive store (``cow=False``) removes and adds chunks one at a time, yielding
    after each, so the reader sees the document shrink and grow: a partial document on every run.
    ``CowVectorStore`` (``cow=True``) embeds in a worker thread and publishes all chunks in one swap.
    Both use :class:`~chatkit.HashEmbeddings`: fast and offline.

    Args:
        cow: use ``CowVectorStore`` (the fix) instead of ``NaiveVectorStore``.
        parts: chunks per version of the document (2 or more).
        max_searches: stop searching after this many (the writer is awaited regardless).

    Raises:
        ValueError: ``parts < 2`` or ``max_searches < 1``.
    """
    from .embeddings import HashEmbeddings

    if parts < 2:
        raise ValueError(f"parts must be >= 2, got {parts!r}")
    if max_searches < 1:
        raise ValueError(f"max_searches must be >= 1, got {max_searches!r}")
    timeline = Timeline()
    embeddings = HashEmbeddings(dim=128)
    store: Any
    if cow:
        from .vectorstore import CowVectorStore

        store = CowVectorStore(embeddings, chunk_size=80, chunk_overlap=0, progress=False, timeline=timeline)
    else:
        from .naive_store import NaiveVectorStore

        store = NaiveVectorStore(embeddings, chunk_size=80, chunk_overlap=0, timeline=timeline)
    await store.add_document("other.md", "Another document that nobody edits.\n\nIt has two parts.")
    first = await store.add_document("guide.md", _versioned_text(1, parts))
    timeline.clear()
    writer_done = asyncio.Event()
    searches: list[tuple[float, dict[int, int]]] = []  # (when, {store version: chunks seen})
    k = 4 * parts + 4
    second: list[Any] = []

    async def writer() -> None:
        try:
            second.append(await store.add_document("guide.md", _versioned_text(2, parts)))
        finally:
            writer_done.set()

    async def reader() -> None:
        while len(searches) < max_searches:
            finished = writer_done.is_set()
            docs = store.similarity_search("guide version part chatbot", k=k)
            by_version: dict[int, int] = {}
            for d in docs:
                if d.metadata.get("source") == "guide.md":
                    v = int(d.metadata.get("version", -1))
                    by_version[v] = by_version.get(v, 0) + 1
            searches.append((timeline.now(), by_version))
            if finished:
                return
            await asyncio.sleep(0)

    outcomes = await _gather_named([("writer", writer), ("reader", reader)])
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    # the document's versions: 1 = as first added, 2 = the replacement (store versions differ)
    chunks = {first.version: first.chunks, second[0].version: second[0].chunks}
    label = {first.version: "v1", second[0].version: "v2"}
    seen: list[str] = []
    anomalies: list[Anomaly] = []
    versions: set[int] = set()
    for n, (when, by_version) in enumerate(searches, start=1):
        line = ", ".join(f"{label.get(v, f'version {v}')}: {c}" for v, c in sorted(by_version.items())) or "missing"
        seen.append(line)
        versions.update(1 if v == first.version else 2 for v in by_version)
        complete = len(by_version) == 1 and all(chunks.get(v) == c for v, c in by_version.items())
        if not complete:
            anomalies.append(Anomaly("partial document", "reader", f"search {n} saw {line} (of {first.chunks} chunks)"))
            timeline.add(TimelineRow("reader", "partial read", when, None, "guide.md", None, line))
    return StoreRaceResult(
        experiment="vector-store partial read",
        variant="CowVectorStore" if cow else "NaiveVectorStore",
        fixed=cow,
        timeline=timeline,
        expected=(f"v1: {first.chunks}", f"v2: {second[0].chunks}"),
        observed=tuple(seen),
        anomalies=tuple(anomalies),
        searches=len(seen),
        versions_seen=tuple(sorted(versions)),
    )


async def compare_store_race(*, parts: int = 6) -> Comparison:
    """Run :func:`store_race` on the naive store, then on ``CowVectorStore``."""
    before = await store_race(cow=False, parts=parts)
    after = await store_race(cow=True, parts=parts)
    return Comparison(before, after)
