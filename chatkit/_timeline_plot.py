"""Draw :class:`~chatkit.Timeline` rows: a static matplotlib Gantt chart and an interactive plotly one.

One lane per request (``who``), in order of first appearance. Lock phases (``wait``, ``hold``) and
``turn`` are wide, pale background bars; work phases (``model``, ``embed``, ``publish``, ...) are
narrow, strong bars drawn on top, so a model call is seen *inside* the lock hold that protects it.
Instant events are markers: damage (lost, reordered, partial, overwritten, ...) is a red X.

matplotlib and plotly (the ``viz`` extra) are imported on first use only, through
:func:`chatkit._optional.optional_import`. Figures are built with ``matplotlib.figure.Figure`` and an
Agg canvas (:func:`new_figure`), never through ``pyplot``: no global figure registry, no GUI backend,
safe in threads and on headless machines.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._optional import optional_import

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .timeline import TimelineRow

__all__ = [
    "PHASE_COLOURS",
    "DAMAGE_WORDS",
    "is_damage",
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
    "embed": "#9467bd",
    "publish": "#2ca02c",
    "search": "#ff7f0e",
    "read": "#17becf",
    "write": "#8c564b",
    "checkpoint": "#7f7f7f",
}
_BACKGROUND = frozenset({"wait", "hold", "turn"})
_FALLBACK = ("#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a")

# an instant event whose name contains one of these words is drawn as a red X
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


def is_damage(what: str) -> bool:
    """Whether an instant event's name describes damage (drawn as a red X)."""
    low = what.lower()
    return any(word in low for word in DAMAGE_WORDS)


def _colour(phase: str, extra: dict[str, str]) -> str:
    if phase in PHASE_COLOURS:
        return PHASE_COLOURS[phase]
    if phase not in extra:
        extra[phase] = _FALLBACK[len(extra) % len(_FALLBACK)]
    return extra[phase]


def _lanes(rows: Sequence[TimelineRow]) -> list[str]:
    lanes: list[str] = []
    for row in rows:
        if row.who not in lanes:
            lanes.append(row.who)
    return lanes


def _scale(rows: Sequence[TimelineRow]) -> tuple[float, str]:
    """Milliseconds for short timelines, seconds for long ones."""
    last = max((r.end if r.end is not None else r.start for r in rows), default=0.0)
    return (1000.0, "ms") if last < 2.0 else (1.0, "s")


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
) -> Figure:
    """Draw ``rows`` as a Gantt chart on ``ax`` (or on a new figure) and return the figure."""
    if ax is None:
        n_lanes = max(1, len(_lanes(rows)))
        fig = new_figure(figsize=(width, 1.2 + 0.55 * n_lanes), feature="Timeline.plot()")
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    _draw(ax, rows, title=title, legend=legend)
    return fig  # type: ignore[return-value]


def plot_many(
    rows_by_title: Mapping[str, Sequence[TimelineRow]],
    *,
    width: float = 10.0,
    sharex: bool = True,
) -> Figure:
    """One Gantt chart per entry, stacked vertically, sharing the time axis (before/after pictures)."""
    if not rows_by_title:
        raise ValueError("plot_many() needs at least one timeline, got an empty mapping")
    heights = [max(1, len(_lanes(rows))) + 1.2 for rows in rows_by_title.values()]
    fig = new_figure(figsize=(width, 0.5 * sum(heights) + 0.4), feature="plot_timelines()")
    axes = fig.subplots(len(heights), 1, sharex=sharex, squeeze=False, height_ratios=heights)[:, 0]
    for i, (ax, (title, rows)) in enumerate(zip(axes, rows_by_title.items(), strict=True)):
        _draw(ax, rows, title=title, legend=True)
        if sharex and i < len(heights) - 1:
            ax.set_xlabel("")
    return fig


