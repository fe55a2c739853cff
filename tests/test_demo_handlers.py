"""The Chat tab's handlers called directly (no server): streaming, stop, reload restore, errors, limits,
expiry, double texting, isolation and the API.

Each test builds its own services (hash embeddings, a three-file knowledge base): nothing is shared
between tests, and no model is loaded. Replies are held, where a test needs a pending reply, by the
model's latency hook (an ``asyncio.Event`` the test sets), never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

import demo_app
from chatkit_demo.chat import CURSOR, WRITING
from demo_app import DemoHandlers, DemoServices
from tests.conftest import FakeClock
from tests.test_demo_harness import fast_config, small_kb


class Holds:
    """The model's latency hook: a reply to a message starting with ``HOLD`` waits until the test releases
    it; any other reply comes at once. ``started[text]`` is set when that reply's model call began."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}

    def __call__(self, text: str) -> Any:
        if not text.startswith("HOLD"):
            return 0
        self.started.setdefault(text, asyncio.Event()).set()
        return self.gates.setdefault(text, asyncio.Event()).wait()

    async def wait_started(self, text: str) -> None:
        await self.started.setdefault(text, asyncio.Event()).wait()

    def release(self, text: str) -> None:
        self.gates.setdefault(text, asyncio.Event()).set()


@pytest.fixture
def holds() -> Holds:
    return Holds()


@pytest.fixture
def make_services(tmp_path: Path, holds: Holds) -> Callable[..., DemoServices]:
    def make(**overrides: Any) -> DemoServices:
        clock = overrides.pop("clock", None)
        config = fast_config(small_kb(tmp_path / "kb"), burst_latency=0.05, token_delay=0.0, **overrides)
        return DemoServices(config, latency=holds, **({"clock": clock} if clock is not None else {}))

    return make


@pytest.fixture
def services(make_services: Callable[..., DemoServices]) -> DemoServices:
    return make_services()


@pytest.fixture
async def chat(services: DemoServices) -> DemoHandlers:
    await services.ready()  # loaded (the tests of the loading state build their own)
    return DemoHandlers(services)


def tab(name: str, user: str | None = None) -> gr.Request:
    """A request from the browser tab ``name`` (logged in as ``user`` under --auth)."""
    return gr.Request(session_hash=f"tab-{name}", username=user)


def is_skip(value: object) -> bool:
    return value == gr.skip()


async def send(chat: DemoHandlers, text: str, page: gr.Request, saved: object = None) -> dict[str, Any]:
    """Type ``text`` and press Enter on ``page``: the prepare step, then every update the reply streams."""
    box, view, notice, saved_out, stop = await chat.prepare(text, saved, page)
    updates = [u async for u in chat.reply(saved_out if isinstance(saved_out, dict) else saved, page)]
    final = next((u for u in reversed(updates) if not is_skip(u[0])), (None,) * 4)
    return {
        "box": box, "first_view": view, "prepare_notice": notice, "saved": saved_out, "updates": updates,
        "chatbot": final[0], "sources": final[1], "notice": updates[-1][2] if updates else None,
    }


def texts(view: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in view]


# ------------------------------------------------------------------------------------------ chat
async def test_a_reply_streams_word_by_word_and_names_its_source(chat: DemoHandlers) -> None:
    sent = await send(chat, "What is a lost update?", tab("a"))
    assert sent["box"] == "" and sent["prepare_notice"] == ""
    assert texts(sent["first_view"]) == ["What is a lost update?", WRITING]  # the message moved into the chat
    partials = [u[0][-1]["content"] for u in sent["updates"] if not is_skip(u[0]) and u[0][-1]["content"].endswith(CURSOR)]
    assert len(partials) > 5  # token by token
    assert all(len(a) < len(b) for a, b in zip(partials, partials[1:]))
    final = sent["chatbot"]
    assert [m["role"] for m in final] == ["user", "assistant"]
    assert final[1]["content"].startswith("According to lost-updates.md: A lost update happens")
    assert final[1]["content"] == partials[-1].removesuffix(CURSOR)
    assert "`lost-updates.md`" in sent["sources"]
    assert sent["updates"][-1][3] == gr.update(interactive=False)  # Stop is off again


