"""Record what concurrent requests did, and when: spans and instant events on one monotonic clock.

A :class:`Timeline` is fed by :class:`~chatkit.KeyedLock`'s observer hook, by the optional
``timeline=`` instrumentation of :class:`~chatkit.SessionManager` and :class:`~chatkit.CowVectorStore`,
and by your own code: ``timeline.mark("read", detail="saw 2 messages")``, ``with timeline.span("model"):``.

Each row belongs to a *lane* (its ``who``): by default the current asyncio task's name, or the name given
to :func:`lane` for everything recorded in its context, child tasks included (LangGraph runs each node
in a task of its own: ``with lane("request 1"): await graph.ainvoke(...)`` keeps the nodes' rows in the
request's lane).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ._labels import caller_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .locks import LockEvent

__all__ = ["Timeline", "TimelineRow", "lane", "plot_timelines"]

_LANE: contextvars.ContextVar[str | None] = contextvars.ContextVar("chatkit_timeline_lane", default=None)


@contextlib.contextmanager
def lane(who: str) -> Iterator[None]:
    """Record everything in this context (and in tasks started from it) in the lane ``who``.

    Spans and marks given an explicit ``who=`` keep it; the others, recorded by any :class:`Timeline`
    while the context is active, go to this lane instead of the current task's name.

    Raises:
        TypeError: ``who`` is not a non-empty string.

    Example:
        >>> import asyncio
        >>> tl = Timeline()
        >>> async def node():  # e.g. a LangGraph node, which runs in a task of its own
        ...     tl.mark("read", detail="saw 0 messages")
        >>> async def request():
        ...     with lane("request 1"):
        ...         await asyncio.create_task(node())
        >>> asyncio.run(request())
        >>> [(r.who, r.phase) for r in tl.rows()]
        [('request 1', 'read')]
    """
    if not isinstance(who, str) or not who:
        raise TypeError(f"lane() needs a non-empty string, got {who!r}")
    token = _LANE.set(who)
    try:
        yield
    finally:
        _LANE.reset(token)


def _who(who: str | None) -> str:
    if who is not None:
        return who
    current = _LANE.get()
    return current if current is not None else caller_label()


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """One recorded span (``end`` set) or instant event (``end is None``).

    Attributes:
        who: the request (task or thread label) the row belongs to.
        phase: what it was doing: ``"wait"``, ``"hold"``, ``"model"``, ``"embed"``, ``"publish"``,
            ``"search"``, ... or, for instant events, what happened (``"lost"``, ``"partial read"``).
        start: monotonic seconds, relative to the timeline's origin.
        end: for spans, when it ended; ``None`` for instant events.
        key: the lock key, session id or document source involved, if any.
        outcome: ``"ok"``, ``"error"``, ``"cancelled"``, ``"timeout"``, ... or ``None``.
        detail: free text shown in tooltips.
    """

    who: str
    phase: str
    start: float
    end: float | None = None
    key: Hashable | None = None
    outcome: str | None = None
    detail: str | None = None

    @property
    def duration(self) -> float:
        """Seconds the span lasted (0 for instant events)."""
        return 0.0 if self.end is None else self.end - self.start


class Timeline:
    """A thread-safe recorder of spans and instant events.

    Example:
        >>> import asyncio, chatkit
        >>> tl = chatkit.Timeline()
        >>> lock = chatkit.KeyedLock(observer=tl.observe_lock)
        >>> async def request(name):
        ...     async with lock("s1", label=name):
        ...         with tl.span("model", who=name, key="s1"):
        ...             await asyncio.sleep(0)
        >>> async def main():
        ...     await asyncio.gather(request("A"), request("B"))
        >>> asyncio.run(main())
        >>> [(r.who, r.phase) for r in tl.rows() if r.phase in ("hold", "model")]
        [('A', 'hold'), ('A', 'model'), ('B', 'hold'), ('B', 'model')]
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._origin = clock()
        self._rows: list[TimelineRow] = []
        self._guard = threading.Lock()
        # lock observer bookkeeping: (label, keys) -> time the wait or hold began
        self._open: dict[tuple[str, tuple[Hashable, ...], str], float] = {}
        self._styles: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"<Timeline rows={len(self._rows)}>"

    def __len__(self) -> int:
        return len(self._rows)

    def now(self) -> float:
        """Seconds since this timeline was created, on its clock."""
        return self._clock() - self._origin

    def clear(self) -> None:
        """Forget every row and restart the clock's origin."""
        with self._guard:
            self._rows.clear()
            self._open.clear()
            self._origin = self._clock()

    def add(self, row: TimelineRow) -> None:
        """Append a ready-made row."""
        with self._guard:
            self._rows.append(row)

    @contextlib.contextmanager
    def span(
        self,
        phase: str,
        *,
        who: str | None = None,
        key: Hashable | None = None,
        detail: str | None = None,
    ) -> Iterator[None]:
        """Record the enclosed block as a span; its outcome is ``ok``, ``error`` or ``cancelled``.

        ``who`` defaults to the current :func:`lane`, else the current task's (or thread's) name.
        """
        who = _who(who)
        start = self.now()
        outcome = "ok"
        try:
            yield
        except BaseException as exc:
            outcome = "cancelled" if isinstance(exc, (GeneratorExit, asyncio.CancelledError)) else "error"
            raise
        finally:
            self.add(TimelineRow(who, phase, start, self.now(), key, outcome, detail))

    def mark(
        self,
        what: str,
        *,
        who: str | None = None,
        key: Hashable | None = None,
        outcome: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Record an instant event, such as the moment a message is lost.

        ``what`` is the kind of event (one marker shape per kind in the charts: ``"read"`` and ``"write"``
        for the steps of a read-modify-write, a damage word such as ``"lost"`` for damage, drawn in red);
        ``detail`` is the label printed next to the marker (say what was read, written, or what caused
        the damage: ``"saw 2 messages"``, ``"overwritten by request 2"``). ``who`` defaults to the
        current :func:`lane`, else the current task's (or thread's) name.
        """
        who = _who(who)
        self.add(TimelineRow(who, what, self.now(), None, key, outcome, detail))

    def observe_lock(self, event: LockEvent) -> None:
        """A :class:`~chatkit.KeyedLock` observer: turns lock events into ``wait`` and ``hold`` spans."""
        t = event.time - self._origin
        ident = (event.label, event.keys)
        key = event.keys[0] if len(event.keys) == 1 else event.keys
        kind = event.kind
        with self._guard:
            if kind == "requested":
                self._open[(*ident, "wait")] = t
            elif kind == "acquired":
                start = self._open.pop((*ident, "wait"), t)
                self._rows.append(TimelineRow(event.label, "wait", start, t, key, "ok"))
                self._open[(*ident, "hold")] = t
            elif kind == "released":
                start = self._open.pop((*ident, "hold"), t)
                self._rows.append(TimelineRow(event.label, "hold", start, t, key, "ok"))
            else:  # timed_out, cancelled, rejected
                start = self._open.pop((*ident, "wait"), t)
                self._rows.append(TimelineRow(event.label, "wait", start, t, key, kind))

    def style(
        self,
        phase: str,
        *,
        colour: str | None = None,
        background: bool | None = None,
        label: str | None = None,
    ) -> None:
        """Choose how this timeline's charts draw spans of ``phase``.

        Args:
            phase: the span phase to style.
            colour: any matplotlib colour (default: the phase's usual colour, or one from a palette).
            background: draw it as a wide pale bar (like ``hold``) instead of a narrow work bar.
            label: its legend entry (default: the phase).

        Raises:
            TypeError: ``phase`` is not a string.

        Example:
            >>> tl = Timeline()
            >>> tl.style("search v2", colour="#2ca02c", label="search that saw version 2")
            >>> tl.styles()["search v2"]["label"]
            'search that saw version 2'
        """
        if not isinstance(phase, str):
            raise TypeError(f"phase must be a string, got {phase!r}")
        given = {"colour": colour, "background": background, "label": label}
        with self._guard:
            self._styles[phase] = {k: v for k, v in given.items() if v is not None}

    def styles(self) -> dict[str, dict[str, Any]]:
        """The styles chosen with :meth:`style`, by phase."""
        with self._guard:
            return {p: dict(s) for p, s in self._styles.items()}

    def rows(self) -> list[TimelineRow]:
        """The rows recorded so far, ordered by start time."""
        with self._guard:
            return sorted(self._rows, key=lambda r: (r.start, r.end is None, r.end or 0.0))

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (for pandas, JSON, or a Gradio table)."""
        return [asdict(r) for r in self.rows()]

    # ------------------------------------------------------------------ rendering
    def plot(
        self,
        *,
        ax: Axes | None = None,
        title: str | None = None,
        width: float = 10.0,
        legend: bool = True,
    ) -> Figure:
        """Draw a static Gantt chart: one lane per request (named with its keys), one colour per phase.

        Lock phases (``wait``, hatched grey; ``hold``, pale green) are wide background bars; work
        phases (``model``, ``embed``, ``publish``, ``search``, ...) are narrow bars on top; failed or
        cancelled work has a red outline. Instant events are markers, one shape per kind, labelled
        with their ``detail`` in the gaps between lanes (damage, such as lost, reordered, partial, is
        red). matplotlib is imported here, and the figure uses an Agg canvas, never ``pyplot``.

        Args:
            ax: draw into this matplotlib ``Axes`` instead of a new figure.
            title: shown above the chart.
            width: figure width in inches (new figures only); the height follows the lane count.
            legend: whether to draw the legend.

        Returns:
            The ``matplotlib.figure.Figure`` drawn on.

        Example:
            >>> tl = Timeline()
            >>> with tl.span("model", who="A"):
            ...     pass
            >>> tl.mark("lost", who="A", detail="user message 2")
            >>> fig = tl.plot(title="one request")
            >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
            ['A']
        """
        from ._timeline_plot import plot_rows

        return plot_rows(self.rows(), ax=ax, title=title, width=width, legend=legend, styles=self.styles())

    def plot_interactive(self, *, title: str | None = None) -> Any:
        """The same chart as an interactive ``plotly.graph_objects.Figure`` (hover for details).

        Example:
            >>> tl = Timeline()
            >>> tl.add(TimelineRow("A", "model", 0.0, 0.05, key="s1"))
            >>> fig = tl.plot_interactive()
            >>> [trace.name for trace in fig.data]
            ['model']
        """
        from ._timeline_plot import plot_rows_interactive

        return plot_rows_interactive(self.rows(), title=title)

    def _repr_html_(self) -> str:
        """Jupyter shows a timeline as its static chart, embedded as a base64 PNG (no JavaScript)."""
        from ._timeline_plot import figure_html

        return figure_html(self.plot(), alt=repr(self))


def plot_timelines(timelines: Mapping[str, Timeline], *, width: float = 10.0, sharex: bool = True) -> Figure:
    """Stack several timelines in one figure: before/after, policy by policy.

    With ``sharex`` (the default) they share one time axis; ``sharex=False`` gives each its own axis,
    scaled to its own rows (readable when one run is much shorter than another).

    Raises:
        ValueError: ``timelines`` is empty.
        TypeError: a value is not a :class:`Timeline`.

    Example:
        >>> before, after = Timeline(), Timeline()
        >>> before.add(TimelineRow("A", "model", 0.0, 0.05))
        >>> after.add(TimelineRow("A", "hold", 0.0, 0.05))
        >>> fig = plot_timelines({"before": before, "after": after})
        >>> [ax.get_title(loc="left") for ax in fig.axes]
        ['before', 'after']
    """
    from ._timeline_plot import plot_many

    for name, tl in timelines.items():
        if not isinstance(tl, Timeline):
            raise TypeError(f"plot_timelines() wants Timeline values, got {type(tl).__name__} for {name!r}")
    return plot_many(
        {name: tl.rows() for name, tl in timelines.items()},
        width=width,
        sharex=sharex,
        styles={name: tl.styles() for name, tl in timelines.items()},
    )
