"""chatkit.run: a coroutine from sync code, with or without a running event loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest

import chatkit


async def _answer(value: int) -> int:
    await asyncio.sleep(0)
    return value


async def _boom() -> None:
    await asyncio.sleep(0)
    raise KeyError("boom")


def test_runs_a_coroutine_without_a_loop() -> None:
    assert chatkit.run(_answer(42)) == 42


def test_propagates_the_exception_unchanged() -> None:
    with pytest.raises(KeyError, match="boom"):
        chatkit.run(_boom())


def test_runs_in_a_worker_thread_without_a_loop() -> None:
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(chatkit.run(_answer(7))))
    thread.start()
    thread.join()
    assert results == [7]


def test_accepts_any_awaitable() -> None:
    class Awaitable:
        def __await__(self):  # type: ignore[no-untyped-def]
            return _answer(3).__await__()

    assert chatkit.run(Awaitable()) == 3


@pytest.mark.parametrize("bad", [42, None, "coroutine", _answer])
def test_rejects_what_is_not_awaitable(bad: object) -> None:
    with pytest.raises(TypeError, match="awaitable"):
        chatkit.run(bad)  # type: ignore[arg-type]


def test_hints_at_an_uncalled_coroutine_function() -> None:
    with pytest.raises(TypeError, match="forget to call"):
        chatkit.run(_answer)  # type: ignore[arg-type]


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nest_asyncio patches asyncio process-wide)."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_inside_a_running_loop_like_jupyter() -> None:
    out = _python(
        """
        import asyncio, sys, chatkit

        async def child(event):
            await event.wait()          # an object bound to the OUTER loop
            return "child done"

        async def cell():                # what a notebook cell does from sync helper code
            event = asyncio.Event()
            asyncio.get_running_loop().call_soon(event.set)
            result = chatkit.run(child(event))   # asyncio.run() would raise here
            print(result, "nest_asyncio" in sys.modules)

        asyncio.run(cell())
        """
    )
    assert out == "child done True"


def test_no_nest_asyncio_when_no_loop_runs() -> None:
    out = _python(
        """
        import asyncio, sys, chatkit
        async def f():
            return 1
        print(chatkit.run(f()), "nest_asyncio" in sys.modules)
        """
    )
    assert out == "1 False"