@pytest.mark.parametrize(("message", "error"), [("   ", "The message is empty"), ("y" * 2001, "the limit is 2,000")])
async def test_a_bad_message_gets_one_plain_notice_and_keeps_the_box(chat: DemoHandlers, message: str, error: str) -> None:
    """The page used to raise gr.Error, which left "Error" badges over the conversation, the sources and
    the message box; now the page gets a notice and every other output is left alone (the box keeps
    what was typed)."""
    await send(chat, "hello", tab("a"))
    before, *_ = await chat.restore(None, tab("a"))
    box, view, notice, _, stop = await chat.prepare(message, None, tab("a"))
    assert error in notice
    assert is_skip(box) and is_skip(view) and is_skip(stop)
    updates = [u async for u in chat.reply(None, tab("a"))]
    assert all(is_skip(v) for u in updates for v in u)  # nothing was posted: the reply event does nothing
    after, *_ = await chat.restore(None, tab("a"))
    assert after == before
    sent = await send(chat, "What is a snapshot?", tab("a"))  # and the next send works
    assert sent["notice"] == "" and texts(sent["chatbot"])[-2] == "What is a snapshot?"


async def test_a_second_message_while_a_reply_is_pending_stays_in_the_box(chat: DemoHandlers, holds: Holds) -> None:
    page = tab("a")
    box, *_ = await chat.prepare("HOLD first", None, page)
    reply = asyncio.create_task(_drain(chat.reply(None, page)))
    await holds.wait_started("HOLD first")
    box2, view2, notice, _, _ = await chat.prepare("typed meanwhile", None, page)
    assert is_skip(box2) and is_skip(view2) and "still being written" in notice
    holds.release("HOLD first")
    updates = await reply
    assert texts(updates[-1][0])[0] == "HOLD first" and len(updates[-1][0]) == 2
    assert all(len(u) == 4 for u in updates)  # (chatbot, sources, notice, stop): never the message box


async def test_stop_discards_the_turn_atomically_and_says_so(chat: DemoHandlers, services: DemoServices, holds: Holds) -> None:
    page = tab("a")
    await send(chat, "What is a snapshot?", page)
    before = await services.manager.get_history(await chat.api_session(page))
    await chat.prepare("HOLD stop me", None, page)
    updates: list[Any] = []
    reply = asyncio.create_task(_drain(chat.reply(None, page), into=updates))
    await holds.wait_started("HOLD stop me")
    assert texts(updates[-1][0])[-2:] == ["HOLD stop me", WRITING]  # pending, shown as such
    assert await chat.stop(page) == gr.skip()  # returns once the turn was rolled back
    await reply
    view, _, notice, stop = updates[-1]
    assert "discarded" in notice and stop == gr.update(interactive=False)
    assert "Stopped" in view[-1]["content"] and "HOLD stop me" in view[-1]["content"]
    assert await services.manager.get_history(await chat.api_session(page)) == before  # nothing half-written
    assert services.manager.statistics().cancelled == 1
    assert await chat.stop(page) == "Nothing to stop: no reply is being written."
    sent = await send(chat, "And a lost update?", page)  # the session is free for the next message
    assert texts(sent["chatbot"])[-2] == "And a lost update?"


async def test_stop_while_the_knowledge_base_is_still_loading(make_services: Callable[..., DemoServices]) -> None:
    services = make_services()
    chat = DemoHandlers(services)
    gate = asyncio.Event()
    real_ready = services.ready

    async def slow_ready() -> DemoServices:
        await gate.wait()
        return await real_ready()

    services.ready = slow_ready  # type: ignore[method-assign]
    page = tab("a")
    _, view, *_ = await chat.prepare("What is a snapshot?", None, page)
    assert "knowledge base" in view[-1]["content"]
    updates: list[Any] = []
    reply = asyncio.create_task(_drain(chat.reply(None, page), into=updates))
    while not updates:
        await asyncio.sleep(0)
    assert updates[-1][2] == "Loading the knowledge base…"
    await chat.stop(page)
    await reply
    assert "discarded" in updates[-1][2]
    gate.set()
    await real_ready()
    assert await services.manager.get_history(await chat.api_session(page)) == []


