"""Draw :class:`~chatkit.Timeline` rows: a static matplotlib Gantt chart and an interactive plotly one.

One lane per request (``who``), in order of first appearance; under its name, the lane names the keys it
used (``key s1``; ``holds a · waits for b`` for a lane that held one key and never got another). Lock
phases (``wait``, ``hold``) and ``turn`` are wide, pale background bars; work phases (``model``,
``embed``, ``publish``, ``work``, ...) are narrow, strong bars drawn on top, so a model call is seen
*inside* the lock hold that protects it. A background bar nested in another one of its lane (a wait for a
second key while holding the first) is drawn narrow too. Failed work (cancelled, error, timed out) gets a
red outline, with a legend entry per outcome.

Instant events are markers, one shape per kind of event, each with a legend entry: ``read`` (diamond)
and ``write`` (square) carry what they saw or wrote in their label; damage (lost, reordered, partial,
overwritten, deadlock, ...) is red; every marker's label (its ``detail``, else its kind) is printed in
the gap above or below its lane, never over the bars, and placed so that labels do not overlap.

Spans too short to see are handled so the picture does not lie: a ``wait`` shorter than 0.4% of the
axis is not drawn (nobody waited) and gets no legend entry; any other short span is drawn 0.4% wide.

matplotlib and plotly (the ``viz`` extra) are imported on first use only, through
:func:`chatkit._optional.optional_import`. Figures are built with ``matplotlib.figure.Figure`` and an
Agg canvas (:func:`new_figure`), never through ``pyplot``: no global figure registry, no GUI backend,
safe in threads and on headless machines.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._optional import optional_import

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .timeline import TimelineRow

__all__ = [
    "PHASE_COLOURS",
    "EVENT_STYLES",
    "DAMAGE_WORDS",
    "is_damage",
    "lane_label",
    "new_figure",
    "plot_rows",
    "plot_many",
    "plot_rows_interactive",
    "figure_png",
    "figure_html",
]

# phase -> colour. Background phases are pale; work phases are strong.
PHASE_COLOURS: dict[str, str] = {
    "wait": "#d9d9d9",
    "hold": "#b7e4c7",
    "turn": "#cfe2f3",
    "model": "#1f77b4",
    "tool": "#17becf",
    "work": "#3a7d44",
    "embed": "#9467bd",
    "publish": "#2ca02c",
    "search": "#ff7f0e",
    "read": "#17becf",
    "write": "#8c564b",
    "checkpoint": "#7f7f7f",
}
_BACKGROUND = frozenset({"wait", "hold", "turn"})
_LOCK_PHASES = frozenset({"wait", "hold"})
_FALLBACK = ("#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a")

_DARK = "#333333"
_RED = "#d62728"
_OUTLINE = "#c00000"

#: event kind -> (matplotlib marker, colour) for the kinds every experiment uses; other kinds get a
#: shape of their own from a cycle (damage in red, the rest dark), so no two kinds in a chart look alike.
EVENT_STYLES: dict[str, tuple[str, str]] = {
    "read": ("D", _DARK),
    "write": ("s", _DARK),
    "sent": (">", _DARK),
    "interrupted": ("*", "#7b3294"),
}
_OTHER_MARKERS = ("^", "v", "P", "p", "h", "<", "d", "8")
_DAMAGE_MARKERS = ("X", "x", "1", "+")
_PLOTLY_SYMBOLS = {
    "D": "diamond", "s": "square", ">": "triangle-right", "<": "triangle-left", "^": "triangle-up",
    "v": "triangle-down", "*": "star", "X": "x", "P": "cross", "p": "pentagon", "h": "hexagon", "d": "diamond-tall",
    "8": "octagon", "x": "x-thin-open", "1": "y-down-open", "+": "cross-thin-open",
}

# an instant event whose name contains one of these words is drawn as damage (red)
DAMAGE_WORDS: tuple[str, ...] = (
    "lost",
    "loss",
    "reorder",
    "partial",
    "overwrit",
    "damage",
    "conflict",
    "dropped",
    "stale",
    "deadlock",
    "error",
)

_MIN_VISIBLE = 0.004  # of the axis: narrower spans are widened (or, for waits, not drawn)
_FAILED_LABELS = {"cancelled": "cancelled (red outline)", "error": "failed (red outline)",
                  "timed_out": "timed out (red outline)", "timeout": "timed out (red outline)",
                  "rejected": "rejected (red outline)"}

# lane geometry, in data units (one lane = 1.0): bar heights and where marker labels go
_HEIGHT = {"turn": 0.56, "hold": 0.44, "wait": 0.44}
_WORK_HEIGHT = 0.24
_LABEL_GAP = 0.31  # marker labels: this far above or below the lane's centre
_LANE_INCHES = 0.72  # figure height per lane
_LABEL_POINTS = 7.0


def is_damage(what: str) -> bool:
    """Whether an instant event's name describes damage (drawn in red)."""
    low = what.lower()
    return any(word in low for word in DAMAGE_WORDS)


