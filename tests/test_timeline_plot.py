"""What a student must be able to read off a timeline chart (issue 14): the steps of a race, their causes,
one marker shape per kind of event, keys on lanes, no sliver bars or labels printed over bars, failures
in the legend, one readable axis per panel."""

from __future__ import annotations

import asyncio

import pytest

from chatkit.timeline import Timeline, TimelineRow, lane, plot_timelines


def _race() -> Timeline:
    """The plan's read -> await -> write race of three requests, as notebook 1 records it."""
    tl = Timeline()
    for who, end in (("request 1", 0.060), ("request 2", 0.040), ("request 3", 0.020)):
        tl.add(TimelineRow(who, "read", 0.0, None, "s1", None, "saw 0 messages"))
        tl.add(TimelineRow(who, "model", 0.0, end, "s1", "ok"))
        tl.add(TimelineRow(who, "write", end, None, "s1", None, "wrote 2 messages"))
    tl.add(TimelineRow("request 3", "lost message", 0.040, None, "s1", None, "overwritten by request 2"))
    tl.add(TimelineRow("request 2", "lost message", 0.060, None, "s1", None, "overwritten by request 1"))
    return tl


def _legend(ax) -> list[str]:  # type: ignore[no-untyped-def]
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _marker_of(ax, kind: str) -> str:  # type: ignore[no-untyped-def]
    handles = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles, strict=True)}
    return handles[kind].get_marker()


def test_read_write_and_damage_marks_carry_their_counts_and_cause_where_they_happen() -> None:
    ax = _race().plot().axes[0]
    labels = {t.get_text(): t for t in ax.texts}
    assert {"saw 0 messages", "wrote 2 messages", "overwritten by request 2", "overwritten by request 1"} <= set(labels)
    # request 3's damage is drawn at request 2's write (40 ms), in request 3's lane (the third)
    lanes = [t.get_text().split("\n")[0] for t in ax.get_yticklabels()]
    x, y = labels["overwritten by request 2"].xy
    assert x == pytest.approx(40.0) and round(y) == lanes.index("request 3")


def test_one_marker_shape_and_one_legend_entry_per_kind_of_event() -> None:
    tl = Timeline()
    for i, kind in enumerate(("read", "write", "sent", "SessionBusy", "interrupted", "lost turn", "partial read")):
        tl.add(TimelineRow("A" if i % 2 else "B", kind, i * 0.01, None))
    ax = tl.plot().axes[0]
    kinds = ["read", "write", "sent", "SessionBusy", "interrupted", "lost turn", "partial read"]
    assert _legend(ax) == kinds
    shapes = [_marker_of(ax, k) for k in kinds]
    assert len(set(shapes)) == len(kinds), shapes  # no two kinds look alike
    assert {line.get_marker() for line in ax.lines} == set(shapes)


def test_marker_labels_sit_between_lanes_never_over_bars_and_never_over_each_other() -> None:
    fig = _race().plot()
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    for i, a in enumerate(boxes):  # no two labels overlap
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
    bars = [c.get_paths()[0].get_extents(ax.transData) for c in ax.collections]
    for box in boxes:  # no label covers a bar
        for bar in bars:
            assert not box.overlaps(bar)


def test_lanes_name_their_keys_and_a_deadlocked_lane_says_what_it_holds_and_waits_for() -> None:
    tl = Timeline()
    tl.add(TimelineRow("caller 1", "hold", 0.0, 0.2, "a", "cancelled"))
    tl.add(TimelineRow("caller 1", "wait", 0.001, 0.2, "b", "cancelled"))
    tl.add(TimelineRow("caller 2", "hold", 0.0, 0.2, "b", "cancelled"))
    tl.add(TimelineRow("caller 2", "wait", 0.001, 0.2, "a", "cancelled"))
    tl.add(TimelineRow("caller 3", "hold", 0.2, 0.21, ("a", "b"), "ok"))
    tl.add(TimelineRow("reader", "search", 0.21, 0.22))
    ax = tl.plot().axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "caller 1\nholds a · waits for b",
        "caller 2\nholds b · waits for a",
        "caller 3\nkeys a, b",
        "reader",
    ]


