"""The demo's input checks, session binding and signed tokens, configuration and command line (no server,
no model)."""

from __future__ import annotations

import asyncio

import threading
from pathlib import Path

import gradio as gr
import pytest

import demo_app
from chatkit_demo.tokens import TokenSigner
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
    return lambda: f"session-{next(n):08d}"


async def test_each_browser_session_gets_its_own_chat_session() -> None:
    binder = SessionBinder(create=_counter())
    a, b = gr.Request(session_hash="hash-a"), gr.Request(session_hash="hash-b")
    assert await binder.session_for(a) == await binder.session_for(a) == "session-00000000"
    assert await binder.session_for(b) == "session-00000001"
    assert binder.check("session-00000000", a) == "session-00000000"
    assert len(binder) == 2


async def test_login_name_is_part_of_the_binding() -> None:
    binder = SessionBinder(create=_counter())
    alice = gr.Request(session_hash="same", username="alice")
    mallory = gr.Request(session_hash="same", username="mallory")
    sid = await binder.session_for(alice)
    assert await binder.session_for(mallory) != sid
    with pytest.raises(PermissionError):
        binder.check(sid, mallory)


@pytest.mark.parametrize("foreign", ["session-00000000", "session-00000999", "", None, 42, "x" * 10_000])
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


# ----------------------------------------------------------------------------- tokens a browser keeps
KEY = b"k" * 32


async def test_a_reload_claims_the_conversation_back_with_its_signed_token() -> None:
    binder = SessionBinder(create=_counter(), signer=TokenSigner(KEY))
    before = gr.Request(session_hash="page-1")
    sid = await binder.session_for(before)
    saved = binder.saved(before)
    assert sid not in str(saved["session"]).split(".")[1:]  # the id travels signed, never alone
    visitor = binder.visitor(before)
    binder.release(before)  # the reload unloads the old page
    after = gr.Request(session_hash="page-2")
    restored = binder.restore(saved, after)
    assert (restored.session, restored.visitor, restored.refused) == (sid, visitor, False)
    assert binder.check(sid, after) == sid


def _forgeries(signer: TokenSigner, sid: str) -> dict[str, object]:
    token = signer.sign("session", sid, user=None)
    value, mac = token.split(".")
    other = TokenSigner(b"o" * 32)
    return {
        "raw id (what the demo kept before)": sid,
        "altered mac": f"{value}.{mac[:-2]}AA",
        "another id, the same mac": f"{'A' * len(value)}.{mac}",
        "a visitor token": signer.sign("visitor", sid, user=None),
        "another login's token": signer.sign("session", sid, user="mallory"),
        "another server's token": other.sign("session", sid, user=None),
        "not a string": 12345,
        "huge": "x" * 100_000,
    }


@pytest.mark.parametrize("kind", list(_forgeries(TokenSigner(KEY), "s" * 22)))
async def test_forged_or_foreign_tokens_are_refused_and_bind_nothing(kind: str) -> None:
    """A visitor who copies, alters or invents a token gets nothing: the page stays without a session and
    the victim's session id is refused for it."""
    signer = TokenSigner(KEY)
    binder = SessionBinder(create=lambda: "v" * 22, signer=signer)
    victim = gr.Request(session_hash="victim")
    sid = await binder.session_for(victim)
    forged = _forgeries(signer, sid)[kind]
    intruder = gr.Request(session_hash="intruder")
    restored = binder.restore({"session": forged, "visitor": None}, intruder)
    assert restored.session is None and restored.refused
    with pytest.raises(PermissionError, match="does not belong to this browser session"):
        binder.check(sid, intruder)


async def test_a_token_is_valid_only_for_the_login_it_was_issued_to() -> None:
    binder = SessionBinder(create=lambda: "a" * 22, signer=TokenSigner(KEY))
    alice = gr.Request(session_hash="shared-pc", username="alice")
    sid = await binder.session_for(alice)
    saved = binder.saved(alice)
    bob = gr.Request(session_hash="shared-pc-later", username="bob")  # the next student on the same browser
    restored = binder.restore(saved, bob)
    assert restored.session is None and restored.refused
    assert restored.visitor != binder.visitor(alice)
    assert binder.restore(saved, gr.Request(session_hash="alice-again", username="alice")).session == sid


def test_token_signer_refuses_short_keys_and_unsignable_values() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes, got 5"):
        TokenSigner(b"short")
    with pytest.raises(ValueError, match="url-safe ids"):
        TokenSigner(KEY).sign("session", "has.a.dot.in.it.and.more", user=None)
    assert "kkkk" not in repr(TokenSigner(KEY))


