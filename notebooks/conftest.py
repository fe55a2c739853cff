"""nbval: a notebook that needs a server the machine lacks is skipped, as the tests' server fixtures do.

A notebook lists the servers it starts (with :mod:`chatkit.testing`) in its metadata, as
``"chatkit": {"requires": ["redis-server"]}``. When one is not installed, each of the notebook's cells is
skipped with the reason (``make test`` sets ``CHATKIT_REQUIRE_SERVERS=1``, which fails them instead: it installs
the servers first, so a missing one is a broken setup, not a machine without it).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest


def _servers() -> dict[str, Callable[[], object]]:
    from chatkit import testing

    return {"redis-server": testing._redis_binary, "postgres": testing._postgres_bin}


@functools.cache
def _missing(notebook: Path) -> str | None:
    """Why ``notebook`` cannot run here (a server it needs is not installed), or ``None``."""
    from chatkit.testing import ServerUnavailable

    metadata = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {})
    for server in metadata.get("chatkit", {}).get("requires", []):
        check = _servers().get(server)
        if check is None:
            return f"{notebook.name} requires an unknown server {server!r} (known: {', '.join(_servers())})"
        try:
            check()
        except ServerUnavailable as exc:
            return f"{notebook.name} needs {server}: {exc}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.path.suffix != ".ipynb":
        return
    reason = _missing(item.path)
    if reason is None:
        return
    if os.environ.get("CHATKIT_REQUIRE_SERVERS") == "1" or "unknown server" in reason:
        pytest.fail(reason)
    pytest.skip(reason)
