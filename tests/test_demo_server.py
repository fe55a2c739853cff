"""The demo served on 127.0.0.1 and driven through ``gradio_client``: many users, bursts, isolation, share.

One app (hash embeddings, a three-file knowledge base) is launched in-process for the module. Every
``gradio_client.Client`` is its own Gradio session, hence its own chatkit session.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.test_demo_harness import REPO, fast_config, free_port, http_get, serve, small_kb

import demo_app

pytestmark = pytest.mark.server

USERS = 6
BURST = 4  # concurrent messages per user, all in flight at once


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_kb(tmp_path_factory.mktemp("kb"))


@pytest.fixture(scope="module")
def url(kb_dir: Path) -> Iterator[str]:
    app = demo_app.build_demo(fast_config(kb_dir))
    with serve(app) as base:
        yield base


def _client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def _text(message: dict) -> str:
    """A Chatbot message's text: Gradio 6 sends content as a list of typed parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _app_error():
    from gradio_client.exceptions import AppError

    return AppError


def test_many_users_with_bursts_keep_exact_histories(url: str) -> None:
    """Each user sends BURST messages at once into its own session: every history holds exactly that
    user's messages, each immediately followed by the reply the user received for it."""
    clients = [_client(url) for _ in range(USERS)]
    try:
        session_ids = [c.predict(api_name="/my_session") for c in clients]
        assert len(set(session_ids)) == USERS
        jobs = {
            (u, i): clients[u].submit(session_ids[u], f"user {u} asks question {i}: what is a snapshot?",
                                      api_name="/send")
            for u in range(USERS)
            for i in range(BURST)
        }
        replies = {key: job.result(timeout=120) for key, job in jobs.items()}
        for u, client in enumerate(clients):
            history = client.predict(session_ids[u], api_name="/history")
            assert [m["role"] for m in history] == ["user", "assistant"] * BURST
            pairs = {(history[j]["content"], history[j + 1]["content"]) for j in range(0, len(history), 2)}
            expected = {(f"user {u} asks question {i}: what is a snapshot?", replies[(u, i)]) for i in range(BURST)}
            assert pairs == expected
            assert all(f"user {u} " in m["content"] for m in history if m["role"] == "user")
    finally:
        for c in clients:
            c.close()


def test_chat_endpoint_returns_history_with_sources(url: str) -> None:
    client = _client(url)
    try:
        history, sources = client.predict("What is a lost update?", api_name="/chat")
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert _text(history[0]) == "What is a lost update?"
        assert "lost-updates.md" in sources
        history, _ = client.predict("And a snapshot?", api_name="/chat")
        assert [_text(m) for m in history][::2] == ["What is a lost update?", "And a snapshot?"]
    finally:
        client.close()


def test_a_users_session_id_is_refused_for_another(url: str) -> None:
    alice, mallory = _client(url), _client(url)
    try:
        alice_id = alice.predict(api_name="/my_session")
        alice.predict(alice_id, "my secret is 42", api_name="/send")
        before = alice.predict(alice_id, api_name="/history")
        with pytest.raises(_app_error(), match="does not belong to this browser session"):
            mallory.predict(alice_id, api_name="/history")
        with pytest.raises(_app_error(), match="does not belong to this browser session"):
            mallory.predict(alice_id, "overwrite it", api_name="/send")
        assert alice.predict(alice_id, api_name="/history") == before
        mallory_history, _ = mallory.predict("what is my secret?", api_name="/chat")
        assert all("42" not in _text(m) for m in mallory_history)
    finally:
        alice.close()
        mallory.close()


@pytest.mark.parametrize(
    ("message", "error"),
    [("   ", "empty"), ("x" * 2001, "too long: 2,001 characters, the limit is 2,000")],
)
def test_bad_messages_get_a_clear_error_and_change_nothing(url: str, message: str, error: str) -> None:
    client = _client(url)
    try:
        sid = client.predict(api_name="/my_session")
        client.predict(sid, "hello", api_name="/send")
        before = client.predict(sid, api_name="/history")
        with pytest.raises(_app_error(), match=error):
            client.predict(message, api_name="/chat")
        assert client.predict(sid, api_name="/history") == before
    finally:
        client.close()


def test_upload_then_search_finds_the_new_document(url: str, tmp_path: Path) -> None:
    from gradio_client import handle_file

    doc = tmp_path / "penguins.md"
    doc.write_text("# Penguins\n\nEmperor penguins huddle together to survive the antarctic winter.\n")
    bad = tmp_path / "notes.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    client = _client(url)
    try:
        before = client.predict(api_name="/documents")
        status, table = client.predict([handle_file(str(doc)), handle_file(str(bad))], api_name="/upload")
        assert "penguins.md" in status and "not valid UTF-8" in status
        rows = {row[0]: row for row in table}
        assert "penguins.md" in rows and "notes.txt" not in rows
        assert rows["penguins.md"][1].startswith("you, ")
        assert {r[0] for r in before} <= set(rows)  # nothing already stored was lost
        results, note = client.predict("emperor penguins antarctic winter", 3, api_name="/search")
        assert results[0][0] == "penguins.md · chunk 0"
        assert f"snapshot **version {rows['penguins.md'][2]}**" in note
        status, table = client.predict("penguins.md", api_name="/remove")
        assert status.startswith("**Removed** `penguins.md`") and "penguins.md" not in {r[0] for r in table}
    finally:
        client.close()


