"""chatkit.Timeline: recording (spans, marks, the lock observer) and both renderers."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys

import pytest

import chatkit
from chatkit.timeline import Timeline, TimelineRow, plot_timelines


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sample() -> Timeline:
    tl = Timeline()
    tl.add(TimelineRow("A", "wait", 0.000, 0.001, "s1", "ok"))
    tl.add(TimelineRow("A", "hold", 0.001, 0.060, "s1", "ok"))
    tl.add(TimelineRow("A", "model", 0.002, 0.050, "s1", "ok"))
    tl.add(TimelineRow("B", "wait", 0.000, 0.060, "s1", "ok"))
    tl.add(TimelineRow("B", "model", 0.061, 0.090, "s1", "error"))
    tl.add(TimelineRow("B", "lost", 0.090, None, "s1", None, "user message 2"))
    tl.add(TimelineRow("C", "read", 0.020, None, "s1"))
    return tl


# ---------------------------------------------------------------------------------------------- recording
def test_span_records_start_end_and_outcome() -> None:
    clock = FakeClock()
    tl = Timeline(clock=clock)
    clock.now += 1.0
    with tl.span("model", who="A", key="s1", detail="q1"):
        clock.now += 0.5
    with pytest.raises(ValueError), tl.span("embed", who="B"):
        clock.now += 0.25
        raise ValueError("no")
    assert tl.rows() == [
        TimelineRow("A", "model", 1.0, 1.5, "s1", "ok", "q1"),
        TimelineRow("B", "embed", 1.5, 1.75, None, "error", None),
    ]


async def test_span_records_cancellation_and_the_task_name() -> None:
    tl = Timeline()
    started = asyncio.Event()

    async def victim() -> None:
        with tl.span("model"):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(victim(), name="request-1")
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [row] = tl.rows()
    assert (row.who, row.phase, row.outcome) == ("request-1", "model", "cancelled")


def test_mark_is_an_instant_event() -> None:
    clock = FakeClock()
    tl = Timeline(clock=clock)
    clock.now += 2
    tl.mark("lost", who="A", key="s1", detail="user 2")
    [row] = tl.rows()
    assert row == TimelineRow("A", "lost", 2.0, None, "s1", None, "user 2")
    assert row.duration == 0.0


def test_rows_are_sorted_by_start_and_exported_as_dicts() -> None:
    tl = Timeline()
    tl.add(TimelineRow("B", "model", 0.2, 0.3))
    tl.add(TimelineRow("A", "model", 0.1, 0.4))
    assert [r.who for r in tl.rows()] == ["A", "B"]
    assert tl.to_dicts()[0] == {
        "who": "A",
        "phase": "model",
        "start": 0.1,
        "end": 0.4,
        "key": None,
        "outcome": None,
        "detail": None,
    }
    assert len(tl) == 2 and "rows=2" in repr(tl)
    tl.clear()
    assert len(tl) == 0


async def test_observe_lock_turns_lock_events_into_wait_and_hold_spans() -> None:
    tl = Timeline()
    lock = chatkit.KeyedLock(observer=tl.observe_lock)
    a_holds = asyncio.Event()
    release_a = asyncio.Event()

    async def first() -> None:
        async with lock("s1", label="A"):
            a_holds.set()
            await release_a.wait()

    async def second() -> None:
        await a_holds.wait()
        async with lock("s1", label="B"):
            pass

    async def third() -> None:
        await a_holds.wait()
        with pytest.raises(chatkit.LockTimeout):
            async with lock("s1", label="C", timeout=0.001):
                pass  # pragma: no cover - never runs
        release_a.set()

    await asyncio.gather(first(), second(), third())
    rows = [(r.who, r.phase, r.outcome, r.key) for r in tl.rows()]
    assert ("A", "hold", "ok", "s1") in rows
    assert ("B", "wait", "ok", "s1") in rows
    assert ("B", "hold", "ok", "s1") in rows
    assert ("C", "wait", "timed_out", "s1") in rows
    hold_a = next(r for r in tl.rows() if r.who == "A" and r.phase == "hold")
    hold_b = next(r for r in tl.rows() if r.who == "B" and r.phase == "hold")
    assert hold_a.end is not None and hold_a.end <= hold_b.start  # the lock never overlapped


# ---------------------------------------------------------------------------------------------- rendering
def test_plot_has_one_lane_per_request_in_order_of_appearance() -> None:
    fig = _sample().plot(title="before")
    ax = fig.axes[0]
    # each lane is named with the key its rows used
    assert [t.get_text() for t in ax.get_yticklabels()] == ["A\nkey s1", "B\nkey s1", "C\nkey s1"]
    assert ax.get_title(loc="left") == "before"
    assert len(ax.collections) == 5  # one bar per span
    assert "ms" in ax.get_xlabel()


def test_plot_colours_phases_and_marks_damage_with_a_red_x() -> None:
    from matplotlib.colors import to_hex

    from chatkit._timeline_plot import PHASE_COLOURS

    ax = _sample().plot().axes[0]
    colours = {to_hex(c.get_facecolor()[0]) for c in ax.collections}
    assert {PHASE_COLOURS["wait"], PHASE_COLOURS["hold"], PHASE_COLOURS["model"]} <= colours
    markers = {line.get_marker(): to_hex(line.get_color()) for line in ax.lines}
    assert markers["X"] == "#d62728"  # "lost" is damage
    assert markers["D"] == "#333333"  # "read" is not
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    # phases, the red outline of B's failed model call, then events by time
    assert legend == ["wait", "hold", "model", "failed (red outline)", "read", "lost"]


def test_plot_draws_into_a_given_axes_and_handles_an_empty_timeline() -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert Timeline().plot(ax=ax) is fig
    assert ax.texts[0].get_text() == "(empty timeline)"


def test_plot_uses_seconds_for_long_timelines() -> None:
    tl = Timeline()
    tl.add(TimelineRow("A", "embed", 0.0, 5.0))
    assert "(s)" in tl.plot().axes[0].get_xlabel()


def test_repr_html_embeds_a_png_without_javascript() -> None:
    html = _sample()._repr_html_()
    assert html.startswith('<img alt="&lt;Timeline rows=7&gt;" src="data:image/png;base64,')
    assert "<script" not in html
    data = base64.b64decode(html.split("base64,", 1)[1].rsplit('"', 1)[0])
    assert data.startswith(b"\x89PNG\r\n\x1a\n")


def test_png_is_stable_for_the_same_rows() -> None:
    from chatkit._timeline_plot import figure_png

    assert figure_png(_sample().plot()) == figure_png(_sample().plot())


def test_plot_interactive_has_a_trace_per_phase_and_red_x_for_damage() -> None:
    fig = _sample().plot_interactive(title="before")
    names = [trace.name for trace in fig.data]
    assert names == ["wait", "hold", "model", "events"]  # background phases first
    events = fig.data[-1]
    assert list(events.marker.symbol) == ["x", "diamond"] or list(events.marker.symbol) == ["diamond", "x"]
    lost = list(events.text).index("lost")
    assert events.marker.symbol[lost] == "x" and events.marker.color[lost] == "#d62728"
    assert list(fig.layout.yaxis.categoryarray) == ["A", "B", "C"]


def test_plot_timelines_stacks_charts_on_one_time_axis() -> None:
    fig = plot_timelines({"before": _sample(), "after": Timeline()})
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["before", "after"]
    assert fig.axes[0].get_xlabel() == ""  # only the bottom chart labels the shared axis


@pytest.mark.parametrize(
    ("arg", "error", "match"),
    [({}, ValueError, "at least one"), ({"x": "not a timeline"}, TypeError, "'x'")],
)
def test_plot_timelines_rejects_bad_input(arg: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plot_timelines(arg)  # type: ignore[arg-type]


def test_importing_the_timeline_loads_no_plotting_library() -> None:
    code = (
        "import sys, chatkit; tl = chatkit.Timeline(); tl.mark('x', who='A'); "
        "print(sorted(m for m in ('matplotlib', 'plotly', 'matplotlib.pyplot') if m in sys.modules)); "
        "tl.plot(); print('matplotlib.pyplot' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "False"]  # plot() never touches pyplot (Agg-safe)
