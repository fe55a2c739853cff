"""Shared pieces of the race experiments: result types, the :class:`InFlight` gate, history checks, helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..locks import LockEvent
from ..timeline import Timeline, TimelineRow, plot_timelines

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Anomaly",
    "RaceResult",
    "Comparison",
    "InFlight",
    "find_history_anomalies",
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
        """Both timelines stacked on one time axis, titled with their summaries."""
        return plot_timelines(
            {
                f"before: {self.before.summary()}": self.before.timeline,
                f"after: {self.after.summary()}": self.after.timeline,
            },
            width=width,
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


def _mark_overwrites(
    timeline: Timeline, lost: Sequence[str], end_of: dict[str, float], *, key: str = "thread-1", what: str = "lost turn"
) -> None:
    """Mark each lost turn at the moment the next writer saved a state without it."""
    finish_order = sorted(end_of, key=end_of.__getitem__)
    for name in lost:
        later = [n for n in finish_order if end_of[n] > end_of[name]]
        when = end_of[later[0]] if later else end_of[name]
        timeline.add(TimelineRow(name, what, when, None, key, None, f"overwritten by {later[0] if later else '?'}"))


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