def test_a_wait_nested_in_a_hold_is_drawn_narrow_inside_it() -> None:
    tl = Timeline()
    tl.add(TimelineRow("caller 1", "hold", 0.0, 0.2, "a"))
    tl.add(TimelineRow("caller 1", "wait", 0.01, 0.2, "b", "cancelled"))
    ax = tl.plot().axes[0]
    heights = sorted(c.get_paths()[0].get_extents().height for c in ax.collections)
    assert heights[0] < heights[1] / 1.5


def test_cancelled_and_failed_work_are_in_the_legend_only_when_drawn() -> None:
    tl = Timeline()
    tl.add(TimelineRow("A", "model", 0.0, 0.03, outcome="cancelled"))
    tl.add(TimelineRow("B", "model", 0.0, 0.05, outcome="ok"))
    assert _legend(tl.plot().axes[0]) == ["model", "cancelled (red outline)"]
    ok = Timeline()
    ok.add(TimelineRow("B", "model", 0.0, 0.05, outcome="ok"))
    assert _legend(ok.plot().axes[0]) == ["model"]


def test_a_wait_too_short_to_see_is_not_drawn_nor_in_the_legend_and_short_work_is_widened() -> None:
    tl = Timeline()
    tl.add(TimelineRow("writer", "embed", 0.0, 0.020))
    tl.add(TimelineRow("writer", "wait", 0.020, 0.020001, "doc", "ok"))  # 1 microsecond: nobody waited
    tl.add(TimelineRow("writer", "publish", 0.020001, 0.020002, "doc", "ok"))  # 1 microsecond of work
    ax = tl.plot().axes[0]
    assert "wait" not in _legend(ax) and "publish" in _legend(ax)
    widths = [c.get_paths()[0].get_extents().width for c in ax.collections]
    assert len(widths) == 2 and min(widths) >= 0.004 * (ax.get_xlim()[1] - ax.get_xlim()[0]) * 0.99


def test_plot_timelines_can_give_each_panel_its_own_readable_axis() -> None:
    slow, fast = Timeline(), Timeline()
    slow.add(TimelineRow("A", "write", 0.0, 0.100))
    fast.add(TimelineRow("A", "search", 0.0, 0.002))
    fig = plot_timelines({"slow": slow, "fast": fast}, sharex=False)
    (lo1, hi1), (lo2, hi2) = (ax.get_xlim() for ax in fig.axes)
    assert hi1 > 90 and hi2 < 3  # each scaled to its own rows
    assert all(ax.get_xlabel() for ax in fig.axes)


def test_style_colours_a_phase_and_names_its_legend_entry() -> None:
    from matplotlib.colors import to_hex

    tl = Timeline()
    tl.style("search saw v2", colour="#fd8d3c", label="search that saw version 2")
    tl.add(TimelineRow("reader", "search saw v2", 0.0, 0.01))
    ax = tl.plot().axes[0]
    assert _legend(ax) == ["search that saw version 2"]
    assert to_hex(ax.collections[0].get_facecolor()[0]) == "#fd8d3c"
    with pytest.raises(TypeError, match="phase"):
        tl.style(3)  # type: ignore[arg-type]


async def test_lane_keeps_the_rows_of_child_tasks_in_the_request_lane() -> None:
    tl = Timeline()

    async def node() -> None:  # LangGraph runs each node in a task of its own
        tl.mark("read", detail="saw 0 messages")
        with tl.span("model"):
            await asyncio.sleep(0)
        tl.mark("write", who="explicit")

    with lane("request 1"):
        await asyncio.create_task(node(), name="Task-99")
    await asyncio.create_task(node(), name="outside")
    assert [(r.who, r.phase) for r in tl.rows()] == [
        ("request 1", "read"),
        ("request 1", "model"),
        ("explicit", "write"),
        ("outside", "read"),
        ("outside", "model"),
        ("explicit", "write"),
    ]
    with pytest.raises(TypeError, match="non-empty"):
        with lane(""):
            pass