# ----------------------------------------------------------------------------------- bounded memory
async def test_the_binder_keeps_at_most_max_pages_least_recently_seen_first() -> None:
    binder = SessionBinder(create=_counter(), max_pages=3)
    pages = [gr.Request(session_hash=f"p{i}") for i in range(5)]
    for page in pages[:3]:
        await binder.session_for(page)
    binder.visitor(pages[0])  # seen again: p1 is now the least recently seen
    for page in pages[3:]:
        await binder.session_for(page)
    assert len(binder) == 3
    assert binder.peek(pages[0]) is not None and binder.peek(pages[1]) is None and binder.peek(pages[2]) is None


async def test_sweep_forgets_idle_pages_and_retain_unbinds_expired_sessions(fake_clock) -> None:  # noqa: ANN001
    binder = SessionBinder(create=_counter(), ttl=60.0, clock=fake_clock)
    idle, busy = gr.Request(session_hash="idle"), gr.Request(session_hash="busy")
    idle_sid = await binder.session_for(idle)
    await fake_clock.advance_and_settle(30)
    busy_sid = await binder.session_for(busy)
    await fake_clock.advance_and_settle(31)
    assert binder.sweep() == 1 and len(binder) == 1  # idle: 61 s without a visit
    assert binder.peek(busy) == busy_sid
    assert binder.retain([]) == 1  # the manager says busy's session expired meanwhile
    assert binder.peek(busy) is None
    assert idle_sid != busy_sid


async def test_the_outbox_holds_one_message_until_a_reply_takes_it(fake_clock) -> None:  # noqa: ANN001
    binder = SessionBinder(create=_counter(), clock=fake_clock)
    page = gr.Request(session_hash="page")
    assert binder.post(page, "first", busy=lambda: False)
    assert not binder.post(page, "second", busy=lambda: False)  # the first waits for its reply event
    assert binder.take(page) == "first" and binder.take(page) is None
    assert not binder.post(page, "third", busy=lambda: True)  # a reply is being written
    assert binder.post(page, "fourth", busy=lambda: False)
    await fake_clock.advance_and_settle(61)  # its reply event never came (the tab closed): stale
    assert binder.post(page, "fifth", busy=lambda: False) and binder.take(page) == "fifth"


# -------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": "bert"}, "embeddings must be 'minilm' or 'hash', got 'bert'"),
        ({"latency": -1.0}, "latency must be >= 0 seconds, got -1.0"),
        ({"latency": float("nan")}, "latency must be >= 0 seconds, got nan"),
        ({"max_message_chars": 0}, "max_message_chars must be >= 1, got 0"),
        ({"max_upload_bytes": -5}, "max_upload_bytes must be >= 1, got -5"),
        ({"max_turns": 0}, "max_turns must be >= 1, got 0"),
        ({"session_ttl": 0}, "session_ttl must be > 0 seconds, got 0"),
        ({"max_documents": 0}, "max_documents must be >= 1, got 0"),
        ({"secret_key": b"short"}, "secret_key must have at least 16 bytes, got 5"),
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
    monkeypatch.setenv("CHATKIT_DEMO_SECRET", "a-key-the-operator-keeps")
    config = DemoConfig.from_env()
    assert config.secret_key == b"a-key-the-operator-keeps"
    assert "operator" not in repr(config)  # never printed


# ------------------------------------------------------------------------------------- command line
def test_command_line_defaults() -> None:
    args = demo_app.parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert args.data == demo_app.DEFAULT_DATA_DIR and args.model is None and args.embeddings == "minilm"


def test_command_line_options(tmp_path: Path) -> None:
    args = demo_app.parse_args(
        ["--host", "0.0.0.0", "--port", "8000", "--share", "--auth", "ann:s3:cret", "--data", str(tmp_path),
         "--auth", "bob:pw", "--admin", "ann", "--max-turns", "10", "--session-ttl", "90", "--max-sessions", "7",
         "--sweep-interval", "5"]
    )
    assert (args.host, args.port, args.share, args.auth, args.data) == (
        "0.0.0.0", 8000, True, [("ann", "s3:cret"), ("bob", "pw")], tmp_path
    )
    config = demo_app.config_from_args(args)
    assert (config.admins, config.max_turns, config.session_ttl, config.max_sessions, config.sweep_interval) == (
        frozenset({"ann"}), 10, 90, 7, 5
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
        (["--admin", "ann"], "--admin ann: there is no --auth login named 'ann'"),
        (["--auth", "bob:pw", "--admin", "ann"], "--admin ann: there is no --auth login named 'ann'"),
        (["--max-turns", "0"], "max_turns must be >= 1, got 0"),
        (["--sweep-interval", "0"], "sweep_interval must be > 0 seconds, got 0.0"),
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
