"""A real browser (Debian's chromium, driven by playwright) using the demo like a visitor would.

Chat with a sourced reply and a double-texting burst, one race-lab experiment with its plot, and an upload
found by search, with the real local MiniLM embeddings (the demo's default). Screenshots go to
``test-artifacts/`` (every step); with ``CHATKIT_UPDATE_SCREENSHOTS=1`` the one-per-tab pictures are also
copied to ``docs/img/`` for the README (a normal test run never modifies tracked files).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.test_demo_harness import ARTIFACTS, REPO, serve

import demo_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_IMG = REPO / "docs" / "img"
TIMEOUT_MS = 120_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.server,
    pytest.mark.model,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and not os.environ.get("CI"),
        reason=f"{CHROMIUM} is missing (apt-get install -y chromium); required when CI is set",
    ),
]


@pytest.fixture(scope="module")
def url(local_embeddings: object) -> Iterator[str]:
    config = demo_app.DemoConfig(embeddings="minilm", burst_latency=0.3)  # the real data/ knowledge base
    with serve(demo_app.build_demo(config)) as base:
        yield base


@pytest.fixture(scope="module")
def page(url: str) -> Iterator[object]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)  # generous on a shared 2-core machine; passing runs take ~1 s
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            yield page
        finally:
            browser.close()


def _shot(page, name: str, *, readme: bool = False) -> None:  # page: playwright Page
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / f"demo-{name}.png"
    page.screenshot(path=str(target), full_page=True)
    if readme and os.environ.get("CHATKIT_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, DOCS_IMG / f"demo-{name}.png")


def test_chat_reply_shows_its_source(page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#session-info")).to_contain_text("Your private chat session")
    box = page.locator("#message textarea")
    box.fill("What is a lost update?")
    box.press("Enter")
    chatbot = page.locator("#chatbot")
    expect(chatbot).to_contain_text("What is a lost update?")
    source = re.compile(r"[\w-]+\.md")
    expect(page.locator("#sources")).to_contain_text(source)
    expect(chatbot.locator(".bot").last).to_contain_text(source)  # the extractive model names its source
    expect(box).to_have_value("")
    _shot(page, "chat-reply")


def test_double_texting_shows_what_each_message_did(page) -> None:
    from playwright.sync_api import expect

    page.locator("#double-text").get_by_text("Double texting").first.click()
    page.locator("#policy").get_by_text("interrupt").click()
    page.locator("#burst").click()
    outcomes = page.locator("#outcomes")
    expect(outcomes).to_contain_text("answered")
    expect(outcomes).to_contain_text("interrupted")
    _shot(page, "chat", readme=True)


def test_race_lab_runs_an_experiment_and_draws_its_timeline(page) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Race lab").click()
    page.locator("#run-lab").click()
    expect(page.locator("#lab-summary")).to_contain_text(re.compile(r"\d+ anomalies"))
    expect(page.locator("#lab-plot img").first).to_be_visible()
    _shot(page, "race-lab", readme=True)
    page.locator("#locked input").check()
    page.locator("#run-lab").click()
    expect(page.locator("#lab-summary")).to_contain_text("no anomalies")
    expect(page.locator("#lab-plot img").first).to_be_visible()
    _shot(page, "race-lab-fixed")


def test_upload_is_found_by_search_with_its_snapshot_version(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    doc = tmp_path / "penguins.md"
    doc.write_text("# Penguins\n\nEmperor penguins huddle together to survive the Antarctic winter.\n")
    page.get_by_role("tab", name="Knowledge base").click()
    expect(page.locator("#documents")).to_contain_text(".md")
    page.locator("#upload input[type=file]").set_input_files(str(doc))
    page.locator("#add-docs").click()
    # Wait for the finished report: while indexing runs, the outputs show Gradio's progress overlay
    # ("indexing penguins.md"), which would match the file name before the document is published.
    expect(page.locator("#upload-status")).to_contain_text(re.compile(r"penguins\.md`?, \d+ chunks?, published as version \d+"))
    expect(page.locator("#documents")).to_contain_text("penguins.md")
    query = page.locator("#query textarea")
    query.fill("How do emperor penguins survive the winter?")
    query.press("Enter")
    expect(page.locator("#search-note")).to_contain_text(re.compile(r"snapshot version \d+"))
    expect(page.locator("#results")).to_contain_text("penguins.md")
    _shot(page, "knowledge-base", readme=True)
