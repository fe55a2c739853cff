"""The Gradio UI: :func:`build_demo` lays out the three tabs and wires their events to the handlers."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .chat import DemoHandlers
from .config import ALLOWED_SUFFIXES, CHAT_LIMIT, POLICIES, POLICY_HELP, DemoConfig
from .knowledge import KnowledgeHandlers
from .racelab import EXPERIMENTS, RaceLabHandlers
from .services import DemoServices


# ---------------------------------------------------------------------------------------------- UI
INTRO = """# chatkit demo: chat that stays correct under concurrency
Every browser tab gets its own private chat session. Send several messages at once, upload documents
while others chat, and watch races happen (and disappear) in the **Race lab**."""


def build_demo(
    config: DemoConfig | None = None,
    *,
    services: DemoServices | None = None,
    chat_concurrency: int | None = CHAT_LIMIT,
) -> gr.Blocks:
    """Build the Gradio app. Cheap: nothing heavy loads until the first request (or ``services.ready()``).

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

    with gr.Blocks(title="chatkit demo", analytics_enabled=False) as blocks:
        gr.Markdown(INTRO)
        with gr.Tab("Chat", id="chat"):
            session_md = gr.Markdown(elem_id="session-info")
            chatbot = gr.Chatbot(
                label="Conversation", height=380, elem_id="chatbot", buttons=["copy"],
                group_consecutive_messages=False,
            )
            sources = gr.Markdown(elem_id="sources")
            with gr.Row():
                message = gr.Textbox(
                    placeholder="Ask about race conditions, locks, snapshots, double texting…",
                    show_label=False, scale=5, max_lines=4, elem_id="message",
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Accordion("Double texting: send several messages at once", open=False, elem_id="double-text"):
                with gr.Row():
                    policy = gr.Radio(list(POLICIES), value="enqueue", label="Policy", elem_id="policy")
                    count = gr.Slider(2, cfg.max_burst, value=min(3, cfg.max_burst), step=1, label="Messages at once")
                burst_message = gr.Textbox(value="What is a lost update?", label="Message", elem_id="burst-message")
                burst = gr.Button("Send them all at once", elem_id="burst")
                policy_help = gr.Markdown(POLICY_HELP["enqueue"])
                outcomes = gr.Dataframe(
                    headers=["message", "what happened", "reply"], interactive=False, wrap=True, elem_id="outcomes"
                )

        with gr.Tab("Race lab", id="lab"):
            gr.Markdown(
                "Run a race on private objects: several concurrent requests, without and with chatkit's lock. "
                "Bars show waiting for the lock, holding it and the work; a red **X** marks damage."
            )
            with gr.Row():
                experiment = gr.Dropdown(list(EXPERIMENTS), value=next(iter(EXPERIMENTS)), label="Experiment", scale=3)
                requests = gr.Slider(
                    2, 10, value=3, step=1, scale=2,
                    label="Concurrent requests (vector store: chunks of the replaced document)",
                )
                locked = gr.Checkbox(
                    value=False, label="Use chatkit (lock / copy-on-write store)", scale=1, elem_id="locked"
                )
            run = gr.Button("Run experiment", variant="primary", elem_id="run-lab")
            lab_summary = gr.Markdown(elem_id="lab-summary")
            plot = gr.Plot(label="Timeline", elem_id="lab-plot")
            anomalies = gr.Dataframe(headers=["anomaly", "request", "detail"], interactive=False, wrap=True)

        with gr.Tab("Knowledge base", id="kb"):
            with gr.Row():
                with gr.Column(scale=2):
                    files = gr.File(
                        file_count="multiple", file_types=list(ALLOWED_SUFFIXES), type="filepath",
                        label=f"Add .md or .txt files (UTF-8, at most {cfg.max_upload_bytes // 1024} KiB each)",
                        elem_id="upload",
                    )
                    add = gr.Button("Add to knowledge base", variant="primary", elem_id="add-docs")
                    upload_status = gr.Markdown(elem_id="upload-status")
                with gr.Column(scale=3):
                    documents = gr.Dataframe(
                        headers=["document", "chunks", "version"], interactive=False, elem_id="documents",
                        max_height=300,
                    )
                    with gr.Row():
                        to_remove = gr.Dropdown([], label="Remove a document", scale=3, elem_id="remove-choice")
                        remove = gr.Button("Remove", variant="stop", scale=1, elem_id="remove")
            with gr.Row():
                query = gr.Textbox(label="Search the knowledge base", scale=5, elem_id="query")
                k = gr.Slider(1, 10, value=4, step=1, label="Results", scale=1)
                search = gr.Button("Search", scale=1, elem_id="search")
            search_note = gr.Markdown(elem_id="search-note")
            results = gr.Dataframe(
                headers=["source", "chunk", "relevance", "text"], interactive=False, wrap=True, elem_id="results"
            )

        # -- events. Chat-like events share one generous pool: sessions run in parallel, a session's
        # turns are serialized by chatkit's per-session lock, not by Gradio's queue.
        chat_kw: dict[str, Any] = {"concurrency_id": "chat", "concurrency_limit": chat_concurrency}
        gr.on(
            [message.submit, send.click], chat.chat, [message], [chatbot, sources, message],
            api_name="chat", **chat_kw,
        )
        burst.click(
            chat.double_text, [burst_message, count, policy], [chatbot, outcomes, policy_help],
            api_name="double_text", **chat_kw,
        )
        policy.change(lambda p: POLICY_HELP.get(p, ""), [policy], [policy_help], api_visibility="private", queue=False)
        run.click(lab.run, [experiment, requests, locked], [plot, anomalies, lab_summary],
                  api_name="race_lab", concurrency_id="lab", concurrency_limit=2)
        add.click(kb.upload, [files], [upload_status, documents, to_remove],
                  api_name="upload", concurrency_id="kb_write", concurrency_limit=4)
        remove.click(kb.remove, [to_remove], [upload_status, documents, to_remove],
                     api_name="remove", concurrency_id="kb_write", concurrency_limit=4)
        gr.on([query.submit, search.click], kb.search, [query, k], [results, search_note],
              api_name="search", concurrency_id="kb_read", concurrency_limit=None)
        blocks.load(chat.restore, None, [chatbot, session_md], api_name="on_load_chat", api_visibility="private",
                    **chat_kw)
        blocks.load(kb.documents, None, [documents], api_name="on_load_documents", api_visibility="private",
                    concurrency_limit=None)
        blocks.load(kb.source_choices, None, [to_remove], api_name="on_load_choices", api_visibility="private",
                    concurrency_limit=None)
        blocks.unload(chat.unload)
        gr.api(kb.documents, api_name="documents", concurrency_limit=None)
        gr.api(chat.api_session, api_name="my_session", **chat_kw)
        gr.api(chat.api_history, api_name="history", **chat_kw)
        gr.api(chat.api_send, api_name="send", **chat_kw)

    blocks.queue(default_concurrency_limit=8, max_size=2048)
    blocks.chatkit_services = services  # type: ignore[attr-defined]  # for tests and main()
    return blocks