def _colour(phase: str, extra: dict[str, str], styles: Mapping[str, Mapping[str, Any]]) -> str:
    given = styles.get(phase, {}).get("colour")
    if given:
        return str(given)
    if phase in PHASE_COLOURS:
        return PHASE_COLOURS[phase]
    if phase not in extra:
        extra[phase] = _FALLBACK[len(extra) % len(_FALLBACK)]
    return extra[phase]


def _is_background(phase: str, styles: Mapping[str, Mapping[str, Any]]) -> bool:
    given = styles.get(phase, {}).get("background")
    return bool(given) if given is not None else phase in _BACKGROUND


def _lanes(rows: Sequence[TimelineRow]) -> list[str]:
    lanes: list[str] = []
    for row in rows:
        if row.who not in lanes:
            lanes.append(row.who)
    return lanes


def _short(key: Hashable, width: int = 12) -> str:
    text = str(key)
    return text if len(text) <= width else text[: width - 1] + "…"


def _flat(key: Hashable) -> list[Hashable]:
    return list(key) if isinstance(key, tuple) else [key]


def lane_label(who: str, rows: Sequence[TimelineRow]) -> str:
    """A lane's tick label: its name, then the keys its rows used.

    ``key s1`` for one key, ``keys a, b`` for several, and ``holds a · waits for b`` when the lane held
    some keys and waited for others without ever getting them (a deadlock).

    Example:
        >>> from chatkit.timeline import TimelineRow
        >>> lane_label("A", [TimelineRow("A", "hold", 0, 1, "a"), TimelineRow("A", "wait", 0, 1, "b", "cancelled")])
        'A\\nholds a · waits for b'
    """
    mine = [r for r in rows if r.who == who]
    keys: list[Hashable] = []
    for r in mine:
        if r.key is not None:
            for k in _flat(r.key):
                if k not in keys:
                    keys.append(k)
    if not keys:
        return who
    held = [k for r in mine if r.phase == "hold" and r.key is not None for k in _flat(r.key)]
    never = [
        k
        for r in mine
        if r.phase == "wait" and r.end is not None and r.outcome not in (None, "ok") and r.key is not None
        for k in _flat(r.key)
        if k not in held
    ]
    if held and never:
        held_text = ", ".join(_short(k) for k in dict.fromkeys(held))
        never_text = ", ".join(_short(k) for k in dict.fromkeys(never))
        return f"{who}\nholds {held_text} · waits for {never_text}"
    if len(keys) == 1:
        return f"{who}\nkey {_short(keys[0])}"
    return f"{who}\nkeys " + ", ".join(_short(k) for k in keys)


def _scale(rows: Sequence[TimelineRow]) -> tuple[float, str]:
    """Milliseconds for short timelines, seconds for long ones."""
    last = max((r.end if r.end is not None else r.start for r in rows), default=0.0)
    return (1000.0, "ms") if last < 2.0 else (1.0, "s")


def _xlim(rows: Sequence[TimelineRow], factor: float) -> tuple[float, float]:
    if not rows:
        return (0.0, 1.0)
    lo = min(r.start for r in rows) * factor
    hi = max((r.end if r.end is not None else r.start) for r in rows) * factor
    lo = min(lo, 0.0)
    span = hi - lo or 1.0
    return (lo - 0.02 * span, hi + 0.04 * span)


@dataclass(frozen=True, slots=True)
class _MarkStyle:
    marker: str
    colour: str
    damage: bool