async def _drain(agen: Any, into: list[Any] | None = None) -> list[Any]:
    out = into if into is not None else []
    async for item in agen:
        out.append(item)
    return out


# ------------------------------------------------------------------------------------ reload restore
async def test_a_reload_restores_the_conversation_from_the_browsers_token(chat: DemoHandlers) -> None:
    first = tab("before-reload")
    sent = await send(chat, "What is a lost update?", first)
    saved = sent["saved"]
    await chat.unload(first)  # the reload unloads the page...
    view, note, saved_again, notice = await chat.restore(saved, tab("after-reload"))  # ...and loads it anew
    assert texts(view) == texts(sent["chatbot"]) and notice == ""
    assert "1 of 50 messages used" in note
    assert saved_again["session"] == saved["session"]
    sent = await send(chat, "And a snapshot?", tab("after-reload"), saved_again)
    assert texts(sent["chatbot"])[::2] == ["What is a lost update?", "And a snapshot?"]


async def test_another_browser_starts_empty_and_a_forged_token_is_refused(chat: DemoHandlers) -> None:
    victim = await send(chat, "my secret is 42", tab("victim"))
    view, _, saved, notice = await chat.restore(None, tab("stranger"))
    assert view == [] and notice == "" and saved["session"] is None
    sid = str(victim["saved"]["session"]).split(".")[0]
    for forged in (sid, f"{sid}.{'A' * 43}", victim["saved"]["visitor"]):
        view, _, saved, notice = await chat.restore({"session": forged}, tab("stranger"))
        assert view == [] and "could not be restored" in notice and saved["session"] is None
    stranger = await send(chat, "what is my secret?", tab("stranger"))
    assert all("42" not in t for t in texts(stranger["chatbot"]))


async def test_a_token_from_an_earlier_start_is_refused(make_services: Callable[..., DemoServices]) -> None:
    old = DemoHandlers(make_services())
    saved = (await send(old, "hello", tab("a")))["saved"]
    restarted = DemoHandlers(make_services())  # a new random key
    view, _, fresh, notice = await restarted.restore(saved, tab("a"))
    assert view == [] and "could not be restored" in notice and fresh["session"] is None


async def test_an_operator_key_keeps_tokens_valid_across_a_restart(make_services: Callable[..., DemoServices]) -> None:
    key = b"a-key-the-operator-keeps"
    old = make_services(secret_key=key)
    saved = (await send(DemoHandlers(old), "hello", tab("a")))["saved"]
    restarted = make_services(secret_key=key)
    _, _, _, notice = await DemoHandlers(restarted).restore(saved, tab("a"))
    assert "expired" in notice  # the token is valid; the conversation was in the old process's memory


# ------------------------------------------------------------------------------------ bounded memory
async def test_a_conversation_takes_at_most_max_turns_messages(make_services: Callable[..., DemoServices]) -> None:
    chat = DemoHandlers(make_services(max_turns=3))
    page = tab("a")
    for i in range(3):
        await send(chat, f"question {i}", page)
    box, view, notice, _, _ = await chat.prepare("one too many", None, page)
    assert "limit of 3 messages" in notice and "New chat" in notice and is_skip(box) and is_skip(view)
    with pytest.raises(gr.Error, match="limit of 3 messages"):
        await chat.api_send(await chat.api_session(page), "via the API", page)
    _, _, _, notice, _ = await chat.ui_double_text("burst", 2, "enqueue", None, page)
    assert "limit of 3 messages" in notice
    view, note, *_ = await chat.new_conversation(None, page)
    assert view == [] and "0 of 3" in note
    assert (await send(chat, "a fresh start", page))["notice"] == ""


