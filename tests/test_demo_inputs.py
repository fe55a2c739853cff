"""The demo's input checks, session binding, configuration and command line (no server, no model)."""

from __future__ import annotations

import asyncio

import threading
from pathlib import Path

import gradio as gr
import pytest

import demo_app
from demo_app import DemoConfig, SessionBinder, UploadRejected, read_upload, validate_message


# ------------------------------------------------------------------------------------------ messages
@pytest.mark.parametrize("bad", ["", "   ", "\n\t "])
def test_empty_message_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        validate_message(bad, max_chars=10)


def test_over_long_message_names_the_limit() -> None:
    with pytest.raises(ValueError, match=r"11 characters, the limit is 10"):
        validate_message("x" * 11, max_chars=10)
    assert validate_message("x" * 10, max_chars=10) == "x" * 10


def test_non_text_message_is_refused() -> None:
    with pytest.raises(ValueError, match="must be text, got int"):
        validate_message(3, max_chars=10)


# ------------------------------------------------------------------------------------------- uploads
def test_read_upload_returns_name_and_text(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\nhello", encoding="utf-8")
    assert read_upload(path, max_bytes=100) == ("notes.md", "# Notes\n\nhello")


def test_read_upload_strips_a_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode())
    assert read_upload(path, max_bytes=100) == ("bom.txt", "hello")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("slides.pdf", b"%PDF-1.4", r"only \.md and \.txt files"),
        ("script", b"plain", r"only \.md and \.txt files .*no extension"),
        ("big.md", b"x" * 101, r"101 bytes; the limit is 100 bytes"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), r"not valid UTF-8"),
        ("blank.md", b" \n\n ", r"empty"),
        ("nul.txt", b"a\x00b", r"NUL bytes"),
    ],
)
def test_read_upload_rejects_bad_files_with_a_clear_message(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UploadRejected, match=message) as info:
        read_upload(path, max_bytes=100)
    assert str(info.value).startswith(name + ":")
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------- binding
def _counter() -> object:
    n = iter(range(10_000))
    return lambda: f"session-{next(n)}"


async def test_each_browser_session_gets_its_own_chat_session() -> None:
    binder = SessionBinder(create=_counter())
    a, b = gr.Request(session_hash="hash-a"), gr.Request(session_hash="hash-b")
    assert await binder.session_for(a) == await binder.session_for(a) == "session-0"
    assert await binder.session_for(b) == "session-1"
    assert binder.check("session-0", a) == "session-0"
    assert len(binder) == 2


async def test_login_name_is_part_of_the_binding() -> None:
    binder = SessionBinder(create=_counter())
    alice = gr.Request(session_hash="same", username="alice")
    mallory = gr.Request(session_hash="same", username="mallory")
    sid = await binder.session_for(alice)
    assert await binder.session_for(mallory) != sid
    with pytest.raises(PermissionError):
        binder.check(sid, mallory)


@pytest.mark.parametrize("foreign", ["session-0", "session-999", "", None, 42, "x" * 10_000])
async def test_foreign_unknown_or_malformed_ids_are_refused_alike(foreign: object) -> None:
    binder = SessionBinder(create=_counter())
    await binder.session_for(gr.Request(session_hash="owner"))
    with pytest.raises(PermissionError, match="does not belong to this browser session") as info:
        binder.check(foreign, gr.Request(session_hash="intruder"))
    assert len(str(info.value)) < 200  # the id is cut, not echoed in full


@pytest.mark.parametrize("request_", [None, gr.Request(), gr.Request(session_hash="")])
async def test_requests_without_a_browser_session_are_refused(request_: gr.Request | None) -> None:
    binder = SessionBinder(create=_counter())
    with pytest.raises(PermissionError, match="no browser session"):
        await binder.session_for(request_)
    assert binder.release(request_) is None


def test_concurrent_first_messages_create_one_session() -> None:
    created: list[str] = []
    gate = threading.Barrier(8)

    def create() -> str:
        created.append(f"s{len(created)}")
        return created[-1]

    binder = SessionBinder(create=create)
    request = gr.Request(session_hash="tab")
    results: list[str] = []

    def first_message() -> None:
        gate.wait()
        results.append(asyncio.run(binder.session_for(request)))  # each thread with its own event loop

    threads = [threading.Thread(target=first_message) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created == ["s0"]
    assert results == ["s0"] * 8


async def test_release_unbinds_so_the_old_id_is_refused() -> None:
    binder = SessionBinder(create=_counter())
    tab = gr.Request(session_hash="tab")
    sid = await binder.session_for(tab)
    assert binder.release(tab) == sid
    assert binder.peek(tab) is None
    with pytest.raises(PermissionError):
        binder.check(sid, tab)
    assert len(binder) == 0


# -------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": "bert"}, "embeddings must be 'minilm' or 'hash', got 'bert'"),
        ({"latency": -1.0}, "latency must be >= 0 seconds, got -1.0"),
        ({"latency": float("nan")}, "latency must be >= 0 seconds, got nan"),
        ({"max_message_chars": 0}, "max_message_chars must be >= 1, got 0"),
        ({"max_upload_bytes": -5}, "max_upload_bytes must be >= 1, got -5"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DemoConfig(**kwargs)  # type: ignore[arg-type]


def test_config_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATKIT_DEMO_EMBEDDINGS", "hash")
    monkeypatch.setenv("CHATKIT_DEMO_DATA", str(tmp_path))
    monkeypatch.setenv("CHATKIT_DEMO_LATENCY", "0.25")
    config = DemoConfig.from_env()
    assert (config.embeddings, config.data_dir, config.latency) == ("hash", tmp_path, 0.25)
    monkeypatch.setenv("CHATKIT_DEMO_DATA", "-")
    assert DemoConfig.from_env().data_dir is None


# ------------------------------------------------------------------------------------- command line
def test_command_line_defaults() -> None:
    args = demo_app.parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert args.data == demo_app.DEFAULT_DATA_DIR and args.model is None and args.embeddings == "minilm"


def test_command_line_options(tmp_path: Path) -> None:
    args = demo_app.parse_args(
        ["--host", "0.0.0.0", "--port", "8000", "--share", "--auth", "ann:s3:cret", "--data", str(tmp_path)]
    )
    assert (args.host, args.port, args.share, args.auth, args.data) == (
        "0.0.0.0", 8000, True, ("ann", "s3:cret"), tmp_path
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--auth", "nopassword"], "--auth must be USER:PASS"),
        (["--auth", ":pw"], "--auth must be USER:PASS"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--data", "/no/such/dir"], "--data /no/such/dir is not a directory"),
        (["--model", "/no/such/model"], "--model /no/such/model is not a directory"),
        (["--embeddings", "bert"], "invalid choice"),
    ],
)
def test_bad_command_lines_exit_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        demo_app.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_building_the_demo_loads_nothing_heavy() -> None:
    services = demo_app.DemoServices(DemoConfig(embeddings="hash", data_dir=None))
    app = demo_app.build_demo(services=services)
    assert isinstance(app, gr.Blocks)
    assert not services.is_ready and services.store is None and services.manager is None
    assert isinstance(demo_app.demo, gr.Blocks)  # the module-level demo, built at import
    with pytest.raises(ValueError, match="not both"):
        demo_app.build_demo(DemoConfig(), services=services)