def test_remove_from_a_client_that_never_loaded_the_page_gets_a_clear_message(url: str) -> None:
    """Before: "Value: X is not in the list of choices: []" (the dropdown's check, for a page never loaded)."""
    client = _client(url)
    try:
        with pytest.raises(_app_error(), match="`nope.md` is not in the knowledge base"):
            client.predict("nope.md", api_name="/remove")
        with pytest.raises(_app_error(), match="`snapshots.md` is a bundled document: you can remove only"):
            client.predict("snapshots.md", api_name="/remove")
    finally:
        client.close()


def test_race_lab_through_the_api(url: str) -> None:
    client = _client(url)
    try:
        label = next(k for k, v in demo_app.EXPERIMENTS.items() if v == "checkpointer_race")
        naive, summary = client.predict(label, 3, False, api_name="/race_lab")
        assert naive and "anomalies" in summary
        fixed, summary = client.predict(label, 3, True, api_name="/race_lab")
        assert fixed == []
        assert "no anomalies" in summary
    finally:
        client.close()


# --------------------------------------------------------------------------------- command line
def _read_until(stream, lines: "queue.Queue[str]") -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put("")  # EOF


def test_share_offline_keeps_serving(kb_dir: Path) -> None:
    """``--share`` on this offline machine: a clear note that no link was made, a warning about --auth,
    and the demo keeps answering locally."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "demo_app.py"), "--share", "--port", str(port), "--embeddings", "hash",
         "--data", str(kb_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_until, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        while True:
            line = lines.get(timeout=180)  # bounded wait for the next line, not a sleep
            seen.append(line)
            assert line, "demo_app.py exited:\n" + "".join(seen)
            if "chatkit demo running at" in line:
                break
        output = "".join(seen)
        assert "WARNING: --share without --auth" in output
        assert "no public share link could be made" in output or "Public link:" in output
        assert "share=True" not in output and "Could not create share link" not in output  # Gradio's launch() hints
        assert proc.poll() is None
        status, body = http_get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "chatkit demo" in body
        client = _client(f"http://127.0.0.1:{port}")
        try:
            # expected bad input: each a clear error for the client, none a traceback in the server's log
            for args, api_name in ((("   ",), "/chat"), (("",  4), "/search"), (("nope.md",), "/remove"),
                                   (([],), "/upload"), (("x", "y"), "/history")):
                with pytest.raises(_app_error()):
                    client.predict(*args, api_name=api_name)
            history, _ = client.predict("still there?", api_name="/chat")
            assert _text(history[0]) == "still there?"
        finally:
            client.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    rest = []
    while (line := lines.get(timeout=30)) != "":  # everything it printed, up to its end
        rest.append(line)
    output = "".join(seen + rest)
    assert "Traceback" not in output, output


def test_the_sweep_forgets_gradios_per_browser_state_of_idle_visitors(kb_dir: Path) -> None:
    """Before: Gradio kept a copy of the page's configuration for every browser and API client that ever
    sent an event (until 10,000 piled up), so the server's memory grew with every visitor, expired or not
    (RSS 847 -> 1,195 MB over 1,000 short sessions)."""
    import datetime

    import chatkit

    app = demo_app.build_demo(fast_config(kb_dir, session_ttl=60.0))
    services = app.chatkit_services
    with serve(app) as base:
        clients = [_client(base) for _ in range(3)]
        try:
            for i, client in enumerate(clients):
                client.predict(f"visitor {i}: what is a lock?", api_name="/chat")
        finally:
            for client in clients:
                client.close()
        holder = app.state_holder
        visitors = [key for key in holder.session_data if key in holder.time_last_used]
        assert len(visitors) >= 3
        fresh = _client(base)  # an active visitor: kept
        try:
            fresh.predict("still here", api_name="/chat")
            kept = set(holder.session_data) - set(visitors)
            an_hour_ago = datetime.datetime.now() - datetime.timedelta(hours=1)
            for key in visitors:  # idle for an hour (longer than session_ttl), without waiting for it
                holder.time_last_used[key] = an_hour_ago
            report = chatkit.run(services.sweep())  # from this thread: the forgetting runs on Gradio's loop
            assert report.ui_states_dropped == len(visitors)
            assert set(holder.session_data) == kept and kept
            history, _ = fresh.predict("and again", api_name="/chat")  # unaffected
            assert [_text(m) for m in history][::2] == ["still here", "and again"]
        finally:
            fresh.close()


def test_auth_protects_the_api(kb_dir: Path) -> None:
    from gradio_client import Client

    app = demo_app.build_demo(fast_config(kb_dir))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               auth=[("ann", "pw")])
    try:
        with pytest.raises(Exception):  # noqa: B017,PT011 - gradio_client raises different types by version
            Client(f"http://127.0.0.1:{port}", verbose=False)
        client = Client(f"http://127.0.0.1:{port}", auth=("ann", "pw"), verbose=False)
        try:
            history, _ = client.predict("hello", api_name="/chat")
            assert _text(history[0]) == "hello"
        finally:
            client.close()
    finally:
        app.close()
        app.chatkit_services.close()