def _mark_styles(kinds: Sequence[str]) -> dict[str, _MarkStyle]:
    """One style per event kind, with a shape no other kind of the chart has."""
    out: dict[str, _MarkStyle] = {}
    used: set[str] = set()
    for kind in kinds:  # the fixed styles first, so the others never take their shapes
        if kind in EVENT_STYLES and not is_damage(kind):
            marker, colour = EVENT_STYLES[kind]
            out[kind] = _MarkStyle(marker, colour, False)
            used.add(marker)
    for kind in kinds:
        if kind in out:
            continue
        damage = is_damage(kind)
        pool = _DAMAGE_MARKERS if damage else _OTHER_MARKERS
        marker = next((m for m in pool if m not in used), pool[0])
        used.add(marker)
        out[kind] = _MarkStyle(marker, _RED if damage else _DARK, damage)
    return out


def new_figure(*, figsize: tuple[float, float], feature: str) -> Figure:
    """A matplotlib ``Figure`` (constrained layout) on its own Agg canvas, without ``pyplot``.

    Raises:
        ModuleNotFoundError: matplotlib is missing; the message names ``feature`` and ``chatkit[viz]``.
    """
    figure = optional_import("matplotlib.figure", extra="viz", feature=feature)
    agg = optional_import("matplotlib.backends.backend_agg", extra="viz", feature=feature)
    fig = figure.Figure(figsize=figsize, layout="constrained")
    agg.FigureCanvasAgg(fig)
    return fig  # type: ignore[no-any-return]


