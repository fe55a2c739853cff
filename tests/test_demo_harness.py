"""Helpers shared by the demo tests (imported as ``tests.test_demo_harness``), and tests of the helpers.

* :func:`serve`: launch a demo ``gr.Blocks`` in-process on 127.0.0.1 on a free port.
* :func:`small_kb`: write a tiny knowledge base (three markdown files) into a directory.
* :func:`fast_config`: a :class:`demo_app.DemoConfig` with hash embeddings (no model load).
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

KB_FILES: dict[str, str] = {
    "lost-updates.md": "# Lost updates\n\nA lost update happens when two writers read the same value, "
    "both change it, and the second write silently overwrites the first. A per-key lock prevents it.\n",
    "snapshots.md": "# Snapshots\n\nA snapshot is a pinned, read-only version of the vector store. "
    "Readers search a snapshot and never see a half-indexed document.\n",
    "double-texting.md": "# Double texting\n\nDouble texting means a user sends a second message before the "
    "first one was answered. Policies: enqueue, reject, interrupt, rollback.\n",
}


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def small_kb(directory: Path) -> Path:
    """Write :data:`KB_FILES` into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in KB_FILES.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def fast_config(data_dir: Path | None, **overrides: object):  # -> demo_app.DemoConfig
    import demo_app

    return demo_app.DemoConfig(data_dir=data_dir, embeddings="hash", **overrides)  # type: ignore[arg-type]


@contextlib.contextmanager
def serve(app, *, attempts: int = 5) -> Iterator[str]:  # app: gr.Blocks
    """Launch ``app`` on 127.0.0.1 (a free port, retried if taken meanwhile) with the page's CSS; yield its
    URL; close it and its services."""
    from chatkit_demo.ui import launch_kwargs

    last: OSError | None = None
    for _ in range(attempts):
        try:
            app.launch(
                server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                show_error=True, **launch_kwargs(),
            )
            break
        except OSError as exc:  # the port was taken between free_port() and launch()
            last = exc
    else:
        raise RuntimeError(f"could not launch the demo after {attempts} attempts") from last
    try:
        yield app.local_url.rstrip("/")
    finally:
        app.close()
        services = getattr(app, "chatkit_services", None)
        if services is not None:
            services.close()


def http_get(url: str, *, timeout: float = 30.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
        return response.status, response.read().decode("utf-8", "replace")


# --------------------------------------------------------------------------- tests of the helpers
def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_small_kb_writes_every_file(tmp_path: Path) -> None:
    kb = small_kb(tmp_path / "kb")
    assert sorted(p.name for p in kb.iterdir()) == sorted(KB_FILES)


@pytest.mark.server
def test_serve_answers_http_and_closes(tmp_path: Path) -> None:
    import demo_app

    app = demo_app.build_demo(fast_config(None))
    with serve(app) as url:
        status, body = http_get(url + "/")
        assert status == 200
        assert "chatkit demo" in body
    with pytest.raises(OSError):
        http_get(url + "/", timeout=5)