async def test_old_checkpoints_are_pruned(chat: DemoHandlers, services: DemoServices) -> None:
    page = tab("a")
    for i in range(12):
        await send(chat, f"question {i}: what is a snapshot?", page)
    sid = await chat.api_session(page)
    kept = [c async for c in services.manager.checkpointer.alist({"configurable": {"thread_id": sid}})]
    assert len(kept) <= 4


async def test_idle_conversations_expire_and_their_bindings_are_forgotten(make_services: Callable[..., DemoServices]) -> None:
    """Before: the browser-to-session map kept 100 entries while the manager held 20. Now a sweep expires
    idle conversations (their checkpoints deleted) and forgets the pages that held them."""
    clock = FakeClock(start=1_000_000.0)
    services = make_services(session_ttl=60.0, clock=clock)
    chat = DemoHandlers(services)
    for i in range(20):
        await send(chat, f"hello from {i}", tab(f"idle-{i}"))
    saved = (await send(chat, "hello", tab("returning")))["saved"]
    assert len(await services.manager.list_sessions()) == 21 and len(services.binder) == 21
    clock.advance(30)
    await send(chat, "still here", tab("active"))
    clock.advance(31)
    report = await services.sweep()
    assert (report.expired, report.sessions) == (21, 1)
    assert report.pages_dropped == 21 and len(services.binder) == 1
    assert await services.manager.list_sessions() == [await chat.api_session(tab("active"))]
    view, _, fresh, notice = await chat.restore(saved, tab("returning"))  # comes back after the expiry
    assert view == [] and "expired after 1 minute without messages" in notice and fresh["session"] is None


def _fake_ui(ages: dict[str, float]) -> Any:
    """A stand-in for a launched Gradio app: its state holder with one state per browser, idle ``ages`` seconds."""
    import datetime
    import threading
    from types import SimpleNamespace

    now = datetime.datetime.now()
    holder = SimpleNamespace(
        session_data={key: object() for key in ages},
        time_last_used={key: now - datetime.timedelta(seconds=age) for key, age in ages.items()},
        lock=threading.Lock(),
    )
    return SimpleNamespace(state_holder=holder)


async def test_the_sweep_forgets_gradios_state_of_idle_browsers_only(make_services: Callable[..., DemoServices]) -> None:
    services = make_services(session_ttl=60.0)
    app = _fake_ui({"idle": 3600.0, "active": 5.0})
    services.attach_ui(app)
    assert (await services.sweep()).ui_states_dropped == 0  # no event seen yet: the loop to use is unknown
    services.note_ui_loop()  # as the handlers do, on Gradio's loop (here: this one)
    report = await services.sweep()
    assert report.ui_states_dropped == 1 and set(app.state_holder.session_data) == {"active"}


async def test_a_stopped_gradio_loop_never_holds_up_the_sweep(
    make_services: Callable[..., DemoServices], monkeypatch: pytest.MonkeyPatch
) -> None:
    import chatkit_demo.services

    services = make_services(session_ttl=60.0)
    app = _fake_ui({"idle": 3600.0})
    services.attach_ui(app)
    stopped = asyncio.new_event_loop()  # not running, not closed: what it is asked to do never runs
    try:
        services._ui_loop = stopped
        monkeypatch.setattr(chatkit_demo.services, "UI_SWEEP_TIMEOUT", 0.05)
        report = await services.sweep()
        assert report.ui_states_dropped == 0 and "idle" in app.state_holder.session_data
    finally:
        stopped.close()


async def test_the_per_request_bookkeeping_is_empty_between_replies(chat: DemoHandlers, holds: Holds) -> None:
    await send(chat, "one", tab("a"))
    await chat.prepare("HOLD two", None, tab("a"))
    reply = asyncio.create_task(_drain(chat.reply(None, tab("a"))))
    await holds.wait_started("HOLD two")
    assert len(chat.running) == 1 and len(chat.budget) == 1
    holds.release("HOLD two")
    await reply
    assert len(chat.running) == 0 and len(chat.budget) == 0


