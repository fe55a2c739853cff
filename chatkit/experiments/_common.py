"""Shared pieces of the race experiments: result types, the :class:`InFlight` gate, history checks, helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langgraph.checkpoint.memory import InMemorySaver

from ..locks import LockEvent
from ..timeline import _LANE, Timeline, TimelineRow, _who, plot_timelines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Anomaly",
    "RaceResult",
    "Comparison",
    "InFlight",
    "FakeLLM",
    "RecordingSaver",
    "find_history_anomalies",
    "mark_lost_updates",
    "mark_reordered_writes",
    "QUESTIONS",
]


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
        from .._timeline_plot import figure_html

        return figure_html(self.plot(), alt=self.summary())


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
        """Both timelines stacked, each on its own time axis, titled with their summaries."""
        return plot_timelines(
            {
                f"before: {self.before.summary()}": self.before.timeline,
                f"after: {self.after.summary()}": self.after.timeline,
            },
            width=width,
            sharex=False,
        )

    def _repr_html_(self) -> str:
        from .._timeline_plot import figure_html

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


class FakeLLM:
    """A stand-in for a slow LLM, for race demonstrations: it answers after a chosen time, in a certain order.

    ``await llm(history, question)`` thinks for ``seconds[who]`` (``who``: the current timeline lane, else
    the task's name), recording a ``model`` span on ``timeline`` if one is given, and answers with the
    question and how many earlier messages it was shown, as a real model's answer depends on the
    history it is given.

    The order is certain, not a matter of timers: among requests thinking at the same time, one with a
    shorter thinking time always answers first (a request that is done thinking waits for the quicker
    ones still thinking; on a tie, the one listed first in ``seconds`` goes first). One at a time, under
    a lock, nobody waits for anybody.

    Args:
        seconds: thinking time per request name.
        default: thinking time for a name not in ``seconds``.
        timeline: where to record each call's ``model`` span.

    Raises:
        ValueError: a negative or non-finite thinking time.

    Example:
        >>> import asyncio
        >>> llm = FakeLLM(seconds={"A": 0.02, "B": 0.0})
        >>> async def ask(name):
        ...     return await llm([], f"question of {name}", who=name)
        >>> async def main():
        ...     done = []
        ...     for coro in asyncio.as_completed([ask("A"), ask("B")]):
        ...         done.append(await coro)
        ...     return done
        >>> asyncio.run(main())
        ['answer to "question of B" (saw 0 messages)', 'answer to "question of A" (saw 0 messages)']
    """

    def __init__(
        self, *, seconds: Mapping[str, float] | None = None, default: float = 0.0, timeline: Timeline | None = None
    ) -> None:
        chosen = dict(seconds or {})
        for name, value in [*chosen.items(), ("default", default)]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"thinking time for {name!r} must be finite seconds >= 0, got {value!r}")
        self._seconds = chosen
        self._default = float(default)
        self._timeline = timeline
        self._thinking: dict[str, tuple[float, asyncio.Event]] = {}

    def __repr__(self) -> str:
        return f"<FakeLLM seconds={self._seconds} thinking={sorted(self._thinking)}>"

    def _rank(self, name: str, seconds: float) -> tuple[float, int, str]:
        listed = list(self._seconds)
        return (seconds, listed.index(name) if name in listed else len(listed), name)

    async def __call__(self, history: Sequence[Any], question: str, *, who: str | None = None) -> str:
        """The answer to ``question`` given ``history`` (the messages before it)."""
        name = _who(who)
        seconds = self._seconds.get(name, self._default)
        answered = asyncio.Event()
        self._thinking[name] = (seconds, answered)
        me = self._rank(name, seconds)
        span = self._timeline.span("model", who=name) if self._timeline is not None else contextlib.nullcontext()
        try:
            with span:
                await asyncio.sleep(seconds)
                for other, (theirs, done) in list(self._thinking.items()):
                    if other != name and self._rank(other, theirs) < me:
                        await done.wait()  # a quicker request still thinking answers first
        finally:
            answered.set()
            self._thinking.pop(name, None)
        return f'answer to "{question}" (saw {_plural(len(history), "message")})'


class RecordingSaver(InMemorySaver):
    """An ``InMemorySaver`` that marks every read of a thread's latest state and every write on a timeline.

    A read is marked ``read`` with ``saw N messages``; a write ``write`` with ``wrote N messages``
    (``N``: the ``messages`` channel of the checkpoint read or written), in the current lane. Only the
    reads and writes of requests that run in a lane (:func:`chatkit.timeline.lane`) are marked, so
    reading the history once the race is over adds nothing; set ``recording = False`` to stop marking.

    Example:
        >>> import chatkit
        >>> tl = chatkit.Timeline()
        >>> async def main():
        ...     saver = RecordingSaver(tl)
        ...     async with chatkit.SessionManager(checkpointer=saver) as manager:
        ...         sid = await manager.create_session()
        ...         with chatkit.timeline.lane("request 1"):
        ...             await manager.chat(sid, "Hi!")
        >>> chatkit.run(main())
        >>> [(r.who, r.detail) for r in tl.rows() if r.who == "request 1"]
        [('request 1', 'saw 0 messages'), ('request 1', 'wrote 2 messages')]
    """

    def __init__(self, timeline: Timeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeline = timeline
        self.recording = True

    def __repr__(self) -> str:
        return f"<RecordingSaver threads={len(self.storage)} recording={self.recording}>"

    def _marking(self) -> bool:
        return self.recording and _LANE.get() is not None

    @staticmethod
    def _count(checkpoint: Any) -> int:
        messages = (checkpoint or {}).get("channel_values", {}).get("messages") or ()
        return len(messages)

    async def aget_tuple(self, config: Any) -> Any:
        saved = await super().aget_tuple(config)
        if self._marking() and not config.get("configurable", {}).get("checkpoint_id"):
            n = self._count(saved.checkpoint) if saved is not None else 0
            thread = config.get("configurable", {}).get("thread_id")
            self.timeline.mark("read", key=thread, detail=f"saw {_plural(n, 'message')}")
        return saved

    async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        saved = await super().aput(config, checkpoint, metadata, new_versions)
        if self._marking():
            thread = config.get("configurable", {}).get("thread_id")
            self.timeline.mark("write", key=thread, detail=f"wrote {_plural(self._count(checkpoint), 'message')}")
        return saved


def _steps(timeline: Timeline) -> tuple[list[TimelineRow], list[TimelineRow]]:
    rows = timeline.rows()
    return [r for r in rows if r.end is None and r.phase == "read"], [r for r in rows if r.end is None and r.phase == "write"]


def mark_lost_updates(timeline: Timeline, *, what: str = "lost message") -> tuple[str, ...]:
    """Find and mark the updates a later write erased, from a timeline's ``read`` and ``write`` marks.

    Each request (lane) is a read-modify-write: its write stores what it read plus its own update. So a
    write erases every update written after its read, and the state after the last write holds exactly
    the updates that survived. Each lost update is marked ``what`` in its lane, at the write that erased it
    for good, with ``overwritten by <that writer>``.

    Marking twice adds nothing new.

    Returns:
        The lanes whose updates were lost, in the order they were erased.

    Example:
        >>> tl = Timeline()
        >>> for who, phase, t in [("A", "read", 0), ("B", "read", 0), ("B", "write", 1), ("A", "write", 2)]:
        ...     tl.add(TimelineRow(who, phase, t))
        >>> mark_lost_updates(tl)
        ('B',)
        >>> [(r.who, r.phase, r.start, r.detail) for r in tl.rows() if r.phase == "lost message"]
        [('B', 'lost message', 2, 'overwritten by A')]
    """
    reads, writes = _steps(timeline)
    events = sorted([(r.start, 0, r) for r in reads] + [(w.start, 1, w) for w in writes], key=lambda e: (e[0], e[1]))
    state: frozenset[str] = frozenset()
    seen: dict[str, frozenset[str]] = {}
    erased: dict[str, TimelineRow] = {}  # lane -> the write that last dropped its update
    for _, kind, row in events:
        if kind == 0:
            seen.setdefault(row.who, state)
            continue
        new = seen.get(row.who, state) | {row.who}
        for gone in state - new:
            erased[gone] = row
        state = new
    lost = [who for who, _ in sorted(erased.items(), key=lambda item: item[1].start) if who not in state]
    own_key = {w.who: w.key for w in writes}
    for who in lost:
        by = erased[who]
        _add_once(timeline, TimelineRow(who, what, by.start, None, own_key.get(who), None, f"overwritten by {by.who}"))
    return tuple(lost)


def _add_once(timeline: Timeline, row: TimelineRow) -> None:
    """Add ``row`` unless the timeline has it already (so marking twice changes nothing)."""
    if row not in timeline.rows():
        timeline.add(row)


def mark_reordered_writes(timeline: Timeline, *, what: str = "reordered message") -> tuple[str, ...]:
    """Find and mark the writes that landed ahead of requests that arrived before them.

    For appends (``history.extend(...)`` after the await): a request's messages land in the order of the
    writes, not of the arrivals (the first ``read`` of each lane). Each write that lands ahead of earlier
    arrivals is marked ``what`` at that write, with ``ahead of <them>``.

    Returns:
        The lanes whose writes landed out of order, in write order.

    Example:
        >>> tl = Timeline()
        >>> for who, phase, t in [("A", "read", 0), ("B", "read", 0), ("B", "write", 1), ("A", "write", 2)]:
        ...     tl.add(TimelineRow(who, phase, t))
        >>> mark_reordered_writes(tl)
        ('B',)
        >>> [(r.who, r.start, r.detail) for r in tl.rows() if r.phase == "reordered message"]
        [('B', 1, 'ahead of A')]
    """
    reads, writes = _steps(timeline)
    arrival = list(dict.fromkeys(r.who for r in reads))
    written: list[str] = []
    out: list[str] = []
    for w in writes:
        if w.who not in arrival or w.who in written:
            continue
        earlier = arrival[: arrival.index(w.who)]
        behind = [who for who in earlier if who not in written]
        written.append(w.who)
        if behind:
            out.append(w.who)
            _add_once(timeline, TimelineRow(w.who, what, w.start, None, w.key, None, "ahead of " + " and ".join(behind)))
    return tuple(out)


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _latency(index: int, count: int, base: float) -> float:
    """The first request is the slowest: request i (0-based) takes base * (count - i)."""
    return base * (count - index)


async def _gather_named(calls: Sequence[tuple[str, Callable[[], Awaitable[Any]]]]) -> list[Any]:
    """Start each call as a task named after its request, all at once, and gather the outcomes."""
    tasks = [asyncio.create_task(_call(fn), name=name) for name, fn in calls]
    return await asyncio.gather(*tasks, return_exceptions=True)


async def _call(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


# ------------------------------------------------------------------------- shared by several races
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


def _checkpoint_tree(saver: Any, config: dict[str, Any]) -> tuple[int, int]:
    """(number of checkpoints, number of leaves) of one thread's checkpoint tree."""
    ids: set[str] = set()
    parents: set[str] = set()
    for item in saver.list(config):
        ids.add(item.config["configurable"]["checkpoint_id"])
        if item.parent_config is not None:
            parents.add(item.parent_config["configurable"]["checkpoint_id"])
    return len(ids), len(ids - parents)


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


def _reply_owner(reply: str, questions: Sequence[str]) -> str | None:
    """Which question an ``ExtractiveChatModel`` reply answers (it quotes the question)."""
    for q in questions:
        if f'"{q}"' in reply:
            return q
    return None
