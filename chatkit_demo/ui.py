"""The Gradio UI: :func:`build_demo` lays out the three tabs and wires their events to the handlers."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .chat import DemoHandlers
from .config import ALLOWED_SUFFIXES, CHAT_LIMIT, POLICIES, POLICY_HELP, POLICY_SUMMARY, DemoConfig
from .knowledge import KnowledgeHandlers
from .racelab import EXPERIMENTS, RaceLabHandlers
from .services import DemoServices
from .tables import CSS as TABLE_CSS

# ---------------------------------------------------------------------------------------------- UI
INTRO = """# chatkit demo: chat that stays correct under concurrency
Your conversation is private to this browser. Send several messages at once, share documents with the
class while others chat, and watch races happen (and disappear) in the **Race lab**."""

SHARED_NOTE = """**This knowledge base is shared by everyone using the demo.** What you add, every visitor's chat
answers from and every search finds. The table says who added each document and in which version it was
published; it updates by itself. You can replace or remove only what you added{admin}; anyone can put the
bundled documents back with one click."""

STORAGE_KEY = "chatkit-demo-tokens"
KB_REFRESH_SECONDS = 3.0

# Phone (390 px) and desktop: nothing wider than the screen, tables wrap their cells, buttons keep a
# readable width, the conversation is tall enough to read but leaves the message box on screen.
CSS = """
.gradio-container { max-width: 1200px !important; margin: 0 auto; }
#message-row { flex-wrap: wrap; align-items: stretch; gap: 8px; }
#message { flex: 1 1 260px; min-width: 0; }
#chat-buttons { flex: 0 1 auto; flex-wrap: wrap; gap: 8px; min-width: min(100%, 300px); }
#chat-buttons button { min-width: 88px; flex: 1 1 0; }
#chat-notice:empty, #burst-notice:empty { display: none; }
#chat-notice p, #burst-notice p { margin: 4px 0; color: var(--body-text-color); }
#chat-notice, #burst-notice { border-left: 4px solid var(--color-accent); padding-left: 8px; }
#loading-banner { background: var(--color-accent-soft); border-radius: 8px; padding: 4px 12px; }
#chatbot button[aria-label="Clear"] { display: none; }
#lab-controls { flex-wrap: wrap; gap: 8px; }
#lab-controls > * { flex: 1 1 240px; min-width: 0; }
@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
  #chatbot { height: 360px !important; }
}
"""


PAGE_CSS = CSS + TABLE_CSS


def launch_kwargs() -> dict[str, Any]:
    """What every ``launch()`` of the demo passes (the page's CSS), for ``main()`` and tests alike."""
    return {"css": PAGE_CSS}


def _status_view(services: DemoServices) -> tuple[Any, Any]:
    """The "loading the knowledge base" banner and its polling timer (stopped once ready)."""
    status = services.status()
    if status.state == "waiting":  # a demo built but not started (reload mode, tests): start loading now
        services.start()
        status = services.status()
    if status.state == "ready":
        return gr.update(value="", visible=False), gr.Timer(active=False)
    if status.state == "failed":
        return gr.update(value=f"⚠️ **The demo could not start:** {status.error}", visible=True), gr.Timer(active=False)
    text = "⏳ **Loading the knowledge base…** Replies and searches start as soon as it is ready (a few seconds)."
    return gr.update(value=text, visible=True), gr.Timer(active=True)


def build_demo(
    config: DemoConfig | None = None,
    *,
    services: DemoServices | None = None,
    chat_concurrency: int | None = CHAT_LIMIT,
) -> gr.Blocks:
    """Build the Gradio app. Cheap: nothing heavy loads until it is started or first used.

    Example:
        >>> app = build_demo(DemoConfig(embeddings="hash", data_dir=None))
        >>> type(app).__name__
        'Blocks'

    Args:
        config: the configuration (default :meth:`DemoConfig.from_env`), or
        services: ready-made services (shared by several apps, e.g. in the benchmark).
        chat_concurrency: how many chat events may run at once across all visitors (``None``: no
            limit). ``1`` is Gradio's default, the "one global queue" baseline of the benchmark.

    Raises:
        ValueError: both ``config`` and ``services`` given.
    """
    if config is not None and services is not None:
        raise ValueError("pass config or services, not both")
    services = services if services is not None else DemoServices(config)
    chat = DemoHandlers(services)
    kb = KnowledgeHandlers(services)
    lab = RaceLabHandlers(services)
    cfg = services.config
    private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}

    with gr.Blocks(title="chatkit demo", analytics_enabled=False) as blocks:
        saved = gr.BrowserState(
            {"visitor": None, "session": None}, storage_key=STORAGE_KEY,
            secret=services.signer.fingerprint("browser-state", length=32),
        )
        gr.Markdown(INTRO)
        banner = gr.Markdown(elem_id="loading-banner", visible=False)
        status_timer = gr.Timer(1.0, active=True)

        with gr.Tab("Chat", id="chat") as chat_tab:
            session_md = gr.Markdown(elem_id="session-info")
            chatbot = gr.Chatbot(
                show_label=False, height=440, elem_id="chatbot", buttons=["copy"],
                group_consecutive_messages=False,
                placeholder="Ask about race conditions, locks, snapshots, double texting… "
                "Replies quote the shared knowledge base and name their sources.",
            )
            chat_notice = gr.Markdown(elem_id="chat-notice")
            with gr.Row(elem_id="message-row"):
                message = gr.Textbox(
                    placeholder="Type a message and press Enter", show_label=False, max_lines=4,
                    elem_id="message", scale=4, min_width=200,
                )
                with gr.Row(elem_id="chat-buttons", scale=2):
                    send = gr.Button("Send", variant="primary", elem_id="send", min_width=80)
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop", min_width=80)
                    new_chat = gr.Button("New chat", elem_id="new-chat", min_width=80)
            sources = gr.Markdown(elem_id="sources")
            with gr.Accordion("Double texting: send several messages at once", open=False, elem_id="double-text"):
                gr.Markdown(
                    "A visitor who sends a second message before the first is answered is *double texting*. "
                    "chatkit handles it with a policy: what each one does to the answer being written and to "
                    "the messages still waiting:\n\n" + POLICY_SUMMARY,
                    elem_id="policy-table",
                )
                with gr.Row():
                    policy = gr.Radio(list(POLICIES), value="enqueue", label="Policy", elem_id="policy", min_width=240)
                    count = gr.Slider(2, cfg.max_burst, value=min(3, cfg.max_burst), step=1, label="Messages at once",
                                      min_width=200)
                burst_message = gr.Textbox(value="What is a lost update?", label="Message", elem_id="burst-message")
                burst = gr.Button("Send them all at once", elem_id="burst")
                burst_notice = gr.Markdown(elem_id="burst-notice")
                policy_help = gr.Markdown(POLICY_HELP["enqueue"], elem_id="policy-help")
                outcomes = gr.HTML(elem_id="outcomes")

        with gr.Tab("Race lab", id="lab") as lab_tab:
            gr.Markdown(
                "Run a race on private objects: several concurrent requests, without and with chatkit's lock. "
                "Bars show waiting for the lock, holding it and the work; a red **X** marks damage."
            )
            with gr.Row(elem_id="lab-controls"):
                experiment = gr.Dropdown(list(EXPERIMENTS), value=next(iter(EXPERIMENTS)), label="Experiment",
                                         elem_id="experiment", min_width=240)
                requests = gr.Slider(
                    2, 10, value=3, step=1, min_width=200, elem_id="requests",
                    label="Concurrent requests (vector store: chunks of the replaced document)",
                )
                locked = gr.Checkbox(value=False, label="Use chatkit (lock / copy-on-write store)", elem_id="locked",
                                     min_width=200)
            run = gr.Button("Run experiment", variant="primary", elem_id="run-lab")
            lab_summary = gr.Markdown(elem_id="lab-summary")
            plot = gr.Plot(show_label=False, elem_id="lab-plot")
            anomalies = gr.HTML(elem_id="anomalies")

        with gr.Tab("Knowledge base", id="kb") as kb_tab:
            admins = ", ".join(sorted(cfg.admins))
            gr.Markdown(SHARED_NOTE.format(admin=f" (admins: {admins}, any document)" if admins else ""),
                        elem_id="kb-shared")
            kb_version = gr.State(-1)
            kb_timer = gr.Timer(KB_REFRESH_SECONDS, active=False)
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=280):
                    files = gr.File(
                        file_count="multiple", file_types=list(ALLOWED_SUFFIXES), type="filepath",
                        label=f"Add .md or .txt files (UTF-8, at most {cfg.max_upload_bytes // 1024} KiB each)",
                        elem_id="upload", height=160,
                    )
                    add = gr.Button("Add to knowledge base", variant="primary", elem_id="add-docs")
                    upload_status = gr.Markdown(elem_id="upload-status")
                with gr.Column(scale=3, min_width=280):
                    documents = gr.HTML(elem_id="documents")
                    with gr.Row(equal_height=True):
                        to_remove = gr.Dropdown([], label="Remove a document you added", elem_id="remove-choice",
                                                allow_custom_value=True, scale=3, min_width=200)
                        remove = gr.Button("Remove", variant="stop", elem_id="remove", scale=1, min_width=100)
                    restore = gr.Button("Restore the bundled documents", elem_id="restore-bundled", size="sm")
            with gr.Row(equal_height=True):
                query = gr.Textbox(label="Search the knowledge base", elem_id="query", scale=4, min_width=220)
                k = gr.Slider(1, 10, value=4, step=1, label="Results", scale=1, min_width=140)
                search = gr.Button("Search", elem_id="search", scale=1, min_width=100)
            search_note = gr.Markdown(elem_id="search-note")
            results = gr.HTML(elem_id="results")

        # -- events. Chat-like events share one generous pool: sessions run in parallel, a session's
        # turns are serialized by chatkit's per-session lock, not by Gradio's queue. The page's events are
        # private (they take the browser's tokens); API clients use the gr.api endpoints below.
        chat_kw: dict[str, Any] = {"concurrency_id": "chat", "concurrency_limit": chat_concurrency}
        sending = gr.on(
            [message.submit, send.click], chat.prepare, [message, saved], [message, chatbot, chat_notice, saved, stop],
            api_name="ui_prepare", **private, **chat_kw,
        )
        sending.then(chat.reply, [saved], [chatbot, sources, chat_notice, stop], api_name="ui_reply", **private,
                     **chat_kw)
        stop.click(chat.stop, None, [chat_notice], api_name="ui_stop", **private, concurrency_id="stop",
                   concurrency_limit=None)
        new_chat.click(chat.new_conversation, [saved], [chatbot, session_md, saved, chat_notice, sources],
                       api_name="ui_new_chat", **private, **chat_kw)
        burst.click(chat.ui_double_text, [burst_message, count, policy, saved],
                    [chatbot, outcomes, policy_help, burst_notice, saved], api_name="ui_double_text", **private,
                    **chat_kw)
        policy.change(lambda p: POLICY_HELP.get(p, ""), [policy], [policy_help], api_name="ui_policy_help",
                      api_visibility="private", queue=False)
        run.click(lab.ui_run, [experiment, requests, locked], [plot, anomalies, lab_summary], api_name="ui_race_lab",
                  api_visibility="private", concurrency_id="lab", concurrency_limit=2)

        kb_out = [documents, to_remove, kb_version]
        add.click(kb.upload, [files, saved], [upload_status, *kb_out[:2], files, kb_version], api_name="ui_upload",
                  **{**private, "show_progress": "minimal"}, concurrency_id="kb_write", concurrency_limit=4)
        remove.click(kb.remove, [to_remove, saved], [upload_status, *kb_out], api_name="ui_remove", **private,
                     concurrency_id="kb_write", concurrency_limit=4)
        restore.click(kb.restore_bundled, [saved], [upload_status, *kb_out], api_name="ui_restore_bundled",
                      **private, concurrency_id="kb_write", concurrency_limit=4)
        gr.on([query.submit, search.click], kb.search, [query, k], [results, search_note], api_name="ui_search",
              **private, concurrency_id="kb_read", concurrency_limit=None)
        kb_timer.tick(kb.refresh, [kb_version, saved], kb_out, api_name="ui_kb_refresh", **private,
                      concurrency_id="kb_read", concurrency_limit=None)
        kb_tab.select(lambda: gr.Timer(active=True), None, [kb_timer], api_name="ui_kb_tab", **private, queue=False)
        for name, other in (("ui_chat_tab", chat_tab), ("ui_lab_tab", lab_tab)):
            other.select(lambda: gr.Timer(active=False), None, [kb_timer], api_name=name, **private, queue=False)

        blocks.load(chat.restore, [saved], [chatbot, session_md, saved, chat_notice], api_name="ui_restore",
                    **private, **chat_kw)
        blocks.load(kb.documents, [saved], kb_out, api_name="ui_documents", **private, concurrency_id="kb_read",
                    concurrency_limit=None)
        status = lambda: _status_view(services)  # noqa: E731 - one line, two events
        blocks.load(status, None, [banner, status_timer], api_name="ui_status", **private, queue=False)
        status_timer.tick(status, None, [banner, status_timer], api_name="ui_status_tick", **private, queue=False)
        blocks.unload(chat.unload)

        gr.api(chat.api_chat, api_name="chat", **chat_kw)
        gr.api(chat.api_session, api_name="my_session", **chat_kw)
        gr.api(chat.api_history, api_name="history", **chat_kw)
        gr.api(chat.api_send, api_name="send", **chat_kw)
        gr.api(chat.api_double_text, api_name="double_text", **chat_kw)
        gr.api(kb.api_documents, api_name="documents", concurrency_limit=None)
        gr.api(kb.api_upload, api_name="upload", concurrency_id="kb_write", concurrency_limit=4)
        gr.api(kb.api_remove, api_name="remove", concurrency_id="kb_write", concurrency_limit=4)
        gr.api(kb.api_search, api_name="search", concurrency_id="kb_read", concurrency_limit=None)
        gr.api(lab.api_run, api_name="race_lab", concurrency_id="lab", concurrency_limit=2)

    blocks.queue(default_concurrency_limit=8, max_size=2048)
    blocks.css = PAGE_CSS  # kept by Gradio's reload mode, which swaps in rebuilt apps without launching them
    blocks.chatkit_services = services  # type: ignore[attr-defined]  # for tests and main()
    services.attach_ui(blocks)
    return blocks
