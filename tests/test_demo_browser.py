"""A real browser (Debian's chromium, driven by playwright) using the demo like students would.

The demo runs in-process with the real local MiniLM embeddings and the bundled knowledge base. A reply to a
message that starts with ``HOLD`` waits until the test releases it (the model's latency hook), so "a reply
is pending" is a state the test controls, never a race against the clock. Every wait is playwright's
auto-waiting ``expect`` on something visible; nothing sleeps.

Covered: an error then a successful send; typing while a reply is pending; Stop; a reload restoring the
conversation; the layout at 390 px (a phone) and 1280 px (every tab: no horizontal overflow, no overlapping
blocks, nothing covering the conversation's first message, table headers not cut); the knowledge base
updating live across two browsers; the race lab; double texting. Screenshots of each step go to
``test-artifacts/``; with ``CHATKIT_UPDATE_SCREENSHOTS=1`` the README's pictures in ``docs/img/`` are
refreshed too (a normal run never modifies tracked files).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 1000}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.server,
    pytest.mark.model,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and not os.environ.get("CI"),
        reason=f"{CHROMIUM} is missing (apt-get install -y chromium); required when CI is set",
    ),
]


class Holds:
    """The model's latency hook, called on the server's event loop: a reply to a message starting with
    ``HOLD`` waits (in a worker thread) until the test releases that message; every other reply is immediate."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._gates: dict[str, threading.Event] = {}

    def _gate(self, text: str) -> threading.Event:
        with self._guard:
            return self._gates.setdefault(text, threading.Event())

    def __call__(self, text: str) -> Any:
        if not text.startswith("HOLD"):
            return 0
        return asyncio.to_thread(self._gate(text).wait, TIMEOUT_MS / 1000)

    def release(self, text: str) -> None:
        self._gate(text).set()

    def release_all(self) -> None:
        with self._guard:
            gates = list(self._gates.values())
        for gate in gates:
            gate.set()


@pytest.fixture(scope="module")
def holds() -> Iterator[Holds]:
    holds = Holds()
    yield holds
    holds.release_all()


@pytest.fixture(scope="module")
def url(local_embeddings: object, holds: Holds) -> Iterator[str]:
    config = demo_app.DemoConfig(embeddings="minilm", burst_latency=0.3, token_delay=0.01)  # the real data/
    services = demo_app.DemoServices(config, embeddings=local_embeddings, latency=holds)
    with serve(demo_app.build_demo(services=services)) as base:
        yield base


@pytest.fixture(scope="module")
def browser(url: str) -> Iterator[Any]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)  # generous on a shared 2-core machine; passing runs take ~1 s
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(browser: Any, url: str) -> Iterator[Any]:
    """``open_page(viewport=DESKTOP)``: a page in a new browser context (its own localStorage: another
    visitor), loaded and ready (the knowledge base loaded, the saved conversation restored)."""
    from playwright.sync_api import expect

    contexts: list[Any] = []

    def open_(viewport: dict[str, int] = DESKTOP, context: Any = None) -> Any:
        if context is None:
            context = browser.new_context(viewport=viewport)
            contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        expect(page.locator("#session-info")).to_contain_text("Your conversation")
        expect(page.locator("#loading-banner")).to_be_hidden()
        return page

    yield open_
    for context in contexts:
        context.close()