def _draw(ax: Axes, rows: Sequence[TimelineRow], *, title: str | None, legend: bool) -> None:
    Line2D = optional_import("matplotlib.lines", extra="viz", feature="Timeline.plot()").Line2D
    Patch = optional_import("matplotlib.patches", extra="viz", feature="Timeline.plot()").Patch

    lanes = _lanes(rows)
    lane_y = {who: i for i, who in enumerate(lanes)}
    factor, unit = _scale(rows)
    extra: dict[str, str] = {}
    seen_phases: list[str] = []
    seen_marks: dict[str, bool] = {}

    spans = [r for r in rows if r.end is not None]
    # background phases first, then work phases; longer before shorter so short bars stay visible
    spans.sort(key=lambda r: (r.phase not in _BACKGROUND, -r.duration))
    for row in spans:
        y = lane_y[row.who]
        background = row.phase in _BACKGROUND
        height = (0.9 if row.phase == "turn" else 0.72) if background else 0.42
        colour = _colour(row.phase, extra)
        failed = row.outcome not in (None, "ok")
        ax.broken_barh(
            [(row.start * factor, max(row.duration * factor, 1e-9))],
            (y - height / 2, height),
            facecolors=colour,
            edgecolors="#c00000" if failed else "none",
            linewidth=1.5 if failed else 0,
            hatch="//" if row.phase == "wait" else None,
            zorder=1 if background else 2,
        )
        if row.phase not in seen_phases:
            seen_phases.append(row.phase)

    marks = [r for r in rows if r.end is None]
    labels_in_lane: dict[str, int] = {}
    for row in marks:
        y = lane_y[row.who]
        damage = is_damage(row.phase)
        ax.plot(
            [row.start * factor],
            [y],
            marker="X" if damage else "D",
            markersize=11 if damage else 7,
            color="#d62728" if damage else "#333333",
            markeredgecolor="white",
            linestyle="none",
            zorder=3,
        )
        if len(marks) <= 8:  # label each event unless that would clutter the chart
            stacked = labels_in_lane.get(row.who, 0)  # stack labels in a lane so they don't overprint
            labels_in_lane[row.who] = stacked + 1
            ax.annotate(
                row.phase,
                (row.start * factor, y),
                xytext=(4, (7, -14, 16, -23)[stacked % 4]),
                textcoords="offset points",
                fontsize=7,
                color="#d62728" if damage else "#333333",
                zorder=4,
            )
        seen_marks.setdefault(row.phase, damage)

    ax.set_yticks(range(len(lanes)), labels=lanes)
    ax.set_ylim(len(lanes) - 0.5 if lanes else 0.5, -0.5)
    ax.set_xlabel(f"time since start ({unit})")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    if not rows:
        ax.text(0.5, 0.5, "(empty timeline)", ha="center", va="center", transform=ax.transAxes)
    if legend and (seen_phases or seen_marks):
        known = list(PHASE_COLOURS)
        seen_phases.sort(key=lambda p: known.index(p) if p in known else len(known))
        handles: list[Any] = [
            Patch(facecolor=_colour(p, extra), hatch="//" if p == "wait" else None, label=p) for p in seen_phases
        ]
        handles += [
            Line2D(
                [],
                [],
                marker="X" if dmg else "D",
                color="#d62728" if dmg else "#333333",
                linestyle="none",
                label=name,
            )
            for name, dmg in seen_marks.items()
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
                marker={"color": _colour(phase, extra)},
                opacity=0.9,
                hovertext=[_hover(r, factor, unit) for r in spans],
                hoverinfo="text",
            )
        )
    marks = [r for r in rows if r.end is None]
    if marks:
        fig.add_trace(
            go.Scatter(
                name="events",
                mode="markers+text",
                x=[r.start * factor for r in marks],
                y=[r.who for r in marks],
                text=[r.phase for r in marks],
                textposition="top right",
                marker={
                    "symbol": ["x" if is_damage(r.phase) else "diamond" for r in marks],
                    "size": [14 if is_damage(r.phase) else 9 for r in marks],
                    "color": ["#d62728" if is_damage(r.phase) else "#333333" for r in marks],
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
