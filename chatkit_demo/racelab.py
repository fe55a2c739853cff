"""The Race lab tab's handlers: :class:`RaceLabHandlers` and the :data:`EXPERIMENTS` it offers."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .services import DemoServices
from .tables import html_table


# ------------------------------------------------------------------------------------------ race lab
# label in the UI -> experiment name in chatkit.experiments
EXPERIMENTS: dict[str, str] = {
    "Chat history: concurrent chat() calls": "session_race",
    "LangGraph: concurrent ainvoke, one thread": "checkpointer_race",
    "Vector store: search during a replace": "store_race",
}
ANOMALY_HEADERS = ["anomaly", "request", "detail"]
# experiment name -> its keyword arguments for (concurrent requests, use the fix)
_EXPERIMENT_ARGS: dict[str, Any] = {
    "session_race": lambda n, fixed: {"questions": _questions(n), "locking": fixed},
    "checkpointer_race": lambda n, fixed: {"questions": _questions(n), "locked": fixed},
    # one writer replaces a document of n chunks while a reader keeps searching
    "store_race": lambda n, fixed: {"parts": n, "cow": fixed},
}


class RaceLabHandlers:
    """Race lab tab: run one of :mod:`chatkit.experiments` with or without the lock.

    Each run builds its own private objects, so visitors' experiments never touch each other or the
    demo's real sessions and knowledge base.
    """

    def __init__(self, services: DemoServices) -> None:
        self.services = services

    def __repr__(self) -> str:
        return f"<RaceLabHandlers experiments={len(EXPERIMENTS)}>"

    async def run(self, experiment: str, requests: float, locked: bool) -> tuple[Any, list[list[Any]], str]:
        """Run ``experiment`` with ``requests`` concurrent requests.

        Returns:
            (the timeline figure, one row per anomaly: [kind, who, detail], a Markdown summary).
        """
        name = EXPERIMENTS.get(experiment)
        if name is None:
            raise gr.Error(f"Unknown experiment {experiment!r}; choose one of the list.")
        n = int(requests)
        if not 2 <= n <= 20:
            raise gr.Error(f"Choose between 2 and 20 concurrent requests, not {n}.")
        result = await _run_experiment(name, n, bool(locked))
        return _experiment_outputs(result, locked=bool(locked))

    async def ui_run(self, experiment: str, requests: float, locked: bool) -> tuple[Any, str, str]:
        """:meth:`run` for the page: (the timeline figure, the anomalies as an HTML table, the summary)."""
        figure, rows, summary = await self.run(experiment, requests, locked)
        table = html_table(ANOMALY_HEADERS, rows, widths=["24%", "20%", "56%"], stack=True,
                           empty="No anomalies: nothing was lost.")
        return figure, table, summary

    async def api_run(self, experiment: str, requests: int = 3, locked: bool = False) -> tuple[list[list[Any]], str]:
        """API: run an experiment; returns (one row per anomaly [kind, who, detail], the summary)."""
        _, rows, summary = await self.run(experiment, requests, locked)
        return rows, summary


def _questions(n: int) -> tuple[str, ...]:
    """``n`` distinct questions for an experiment's concurrent requests."""
    from chatkit import experiments

    base = list(experiments.QUESTIONS)
    return tuple(base[i] if i < len(base) else f"Message {i + 1}: what happens now?" for i in range(n))


async def _run_experiment(name: str, requests: int, locked: bool) -> Any:
    from chatkit import experiments

    fn = getattr(experiments, name, None)
    if fn is None:
        raise gr.Error(f"The experiment {name!r} is not available in this version of chatkit.")
    return await fn(**_EXPERIMENT_ARGS[name](requests, locked))


def timeline_figure(result: Any) -> Any:
    """The run's timeline as a plotly figure that fits a phone as well as a desktop: it takes the width
    of its container, is as tall as its lanes need (at least 44 px each), keeps the legend below the chart
    and leaves the summary to the text above it."""
    figure = result.timeline.plot_interactive()
    lanes = len({str(y) for trace in figure.data for y in (getattr(trace, "y", None) or ())})
    figure.update_layout(
        title=None,
        autosize=True,
        height=150 + 48 * max(1, lanes),
        margin={"l": 8, "r": 8, "t": 8, "b": 8},
        font={"size": 13},
        legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0, "font": {"size": 12}},
    )
    figure.update_yaxes(automargin=True, title=None)
    figure.update_xaxes(automargin=True)
    # event labels (a red X's "lost message") centred above their marker, and room for them on the right
    figure.update_traces(textposition="top center", selector={"type": "scatter"})
    ends = [
        float(b) + float(x)
        for trace in figure.data if getattr(trace, "type", None) == "bar"
        for b, x in zip(trace.base or (), trace.x or (), strict=False)
    ] + [float(x) for trace in figure.data if getattr(trace, "type", None) == "scatter" for x in (trace.x or ())]
    if ends:
        right = max(ends)
        figure.update_xaxes(range=[-0.03 * right, 1.3 * right])
    return figure


def _experiment_outputs(result: Any, *, locked: bool) -> tuple[Any, list[list[Any]], str]:
    figure = timeline_figure(result)
    rows = [[a.kind, a.who, a.detail] for a in result.anomalies]
    verdict = f"**{len(rows)} anomalies**" if rows else "**no anomalies**"
    return figure, rows, f"{verdict}: {result.summary()}"