# ------------------------------------------------------------------------------------ isolation, API
async def test_concurrent_messages_of_one_tab_all_land_in_order_of_arrival(chat: DemoHandlers) -> None:
    questions = [f"question {i}: what is a snapshot?" for i in range(5)]
    await asyncio.gather(*(chat.api_chat(t, tab("a")) for t in questions))
    history = await chat.api_history(await chat.api_session(tab("a")), tab("a"))
    assert [m["content"] for m in history[::2]] == questions
    assert [m["role"] for m in history] == ["user", "assistant"] * 5


async def test_tabs_are_isolated(chat: DemoHandlers) -> None:
    await chat.api_chat("my secret is 42", tab("alice"))
    bob, *_ = await chat.restore(None, tab("bob"))
    assert bob == []
    alice_id = await chat.api_session(tab("alice"))
    assert await chat.api_session(tab("bob")) != alice_id
    with pytest.raises(gr.Error, match="does not belong to this browser session"):
        await chat.api_history(alice_id, tab("bob"))
    with pytest.raises(gr.Error, match="does not belong to this browser session"):
        await chat.api_send(alice_id, "overwrite", tab("bob"))
    alice = await chat.api_history(alice_id, tab("alice"))
    assert [m["content"] for m in alice][::2] == ["my secret is 42"]


async def test_api_chat_answers_with_sources(chat: DemoHandlers) -> None:
    history, note = await chat.api_chat("What is a lost update?", tab("a"))
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert "lost-updates.md" in history[1]["content"] and "`lost-updates.md`" in note


async def test_a_request_without_a_browser_session_is_refused(chat: DemoHandlers) -> None:
    with pytest.raises(gr.Error, match="no browser session"):
        await chat.api_chat("hi", gr.Request())
    _, _, notice, _, _ = await chat.prepare("hi", None, gr.Request())
    assert "no browser session" in notice


@pytest.mark.parametrize(("message", "error"), [("  ", "empty"), ("y" * 2001, "the limit is 2,000")])
async def test_bad_messages_change_nothing(chat: DemoHandlers, message: str, error: str) -> None:
    await chat.api_chat("hello", tab("a"))
    sid = await chat.api_session(tab("a"))
    before = await chat.api_history(sid, tab("a"))
    with pytest.raises(gr.Error, match=error):
        await chat.api_chat(message, tab("a"))
    with pytest.raises(gr.Error, match=error):
        await chat.api_double_text(message, 2, "enqueue", tab("a"))
    _, _, _, notice, _ = await chat.ui_double_text(message, 2, "enqueue", None, tab("a"))
    assert error in notice
    assert await chat.api_history(sid, tab("a")) == before


async def test_unload_forgets_the_page_but_keeps_the_conversation(chat: DemoHandlers, services: DemoServices) -> None:
    saved = (await send(chat, "hello", tab("a")))["saved"]
    sid = await chat.api_session(tab("a"))
    await chat.unload(tab("a"))
    assert len(services.binder) == 0
    assert sid in await services.manager.list_sessions()  # a reload claims it back (see above)
    view, *_ = await chat.restore(saved, tab("a"))
    assert texts(view)[0] == "hello"
    await chat.unload(gr.Request())  # a request without a session: nothing to do


async def test_new_conversation_deletes_the_old_one(chat: DemoHandlers, services: DemoServices) -> None:
    await send(chat, "hello", tab("a"))
    old = await chat.api_session(tab("a"))
    view, note, saved, notice, sources = await chat.new_conversation(None, tab("a"))
    assert view == [] and saved["session"] is None and sources == ""
    assert old not in await services.manager.list_sessions()
    assert await chat.api_session(tab("a")) != old


async def test_an_expired_session_is_replaced_with_a_clear_message(chat: DemoHandlers, services: DemoServices) -> None:
    sid = await chat.api_session(tab("a"))
    await services.manager.delete_session(sid)  # what expiry does
    box, view, notice, _, _ = await chat.prepare("still there?", None, tab("a"))
    assert "expired" in notice and is_skip(box)
    sent = await send(chat, "still there?", tab("a"))
    assert texts(sent["chatbot"])[::2] == ["still there?"]


