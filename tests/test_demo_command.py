"""The demo's entry points: the command line's defaults, the bundled knowledge base, Gradio's reload mode.

The installed ``chatkit-demo`` command is tested from the built wheel in test_packaging.py.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.test_demo_harness import REPO, fast_config, free_port, http_get, small_kb
from tests.test_packaging import Process, read_until

from chatkit import HashEmbeddings
from chatkit_demo.cli import PortBusy, check_port, parse_args, serve
from chatkit_demo.config import DEFAULT_DATA_DIR, bundled_data_dir


def test_the_bundled_knowledge_base_is_the_checkouts_data_folder() -> None:
    """In a checkout (this one) the demo reads data/ at the top; the wheel ships it as chatkit_demo/data
    (test_packaging.py checks the installed case)."""
    assert bundled_data_dir() == DEFAULT_DATA_DIR == REPO / "data"
    assert parse_args([]).data == REPO / "data"


def test_host_and_port_default_to_gradios_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    args = parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 8123)
    args = parse_args(["--host", "127.0.0.2", "--port", "9000"])  # the command line wins
    assert (args.host, args.port) == ("127.0.0.2", 9000)


def test_the_demos_options_default_to_its_environment_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHATKIT_DEMO_EMBEDDINGS", "hash")
    monkeypatch.setenv("CHATKIT_DEMO_DATA", str(tmp_path))
    monkeypatch.setenv("CHATKIT_DEMO_LATENCY", "0.5")
    args = parse_args([])
    assert (args.embeddings, args.data, args.latency) == ("hash", tmp_path, 0.5)
    assert parse_args(["--embeddings", "minilm"]).embeddings == "minilm"  # the command line wins
    monkeypatch.setenv("CHATKIT_DEMO_LATENCY", "slow")
    with pytest.raises(SystemExit):
        parse_args([])
    assert "could not convert string to float: 'slow'" in capsys.readouterr().err


def test_a_bad_port_in_the_environment_is_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit) as info:
        parse_args([])
    assert info.value.code == 2
    assert "GRADIO_SERVER_PORT must be a port number, got 'http'" in capsys.readouterr().err


def test_the_module_docstring_points_to_existing_docs() -> None:
    import demo_app

    assert "docs/readme/demo.md" not in (demo_app.__doc__ or "")
    assert '"The demo"' in (demo_app.__doc__ or "") and "## The demo" in (REPO / "README.md").read_text()


@pytest.mark.server
def test_gradio_reload_mode_serves_once_on_gradios_port_and_reloads(tmp_path: Path) -> None:
    """``gradio demo_app.py``: Gradio runs the file, then re-runs it in a watcher thread at start and after
    each change. The first run alone loads the knowledge base and serves, on GRADIO_SERVER_PORT; a change
    swaps in the rebuilt app, which answers."""
    app_dir = tmp_path / "app"  # a copy of demo_app.py, so that the test can "change" it without touching the repo
    app_dir.mkdir()
    shutil.copy(REPO / "demo_app.py", app_dir / "demo_app.py")
    kb = small_kb(tmp_path / "kb")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        # options through the environment: Gradio 6.0's CLI passes no arguments to the app (later ones take `--`)
        "CHATKIT_DEMO_EMBEDDINGS": "hash",
        "CHATKIT_DEMO_DATA": str(kb),
    }
    gradio = Path(sys.executable).parent / "gradio"
    argv = [str(gradio), "demo_app.py"]
    with Process(argv, env=env, cwd=app_dir) as lines:
        output = read_until(lines, "chatkit demo running at", timeout=180)
        assert f"chatkit demo running at http://127.0.0.1:{port}/" in output
        assert http_get(f"http://127.0.0.1:{port}/")[0] == 200
        # Change the file until the watcher reports it (its first scan, which records the times to compare
        # with, may not have happened yet: each attempt waits for the report, a bounded wait).
        seen: list[str] = []  # every line, also those read by an attempt that then timed out
        for attempt in range(1, 11):
            stamp = time.time() + 10 * attempt
            os.utime(app_dir / "demo_app.py", (stamp, stamp))
            if _read_into(seen, lines, "Changes detected in", timeout=3):
                break
        else:
            pytest.fail("the watcher never reported the change:\n" + output + "".join(seen))
        output += "".join(seen)
        from gradio_client import Client

        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        try:
            history, _ = client.predict("What is a lost update?", api_name="/chat")
        finally:
            client.close()
        assert "lost-updates.md" in str(history[-1])
        output += _drain(lines)
    assert output.count("Loading the knowledge base") == 1, output
    assert output.count("chatkit demo running at") == 1, output
    assert "running at None" not in output and "Traceback" not in output and "failed" not in output, output
    assert "--share" in output and "share=True" not in output, output


def _read_into(seen: list[str], lines: queue.Queue[str], marker: str, *, timeout: float) -> bool:
    """Append the process's lines to ``seen`` up to the one holding ``marker`` (``True``), or until no line
    came for ``timeout`` seconds (``False``; the lines read so far stay in ``seen``)."""
    while True:
        try:
            line = lines.get(timeout=timeout)  # a bounded wait for the next line, not a sleep
        except queue.Empty:
            return False
        assert line, "the process exited:\n" + "".join(seen)
        seen.append(line)
        if marker in line:
            return True


def _drain(lines: queue.Queue[str]) -> str:
    """Whatever the process printed so far, without waiting."""
    out = []
    while True:
        try:
            out.append(lines.get_nowait())
        except queue.Empty:
            return "".join(out)


def test_run_as_a_script_it_needs_no_gradio_reload_machinery() -> None:
    """``python demo_app.py --help`` parses the command line before building anything."""
    done = subprocess.run(
        [sys.executable, str(REPO / "demo_app.py"), "--help"], capture_output=True, text=True, timeout=120,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "GRADIO_SERVER_PORT" in done.stdout and "--embeddings" in done.stdout


# ------------------------------------------------------------------------------------------ start-up
def test_a_busy_port_is_named_in_one_line_before_anything_loads() -> None:
    """Before: a raw traceback after the knowledge base had loaded, telling the user to set
    GRADIO_SERVER_PORT."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortBusy) as info:
            check_port("127.0.0.1", port)
        assert str(info.value) == (
            f"error: cannot listen on 127.0.0.1:{port} (the port is already in use). "
            f"Choose another port with --port (for example --port {port + 1})."
        )
        done = subprocess.run(
            [sys.executable, str(REPO / "demo_app.py"), "--port", str(port), "--embeddings", "hash"],
            capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr.strip() == str(info.value), done.stderr
    assert done.stdout == ""  # nothing loaded, nothing launched


class _HeldEmbeddings(HashEmbeddings):
    """Hash embeddings whose first document embedding (the start-up indexing) waits for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.entered.set()
        if not self.release.wait(timeout=120):
            raise TimeoutError("the test never released the loading")
        return super().embed_documents(texts)


def test_the_page_answers_while_the_knowledge_base_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the default start took 38 s before the page answered (the knowledge base loaded first)."""
    import demo_app

    embeddings = _HeldEmbeddings()
    kb = small_kb(tmp_path / "kb")
    services = demo_app.DemoServices(fast_config(kb), embeddings=embeddings)
    app = demo_app.build_demo(services=services)
    args = parse_args(["--port", str(free_port()), "--embeddings", "hash", "--data", str(kb)])
    server = threading.Thread(target=serve, args=(app, args), daemon=True)
    server.start()
    try:
        assert embeddings.entered.wait(120)  # the loading started, after the launch: the server listens
        status, body = http_get(app.local_url)
        assert status == 200 and "chatkit demo" in body
        assert not services.is_ready and services.status().state == "loading"
    finally:
        embeddings.release.set()
        app.close()
        server.join(60)
    output = capsys.readouterr().out
    assert output.index("Loading the knowledge base") < output.index("chatkit demo running at")
    assert "restart with --share --auth USER:PASS" in output and "share=True" not in output