def plot_rows(
    rows: Sequence[TimelineRow],
    *,
    ax: Axes | None = None,
    title: str | None = None,
    width: float = 10.0,
    legend: bool = True,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> Figure:
    """Draw ``rows`` as a Gantt chart on ``ax`` (or on a new figure) and return the figure."""
    if ax is None:
        n_lanes = max(1, len(_lanes(rows)))
        fig = new_figure(figsize=(width, 1.3 + _LANE_INCHES * n_lanes), feature="Timeline.plot()")
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    _draw(ax, rows, title=title, legend=legend, styles=styles or {}, width=fig.get_figwidth())
    return fig  # type: ignore[return-value]


def plot_many(
    rows_by_title: Mapping[str, Sequence[TimelineRow]],
    *,
    width: float = 10.0,
    sharex: bool = True,
    styles: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> Figure:
    """One Gantt chart per entry, stacked vertically (before/after pictures).

    With ``sharex`` the charts share one time axis (only the bottom one is labelled); without it each
    chart gets its own axis, scaled to its own rows.
    """
    if not rows_by_title:
        raise ValueError("plot_many() needs at least one timeline, got an empty mapping")
    lanes = [max(1, len(_lanes(rows))) for rows in rows_by_title.values()]
    extra = 0.75 if sharex else 1.15  # title (and, on its own axis, tick labels and the axis label)
    heights = [_LANE_INCHES * n + extra for n in lanes]
    fig = new_figure(figsize=(width, sum(heights) + 0.5), feature="plot_timelines()")
    axes = fig.subplots(len(heights), 1, sharex=sharex, squeeze=False, height_ratios=heights)[:, 0]
    for i, (ax, (title, rows)) in enumerate(zip(axes, rows_by_title.items(), strict=True)):
        _draw(ax, rows, title=title, legend=True, styles=(styles or {}).get(title, {}), width=width)
        if sharex and i < len(heights) - 1:
            ax.set_xlabel("")
    if sharex:
        # one axis for all: the widest range
        all_rows = [r for rows in rows_by_title.values() for r in rows]
        factor, _ = _scale(all_rows)
        axes[0].set_xlim(*_xlim(all_rows, factor))
    return fig


def _text_points(text: str, size: float = _LABEL_POINTS) -> float:
    """Rough width of ``text`` in points (DejaVu Sans averages ~0.56 em per character)."""
    return 0.56 * size * len(text)


def _draw(
    ax: Axes,
    rows: Sequence[TimelineRow],
    *,
    title: str | None,
    legend: bool,
    styles: Mapping[str, Mapping[str, Any]],
    width: float,
) -> None:
    Line2D = optional_import("matplotlib.lines", extra="viz", feature="Timeline.plot()").Line2D
    Patch = optional_import("matplotlib.patches", extra="viz", feature="Timeline.plot()").Patch

    lanes = _lanes(rows)
    lane_y = {who: i for i, who in enumerate(lanes)}
    factor, unit = _scale(rows)
    lo, hi = _xlim(rows, factor)
    min_width = _MIN_VISIBLE * (hi - lo)
    extra: dict[str, str] = {}
    drawn_phases: list[str] = []
    failed_outcomes: list[str] = []

    spans = [r for r in rows if r.end is not None]
    background = [r for r in spans if _is_background(r.phase, styles)]
    # background phases first, then work phases; longer before shorter so short bars stay visible
    spans.sort(key=lambda r: (not _is_background(r.phase, styles), -r.duration))
    for row in spans:
        y = lane_y[row.who]
        is_bg = _is_background(row.phase, styles)
        width_data = row.duration * factor
        if width_data < min_width:
            if row.phase == "wait" and row.outcome in (None, "ok"):
                continue  # nobody really waited: no bar, no legend entry
            width_data = min_width
        if is_bg:
            nested = row.phase in _LOCK_PHASES and any(
                o is not row and o.who == row.who and o.phase in _LOCK_PHASES and o.duration > row.duration
                and o.start <= row.start and (o.end or 0) >= (row.end or 0)
                for o in background
            )
            height = _WORK_HEIGHT if nested else _HEIGHT.get(row.phase, _HEIGHT["turn"])
        else:
            height = _WORK_HEIGHT
        colour = _colour(row.phase, extra, styles)
        failed = row.outcome not in (None, "ok")
        ax.broken_barh(
            [(row.start * factor, max(width_data, 1e-9))],
            (y - height / 2, height),
            facecolors=colour,
            edgecolors=_OUTLINE if failed else "none",
            linewidth=1.6 if failed else 0,
            hatch="//" if row.phase == "wait" else None,
            zorder=(1.5 if height == _WORK_HEIGHT else 1) if is_bg else 2,
        )
        if row.phase not in drawn_phases:
            drawn_phases.append(row.phase)
        if failed and row.outcome not in failed_outcomes:
            failed_outcomes.append(str(row.outcome))

    marks = sorted((r for r in rows if r.end is None), key=lambda r: r.start)
    kinds = list(dict.fromkeys(r.phase for r in marks))
    mark_style = _mark_styles(kinds)
    # how many points one data unit spans along x (the axes take ~70% of the figure's width)
    axis_points = 72.0 * width * 0.70
    per_unit = axis_points / (hi - lo) if hi > lo else 1.0
    taken: dict[tuple[int, int], list[tuple[float, float]]] = {}  # (lane, -1 above / +1 below) -> intervals
    for row in marks:
        y = lane_y[row.who]
        st = mark_style[row.phase]
        x = row.start * factor
        ax.plot(
            [x],
            [y],
            marker=st.marker,
            markersize=10 if st.damage or st.marker == "*" else 7.5,
            color=st.colour,
            markeredgecolor="white",
            markeredgewidth=0.8,
            linestyle="none",
            zorder=4 if st.damage else 4.5,  # a read or write drawn over a damage mark at the same moment
        )
        text = row.detail or row.phase
        right_side = (x - lo) > 0.68 * (hi - lo)  # near the right edge: the label ends at the marker
        w = _text_points(text) + 8
        x_pts = (x - lo) * per_unit
        interval = (x_pts - w, x_pts + 2) if right_side else (x_pts - 2, x_pts + w)
        place = None
        for side in (-1, 1):
            used = taken.setdefault((y, side), [])
            if all(interval[1] <= a or interval[0] >= b for a, b in used):
                place = side
                break
        if place is None:  # both rows are busy here: no label (the marker and the legend still say what it is)
            continue
        taken[(y, place)].append(interval)
        ax.annotate(
            text,
            (x, y + place * _LABEL_GAP),
            xytext=(-3 if right_side else 3, 0),
            textcoords="offset points",
            ha="right" if right_side else "left",
            va="bottom" if place < 0 else "top",
            fontsize=_LABEL_POINTS,
            color=st.colour,
            zorder=5,
            annotation_clip=False,
        )

    ax.set_yticks(range(len(lanes)), labels=[lane_label(w, rows) for w in lanes], fontsize=9)
    ax.set_ylim(len(lanes) - 0.5 if lanes else 0.5, -0.5)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"time since start ({unit})")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    if not rows:
        ax.text(0.5, 0.5, "(empty timeline)", ha="center", va="center", transform=ax.transAxes)
    if legend and (drawn_phases or kinds):
        known = list(PHASE_COLOURS) + [p for p in styles if p not in PHASE_COLOURS]
        first_seen = {p: i for i, p in enumerate(dict.fromkeys(r.phase for r in sorted(spans, key=lambda r: r.start)))}
        drawn_phases.sort(key=lambda p: (known.index(p) if p in known else len(known), first_seen.get(p, 0)))
        handles: list[Any] = [
            Patch(facecolor=_colour(p, extra, styles), hatch="//" if p == "wait" else None,
                  label=str(styles.get(p, {}).get("label") or p))
            for p in drawn_phases
        ]
        handles += [
            Patch(facecolor="white", edgecolor=_OUTLINE, linewidth=1.6, label=_FAILED_LABELS.get(o, f"{o} (red outline)"))
            for o in failed_outcomes
        ]
        handles += [
            Line2D([], [], marker=mark_style[k].marker, color=mark_style[k].colour, linestyle="none", label=k)
            for k in kinds
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


def plot_rows_interactive(rows: Sequence[TimelineRow], *, title: str | None = None) -> Any:
    """The same chart as a ``plotly.graph_objects.Figure`` (hover shows key, outcome, detail)."""
    go = optional_import("plotly.graph_objects", extra="viz", feature="Timeline.plot_interactive()")

    lanes = _lanes(rows)
    factor, unit = _scale(rows)
    extra: dict[str, str] = {}
    fig = go.Figure()
    by_phase: dict[str, list[TimelineRow]] = {}
    for row in rows:
        if row.end is not None:
            by_phase.setdefault(row.phase, []).append(row)
    order = sorted(by_phase, key=lambda p: p not in _BACKGROUND)
    for phase in order:
        spans = by_phase[phase]
        background = phase in _BACKGROUND
        fig.add_trace(
            go.Bar(
                name=phase,
                orientation="h",
                y=[r.who for r in spans],
                x=[r.duration * factor for r in spans],
                base=[r.start * factor for r in spans],
                width=(0.9 if phase == "turn" else 0.72) if background else 0.42,
                marker={
                    "color": _colour(phase, extra, {}),
                    "line": {
                        "color": [_OUTLINE if r.outcome not in (None, "ok") else "rgba(0,0,0,0)" for r in spans],
                        "width": 2,
                    },
                },
                opacity=0.9,
                hovertext=[_hover(r, factor, unit) for r in spans],
                hoverinfo="text",
            )
        )
    marks = [r for r in rows if r.end is None]
    if marks:
        style = _mark_styles(list(dict.fromkeys(r.phase for r in marks)))
        fig.add_trace(
            go.Scatter(
                name="events",
                mode="markers+text",
                x=[r.start * factor for r in marks],
                y=[r.who for r in marks],
                text=[r.phase for r in marks],
                textposition="top right",
                marker={
                    "symbol": [_PLOTLY_SYMBOLS.get(style[r.phase].marker, "circle") for r in marks],
                    "size": [14 if style[r.phase].damage else 9 for r in marks],
                    "color": [style[r.phase].colour for r in marks],
                },
                hovertext=[_hover(r, factor, unit) for r in marks],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        barmode="overlay",
        title=title,
        xaxis_title=f"time since start ({unit})",
        yaxis={"categoryorder": "array", "categoryarray": lanes, "autorange": "reversed"},
        height=160 + 45 * max(1, len(lanes)),
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        legend={"orientation": "h"},
    )
    return fig


def _hover(row: TimelineRow, factor: float, unit: str) -> str:
    parts = [f"{row.who}: {row.phase}", f"start {row.start * factor:.1f} {unit}"]
    if row.end is not None:
        parts.append(f"lasted {row.duration * factor:.1f} {unit}")
    if row.key is not None:
        parts.append(f"key {row.key!r}")
    if row.outcome is not None:
        parts.append(f"outcome {row.outcome}")
    if row.detail:
        parts.append(row.detail)
    return "<br>".join(parts)


def figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (no timestamp metadata, so equal drawings give equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def figure_html(fig: Figure, *, alt: str = "timeline", dpi: int = 100) -> str:
    """An ``<img>`` tag embedding the figure as a base64 PNG: no JavaScript, renders anywhere."""
    data = base64.b64encode(figure_png(fig, dpi=dpi)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'