# ------------------------------------------------------------------------------------ double texting
EXPECTED = {
    "enqueue": ["answered", "answered", "answered"],
    "reject": ["answered", "rejected", "rejected"],
    "interrupt": ["interrupted", "superseded", "answered"],
    "rollback": ["superseded", "superseded", "answered"],
}


@pytest.mark.parametrize("policy", list(EXPECTED))
async def test_double_texting_shows_what_each_policy_did(chat: DemoHandlers, policy: str) -> None:
    history, rows, explanation = await chat.double_text("What is a lost update?", 3, policy, tab(policy))
    assert [r[0] for r in rows] == [f"What is a lost update? (#{i} of 3)" for i in (1, 2, 3)]
    assert [r[1].split(" ")[0].rstrip(":") for r in rows] == EXPECTED[policy]
    assert explanation.startswith(f"**{policy}**")
    users = [m["content"] for m in history if m["role"] == "user"]
    kept = {"enqueue": [1, 2, 3], "reject": [1], "interrupt": [1, 3], "rollback": [3]}[policy]
    assert users == [f"What is a lost update? (#{i} of 3)" for i in kept]
    for row in rows:  # an answered message shows its reply; the others none
        assert bool(row[2]) == row[1].startswith("answered")


def test_the_double_texting_panel_says_what_each_policy_does_to_waiting_messages() -> None:
    from chatkit_demo.config import POLICIES, POLICY_SUMMARY

    lines = {line.split("**")[1]: line for line in POLICY_SUMMARY.replace("\n  ", " ").splitlines()}
    assert set(lines) == set(POLICIES)
    assert "waiting keep their place" in lines["enqueue"] and "waiting keep their place" in lines["reject"]
    assert "waiting are dropped" in lines["interrupt"] and "waiting are dropped" in lines["rollback"]


async def test_double_texting_slows_only_its_own_turns(chat: DemoHandlers, services: DemoServices) -> None:
    assert services._latency("anything") == 0  # outside a burst: the hook's answer
    await chat.double_text("hi", 2, "enqueue", tab("a"))
    assert demo_app._BURST.get() is None


@pytest.mark.parametrize(
    ("count", "policy", "error"),
    [(0, "enqueue", "between 1 and 5"), (6, "enqueue", "between 1 and 5"), (2, "shout", "Unknown policy")],
)
async def test_double_texting_bad_controls(chat: DemoHandlers, count: int, policy: str, error: str) -> None:
    with pytest.raises(gr.Error, match=error):
        await chat.api_double_text("hi", count, policy, tab("a"))
    _, table, _, notice, _ = await chat.ui_double_text("hi", count, policy, None, tab("a"))
    assert error in notice and is_skip(table)


# ------------------------------------------------------------------------------------ page wiring
def test_the_reply_event_never_writes_the_message_box() -> None:
    """Before: the chat handler returned "" for the box when the reply arrived, erasing what was typed
    meanwhile. Now only the quick first step (prepare) clears it; the streaming step has no such output."""
    app = demo_app.build_demo(fast_config(None))
    deps = {fn.fn.__name__: fn for fn in app.fns.values() if getattr(fn.fn, "__name__", None) in ("prepare", "reply")}
    outputs = {name: [getattr(c, "elem_id", None) for c in dep.outputs] for name, dep in deps.items()}
    assert "message" in outputs["prepare"]
    assert "message" not in outputs["reply"] and "chatbot" in outputs["reply"]
    assert all(dep.show_progress == "hidden" for dep in deps.values())


async def test_the_page_never_raises_for_what_a_visitor_can_do_wrong(chat: DemoHandlers) -> None:
    """Every problem the page can cause comes back as a notice (gr.Error would cover the outputs with badges)."""
    page = tab("a")
    assert "empty" in (await chat.prepare("", None, page))[2]
    assert "empty" in (await chat.ui_double_text("", 2, "enqueue", None, page))[3]
    assert "could not be restored" in (await chat.restore({"session": "garbage"}, page))[3]
    assert "Nothing to stop" in await chat.stop(page)
    assert "new conversation" in (await chat.new_conversation(None, page))[3]
