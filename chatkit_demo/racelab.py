"""The Race lab tab's handlers: :class:`RaceLabHandlers` and the :data:`EXPERIMENTS` it offers."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .services import DemoServices


# ------------------------------------------------------------------------------------------ race lab
# label in the UI -> experiment name in chatkit.experiments
EXPERIMENTS: dict[str, str] = {
    "Session history: concurrent chat() on one session": "session_race",
    "LangGraph checkpointer: concurrent ainvoke on one thread": "checkpointer_race",
    "Vector store: search while a document is replaced": "store_race",
}
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


def _experiment_outputs(result: Any, *, locked: bool) -> tuple[Any, list[list[Any]], str]:
    figure = result.plot()
    rows = [[a.kind, a.who, a.detail] for a in result.anomalies]
    verdict = f"**{len(rows)} anomalies**" if rows else "**no anomalies**"
    return figure, rows, f"{verdict}: {result.summary()}"