def _shot(page: Any, name: str, *, readme: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / f"demo-{name}.png"
    page.screenshot(path=str(target), full_page=True)
    if readme and os.environ.get("CHATKIT_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, DOCS_IMG / f"demo-{name}.png")


def _send(page: Any, text: str) -> None:
    box = page.locator("#message textarea")
    box.fill(text)
    box.press("Enter")


def _bot(page: Any) -> Any:
    return page.locator("#chatbot .bot")


def _replied(page: Any) -> None:
    """Wait until the reply has finished streaming (its first words show long before): Stop is disabled
    again and the sources are named."""
    from playwright.sync_api import expect

    expect(_bot(page).last).to_contain_text("According to")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#sources")).to_contain_text("Retrieved from")


# ------------------------------------------------------------------------------------------ chat
def test_a_reply_streams_in_and_names_its_source(open_page: Any) -> None:
    from playwright.sync_api import expect

    page = open_page()
    _send(page, "What is a lost update?")
    chatbot = page.locator("#chatbot")
    expect(chatbot).to_contain_text("What is a lost update?")
    source = re.compile(r"[\w-]+\.md")
    expect(page.locator("#sources")).to_contain_text(source)
    expect(_bot(page).last).to_contain_text(re.compile(r"^According to [\w-]+\.md: [A-Z]"))
    expect(page.locator("#message textarea")).to_have_value("")
    _shot(page, "chat-reply")


def test_an_error_then_a_successful_send(open_page: Any) -> None:
    """Before: after an empty or too-long message, "Error" badges stayed over the conversation, the sources
    and the message box, and the typed text was gone."""
    from playwright.sync_api import expect

    page = open_page()
    box = page.locator("#message textarea")
    _send(page, "   ")
    notice = page.locator("#chat-notice")
    expect(notice).to_have_text("The message is empty: type something first.")
    long = "y" * 2001
    _send(page, long)
    expect(notice).to_contain_text("The message is too long: 2,001 characters, the limit is 2,000.")
    expect(box).to_have_value(long)  # nothing typed is lost
    expect(box).to_be_editable()
    for block in ("#chatbot", "#sources", "#message", "#chat-notice"):
        expect(page.locator(f"{block} .error")).to_have_count(0)  # no "Error" badge over anything
    expect(page.locator(".toast-body")).to_have_count(0)  # and the notice is the only message: once
    _shot(page, "chat-error")
    box.fill("What is a snapshot?")
    box.press("Enter")
    expect(_bot(page).last).to_contain_text("According to")
    expect(notice).to_have_text("")
    expect(box).to_have_value("")


def test_text_typed_while_a_reply_is_pending_is_kept(open_page: Any, holds: Holds) -> None:
    """Before: the reply's handler cleared the box when it finished, erasing what was typed meanwhile."""
    from playwright.sync_api import expect

    page = open_page()
    _send(page, "HOLD while I type")
    expect(_bot(page).last).to_contain_text("writing the reply")  # pending, for real: the reply is held
    expect(page.locator("#stop")).to_be_enabled()
    box = page.locator("#message textarea")
    expect(box).to_have_value("")
    box.press_sequentially("my next question")
    box.press("Enter")  # sending while a reply is pending: the text stays, a notice says why
    expect(page.locator("#chat-notice")).to_contain_text("A reply is still being written")
    expect(box).to_have_value("my next question")
    holds.release("HOLD while I type")
    expect(_bot(page).last).to_contain_text("According to")
    expect(page.locator("#stop")).to_be_disabled()
    expect(box).to_have_value("my next question")
    box.press("Enter")
    expect(page.locator("#chatbot .user").last).to_have_text("my next question")
    expect(box).to_have_value("")


def test_stop_discards_the_turn_and_says_so(open_page: Any) -> None:
    from playwright.sync_api import expect

    page = open_page()
    _send(page, "What is a snapshot?")
    _replied(page)
    _send(page, "HOLD stop me")
    expect(_bot(page).last).to_contain_text("writing the reply")
    page.locator("#stop").click()
    expect(_bot(page).last).to_contain_text("Stopped.")
    expect(_bot(page).last).to_contain_text("were discarded: nothing of this turn was saved")
    expect(page.locator("#chat-notice")).to_contain_text("discarded")
    expect(page.locator("#stop")).to_be_disabled()
    page.reload()  # what is stored: the turn before, nothing of the stopped one
    expect(page.locator("#chatbot .user").last).to_have_text("What is a snapshot?")
    expect(page.locator("#chatbot")).not_to_contain_text("HOLD stop me")
    _send(page, "And what is a lost update?")  # the session is free for the next message
    expect(_bot(page).last).to_contain_text("According to")


def test_a_reload_restores_the_conversation_and_another_browser_starts_empty(open_page: Any) -> None:
    """Before: reloading the page started a new session."""
    from playwright.sync_api import expect

    page = open_page()
    _send(page, "What is double texting?")
    _replied(page)  # (a reload while it streams stops the turn, as Stop does)
    reply = _bot(page).last.inner_text()
    page.reload()
    expect(page.locator("#chatbot .user")).to_have_text(["What is double texting?"])
    expect(_bot(page)).to_have_text([reply])
    expect(page.locator("#session-info")).to_contain_text("1 of 50 messages used")
    second_tab = open_page(context=page.context)  # another tab of the same browser: the same conversation
    expect(second_tab.locator("#chatbot .user")).to_have_text(["What is double texting?"])
    stranger = open_page()  # another browser (its own storage): its own, empty conversation
    expect(stranger.locator("#chatbot .user")).to_have_count(0)
    saved = page.evaluate("() => Object.keys(localStorage)")
    assert saved == ["chatkit-demo-tokens"]  # one encrypted entry: the signed tokens, no raw session id


def test_double_texting_shows_what_each_message_did(open_page: Any) -> None:
    from playwright.sync_api import expect

    page = open_page()
    page.locator("#double-text").get_by_text("Double texting").first.click()
    expect(page.locator("#policy-table")).to_contain_text("the messages waiting are dropped")
    page.locator("#policy").get_by_text("interrupt").click()
    page.locator("#burst").click()
    outcomes = page.locator("#outcomes")
    expect(outcomes).to_contain_text("answered")
    expect(outcomes).to_contain_text("interrupted")
    _shot(page, "chat", readme=True)


def test_race_lab_runs_an_experiment_and_draws_its_timeline(open_page: Any) -> None:
    from playwright.sync_api import expect

    page = open_page()
    page.get_by_role("tab", name="Race lab").click()
    page.locator("#run-lab").click()
    expect(page.locator("#lab-summary")).to_contain_text(re.compile(r"\d+ anomalies"))
    expect(page.locator("#lab-plot .js-plotly-plot").first).to_be_visible()
    expect(page.locator("#anomalies")).to_contain_text("lost message")
    _shot(page, "race-lab", readme=True)
    page.locator("#locked input").check()
    page.locator("#run-lab").click()
    expect(page.locator("#lab-summary")).to_contain_text("no anomalies")
    expect(page.locator("#anomalies")).to_contain_text("No anomalies")
    _shot(page, "race-lab-fixed")


# ------------------------------------------------------------------------------------ knowledge base
def test_the_knowledge_base_updates_live_for_every_visitor(open_page: Any, tmp_path: Path) -> None:
    """Before: another visitor's upload appeared only after a reload, the tab never said the knowledge base
    was shared, anyone could remove anything, and the upload box kept the file (a second Add published it
    again)."""
    from playwright.sync_api import expect

    doc = tmp_path / "penguins.md"
    doc.write_text("# Penguins\n\nEmperor penguins huddle together to survive the Antarctic winter.\n")
    alice, bob = open_page(), open_page()
    for page in (alice, bob):
        page.get_by_role("tab", name="Knowledge base").click()
        expect(page.locator("#kb-shared")).to_contain_text("shared by everyone using the demo")
        expect(page.locator("#documents")).to_contain_text("race-conditions.md")
    alice.locator("#upload input[type=file]").set_input_files(str(doc))
    expect(alice.locator("#upload")).to_contain_text("penguins.md")
    alice.locator("#add-docs").click()
    expect(alice.locator("#upload-status")).to_contain_text(re.compile(r"penguins\.md`?, \d+ chunks?, published as version \d+"))
    expect(alice.locator("#upload")).not_to_contain_text("penguins.md")  # the box is cleared
    row = alice.locator("#documents tr", has_text="penguins.md")
    expect(row).to_contain_text("you,")
    expect(alice.locator("#remove-choice")).to_contain_text("Only the documents you added are listed.")
    expect(alice.locator("#remove-choice")).not_to_contain_text("Nothing to remove")
    bobs_row = bob.locator("#documents tr", has_text="penguins.md")
    expect(bobs_row).to_contain_text("visitor ")  # on bob's page, without a reload: the timer's refresh
    expect(bob.locator("#remove-choice")).to_contain_text("Nothing to remove")  # not his to remove
    query = alice.locator("#query textarea")
    query.fill("How do emperor penguins survive the winter?")
    query.press("Enter")
    expect(alice.locator("#search-note")).to_contain_text(re.compile(r"snapshot version \d+"))
    expect(alice.locator("#results")).to_contain_text("penguins.md")
    _shot(alice, "knowledge-base", readme=True)
    _shot(bob, "knowledge-base-other-visitor")
    alice.locator("#remove-choice input").click()
    alice.get_by_role("option", name="penguins.md").click()
    alice.locator("#remove").click()
    expect(alice.locator("#upload-status")).to_contain_text("Removed")
    expect(bob.locator("#documents")).not_to_contain_text("penguins.md")  # gone for bob too, live
    query.fill("   ")
    query.press("Enter")
    expect(alice.locator("#search-note")).to_have_text("Type something to search for.")
    expect(alice.locator("#results")).to_have_text("")  # no stale results next to the notice


# ------------------------------------------------------------------------------------------ layout
LAYOUT_JS = """
([blockIds, coveredSelectors]) => {
  const visible = (el) => {
    if (!el) return false;
    const r = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && style.visibility !== 'hidden' && style.display !== 'none';
  };
  const blocks = blockIds.map((id) => document.getElementById(id)).filter(visible);
  const overlaps = [];
  for (let i = 0; i < blocks.length; i++) {
    for (let j = i + 1; j < blocks.length; j++) {
      const a = blocks[i], b = blocks[j];
      if (a.contains(b) || b.contains(a)) continue;
      const r = a.getBoundingClientRect(), s = b.getBoundingClientRect();
      const x = Math.min(r.right, s.right) - Math.max(r.left, s.left);
      const y = Math.min(r.bottom, s.bottom) - Math.max(r.top, s.top);
      if (x > 1 && y > 1) overlaps.push(`${a.id} overlaps ${b.id}`);
    }
  }
  // the part of the screen where el can be seen: the viewport, clipped by every scrolling ancestor (a
  // message scrolled out of the conversation's box is hidden by it, not covered by what lies below)
  const clip = (el) => {
    let box = {left: 0, top: 0, right: innerWidth, bottom: innerHeight};
    for (let p = el.parentElement; p; p = p.parentElement) {
      const st = getComputedStyle(p);
      if (st.overflowX === 'visible' && st.overflowY === 'visible') continue;
      const q = p.getBoundingClientRect();
      box = {left: Math.max(box.left, q.left), top: Math.max(box.top, q.top),
             right: Math.min(box.right, q.right), bottom: Math.min(box.bottom, q.bottom)};
    }
    return box;
  };
  const covered = [];
  for (const sel of coveredSelectors) {
    for (const el of document.querySelectorAll(sel)) {
      if (!visible(el)) continue;
      const r = el.getBoundingClientRect();
      const c = clip(el);
      for (const [fx, fy] of [[0.1, 0.25], [0.5, 0.5], [0.9, 0.25]]) {
        const x = r.left + fx * r.width, y = r.top + fy * r.height;
        if (y < c.top || y > c.bottom || x < c.left || x > c.right) continue;
        const top = document.elementFromPoint(x, y);
        if (top && !el.contains(top) && !top.contains(el)) covered.push(`${sel} covered by ${top.tagName}.${top.className}`);
      }
    }
  }
  const cut = [];
  for (const th of document.querySelectorAll('.ck-table th')) {
    if (visible(th) && th.scrollWidth > th.clientWidth + 1) cut.push(`header "${th.textContent}" is cut`);
  }
  for (const table of document.querySelectorAll('.ck-table')) {
    if (visible(table) && table.scrollWidth > table.parentElement.clientWidth + 1) cut.push(`a table is wider than its box`);
  }
  return {
    scrollWidth: document.documentElement.scrollWidth, innerWidth: innerWidth, overlaps, covered, cut,
  };
}
"""
CHAT_BLOCKS = ["session-info", "chatbot", "chat-notice", "message", "send", "stop", "new-chat", "sources", "double-text"]
LAB_BLOCKS = ["experiment", "requests", "locked", "run-lab", "lab-summary", "lab-plot", "anomalies"]
KB_BLOCKS = ["kb-shared", "upload", "add-docs", "upload-status", "documents", "remove-choice", "remove",
             "restore-bundled", "query", "search", "search-note", "results"]


def _assert_layout(page: Any, blocks: list[str], covered: list[str] = ()) -> None:  # type: ignore[assignment]
    found = page.evaluate(LAYOUT_JS, [blocks, list(covered)])
    assert found["scrollWidth"] <= found["innerWidth"], f"the page is wider than the screen: {found}"
    assert found["overlaps"] == [], found["overlaps"]
    assert found["covered"] == [], found["covered"]
    assert found["cut"] == [], found["cut"]


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone-390", "desktop-1280"])
def test_every_tab_fits_the_screen_without_overlaps(open_page: Any, viewport: dict[str, int]) -> None:
    """Before, at 390 px: the knowledge-base columns (chunk, version, relevance, text) were off-screen, the
    Race lab timeline too small to read, the experiment dropdown cut off, and the "Conversation" label over
    the top message; at 1280 px, search results were cut off and headers broke mid-word ("ch un k")."""
    from playwright.sync_api import expect

    width = viewport["width"]
    page = open_page(viewport)
    _send(page, "What is a race condition?")
    _replied(page)
    page.locator("#double-text").get_by_text("Double texting").first.click()
    page.locator("#burst").click()
    expect(page.locator("#outcomes")).to_contain_text("answered")
    page.evaluate("window.scrollTo(0, 0)")
    page.locator("#chatbot .message").first.scroll_into_view_if_needed()
    _assert_layout(page, CHAT_BLOCKS, ["#chatbot .user", "#outcomes th, #outcomes td"])
    _shot(page, f"layout-{width}-chat", readme=width == PHONE["width"])

    page.get_by_role("tab", name="Race lab").click()
    page.locator("#run-lab").click()
    expect(page.locator("#lab-summary")).to_contain_text("anomalies")
    plot = page.locator("#lab-plot .js-plotly-plot").first
    expect(plot).to_be_visible()
    box = plot.bounding_box()
    assert box is not None and box["width"] >= 0.8 * min(width, 1200) - 80 and box["height"] >= 250  # legible
    dropdown = page.locator("#experiment input").bounding_box()
    assert dropdown is not None and dropdown["x"] + dropdown["width"] <= width
    _assert_layout(page, LAB_BLOCKS)
    _shot(page, f"layout-{width}-race-lab")

    page.get_by_role("tab", name="Knowledge base").click()
    expect(page.locator("#documents")).to_contain_text("race-conditions.md")
    query = page.locator("#query textarea")
    query.fill("Why do lost updates happen?")
    query.press("Enter")
    expect(page.locator("#search-note")).to_contain_text("version")
    for header in ("source", "relevance", "text") if width > 640 else ():
        expect(page.locator("#results th", has_text=header)).to_be_visible()
    if width <= 640:  # a card per result on a phone: the header row hidden, each cell labelled
        expect(page.locator("#results thead")).to_be_hidden()
        label = page.evaluate("getComputedStyle(document.querySelector('#results td'), '::before').content")
        assert "data-label" in label or label.startswith('"source')
    _assert_layout(page, KB_BLOCKS, ["#documents th", "#results td"])
    _shot(page, f"layout-{width}-knowledge-base", readme=width == PHONE["width"])
