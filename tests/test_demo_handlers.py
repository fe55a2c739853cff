"""The demo's handlers called directly (no server): chat, isolation, double texting, knowledge base, lab.

Each test builds its own services (hash embeddings, a three-file knowledge base): nothing is shared
between tests, and no model is loaded.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import gradio as gr
import pytest

import demo_app
from chatkit import HashEmbeddings
from demo_app import DemoHandlers, DemoServices, KnowledgeHandlers, RaceLabHandlers
from tests.test_demo_harness import fast_config, small_kb


@pytest.fixture
def services(tmp_path: Path) -> DemoServices:
    return DemoServices(fast_config(small_kb(tmp_path / "kb"), burst_latency=0.05))


@pytest.fixture
def chat(services: DemoServices) -> DemoHandlers:
    return DemoHandlers(services)


@pytest.fixture
def kb(services: DemoServices) -> KnowledgeHandlers:
    return KnowledgeHandlers(services)


def tab(name: str) -> gr.Request:
    """A request from the browser tab ``name``."""
    return gr.Request(session_hash=f"tab-{name}")


# ------------------------------------------------------------------------------------------- chat
async def test_chat_answers_from_the_knowledge_base_with_sources(chat: DemoHandlers) -> None:
    history, note, box = await chat.chat("What is a lost update?", tab("a"))
    assert box == ""
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "What is a lost update?"
    assert "lost-updates.md" in history[1]["content"]
    assert "`lost-updates.md`" in note


async def test_concurrent_messages_of_one_tab_all_land_in_order_of_arrival(chat: DemoHandlers) -> None:
    texts = [f"question {i}: what is a snapshot?" for i in range(5)]
    await asyncio.gather(*(chat.chat(t, tab("a")) for t in texts))
    history, _ = await chat.restore(tab("a"))
    assert [m["content"] for m in history[::2]] == texts
    assert [m["role"] for m in history] == ["user", "assistant"] * 5


async def test_tabs_are_isolated(chat: DemoHandlers) -> None:
    await chat.chat("my secret is 42", tab("alice"))
    bob, _ = await chat.restore(tab("bob"))
    assert bob == []
    alice_id = await chat.api_session(tab("alice"))
    assert await chat.api_session(tab("bob")) != alice_id
    with pytest.raises(gr.Error, match="does not belong to this browser session"):
        await chat.api_history(alice_id, tab("bob"))
    with pytest.raises(gr.Error, match="does not belong to this browser session"):
        await chat.api_send(alice_id, "overwrite", tab("bob"))
    alice = await chat.api_history(alice_id, tab("alice"))
    assert [m["content"] for m in alice][::2] == ["my secret is 42"]


async def test_a_request_without_a_browser_session_is_refused(chat: DemoHandlers) -> None:
    with pytest.raises(gr.Error, match="no browser session"):
        await chat.chat("hi", gr.Request())


@pytest.mark.parametrize(("message", "error"), [("  ", "empty"), ("y" * 2001, "the limit is 2,000")])
async def test_bad_messages_change_nothing(chat: DemoHandlers, message: str, error: str) -> None:
    await chat.chat("hello", tab("a"))
    before, _ = await chat.restore(tab("a"))
    with pytest.raises(gr.Error, match=error):
        await chat.chat(message, tab("a"))
    with pytest.raises(gr.Error, match=error):
        await chat.double_text(message, 2, "enqueue", tab("a"))
    after, _ = await chat.restore(tab("a"))
    assert after == before


async def test_unload_deletes_the_session_and_unbinds_it(chat: DemoHandlers, services: DemoServices) -> None:
    await chat.chat("hello", tab("a"))
    sid = await chat.api_session(tab("a"))
    await chat.unload(tab("a"))
    assert sid not in await services.manager.list_sessions()
    assert await chat.api_session(tab("a")) != sid  # a reload starts afresh
    await chat.unload(gr.Request())  # a request without a session: nothing to do


async def test_an_expired_session_is_replaced_with_a_clear_message(chat: DemoHandlers, services: DemoServices) -> None:
    sid = await chat.api_session(tab("a"))
    await services.manager.delete_session(sid)  # what expiry does
    with pytest.raises(gr.Error, match="expired"):
        await chat.chat("still there?", tab("a"))
    history, _, _ = await chat.chat("still there?", tab("a"))
    assert [m["content"] for m in history][::2] == ["still there?"]


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


async def test_double_texting_slows_only_its_own_turns(chat: DemoHandlers, services: DemoServices) -> None:
    assert services._latency("anything") == services.config.latency  # outside a burst
    await chat.double_text("hi", 2, "enqueue", tab("a"))
    assert demo_app._BURST.get() is None


@pytest.mark.parametrize(
    ("count", "policy", "error"),
    [(0, "enqueue", "between 1 and 5"), (6, "enqueue", "between 1 and 5"), (2, "shout", "Unknown policy")],
)
async def test_double_texting_bad_controls(chat: DemoHandlers, count: int, policy: str, error: str) -> None:
    with pytest.raises(gr.Error, match=error):
        await chat.double_text("hi", count, policy, tab("a"))


# ------------------------------------------------------------------------------------ knowledge base
async def test_upload_list_search_remove(kb: KnowledgeHandlers, tmp_path: Path) -> None:
    doc = tmp_path / "penguins.md"
    doc.write_text("# Penguins\n\nEmperor penguins huddle together in the antarctic winter.\n")
    status, rows, choices = await kb.upload([str(doc)])
    assert "**added**: `penguins.md`" in status
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == {"penguins.md", "lost-updates.md", "snapshots.md", "double-texting.md"}
    version = by_name["penguins.md"][2]
    assert version > by_name["snapshots.md"][2]
    assert "penguins.md" in choices["choices"]

    results, note = await kb.search("emperor penguins in winter", 2)
    assert results[0][0] == "penguins.md" and len(results) == 2
    assert f"snapshot **version {version}**" in note

    doc.write_text("# Penguins\n\nPenguins cannot fly, but they swim fast.\n")
    status, rows, _ = await kb.upload([str(doc)])
    assert "**replaced**: `penguins.md`" in status
    status, rows, choices = await kb.remove("penguins.md")
    assert "Removed" in status and "penguins.md" not in {r[0] for r in rows}
    assert "penguins.md" not in choices["choices"]
    status, _, _ = await kb.remove("penguins.md")
    assert "was not in the knowledge base" in status


async def test_bad_uploads_are_reported_and_nothing_stored_is_lost(kb: KnowledgeHandlers, tmp_path: Path) -> None:
    before = await kb.documents()
    good = tmp_path / "good.txt"
    good.write_text("Good text about locks.")
    files = {
        "slides.pdf": b"%PDF",
        "latin1.md": "caf\u00e9".encode("latin-1"),
        "huge.md": b"a" * (kb.services.config.max_upload_bytes + 1),
        "empty.txt": b"   ",
        # a bad file replacing an existing document must not touch it
        "lost-updates.md": b"\xff\xfe broken",
    }
    paths = [str(good)]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    status, rows, _ = await kb.upload(paths)
    assert status.count("**not added**") == len(files)
    for message in ("only .md and .txt", "not valid UTF-8", "the limit is", "empty"):
        assert message in status
    assert {tuple(r) for r in before} <= {tuple(r) for r in rows}
    assert {r[0] for r in rows} == {r[0] for r in before} | {"good.txt"}


@pytest.mark.parametrize(
    ("files", "error"),
    [(None, "Choose one or more"), ([], "Choose one or more"), (["a.md"] * 21, "at most 20 files at once, not 21")],
)
async def test_upload_without_files(kb: KnowledgeHandlers, files: list[str] | None, error: str) -> None:
    with pytest.raises(gr.Error, match=error):
        await kb.upload(files)


@pytest.mark.parametrize(("query", "error"), [("  ", "Type something"), ("q" * 2001, "too long")])
async def test_bad_searches(kb: KnowledgeHandlers, query: str, error: str) -> None:
    with pytest.raises(gr.Error, match=error):
        await kb.search(query, 3)


async def test_remove_without_a_choice(kb: KnowledgeHandlers) -> None:
    with pytest.raises(gr.Error, match="Choose a document"):
        await kb.remove(None)


# ------------------------------------------------------------------------------------------ race lab
@pytest.mark.parametrize("experiment", list(demo_app.EXPERIMENTS))
async def test_race_lab_shows_the_race_then_the_fix(services: DemoServices, experiment: str) -> None:
    lab = RaceLabHandlers(services)
    figure, anomalies, summary = await lab.run(experiment, 3, False)
    assert anomalies and summary.startswith(f"**{len(anomalies)} anomalies**")
    assert figure.axes  # a matplotlib figure with the timeline
    figure, anomalies, summary = await lab.run(experiment, 3, True)
    assert anomalies == [] and summary.startswith("**no anomalies**")
    assert not services.is_ready  # the lab never touches the demo's own sessions or knowledge base


@pytest.mark.parametrize(("experiment", "n", "error"), [("nope", 3, "Unknown experiment"), (None, 1, "between 2 and 20")])
async def test_race_lab_bad_controls(services: DemoServices, experiment: str | None, n: int, error: str) -> None:
    lab = RaceLabHandlers(services)
    with pytest.raises(gr.Error, match=error):
        await lab.run(experiment or next(iter(demo_app.EXPERIMENTS)), n, False)


class _GatedEmbeddings(HashEmbeddings):
    """Hash embeddings whose document embedding blocks (in the store's worker thread) until released,
    for texts containing ``GATE``; queries are never blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if any("GATE" in t for t in texts):
            self.entered.set()
            if not self.release.wait(timeout=60):
                raise TimeoutError("the test never released the embedding")
        return super().embed_documents(texts)


async def test_visitors_keep_chatting_and_searching_while_a_document_is_indexed(tmp_path: Path) -> None:
    embeddings = _GatedEmbeddings()
    services = DemoServices(fast_config(small_kb(tmp_path / "kb")), embeddings=embeddings)
    chat, kb = DemoHandlers(services), KnowledgeHandlers(services)
    await services.ready()
    doc = tmp_path / "big.md"
    doc.write_text("# Big\n\nGATE " + "penguins " * 200)
    upload = asyncio.create_task(kb.upload([str(doc)]))
    try:
        assert await asyncio.to_thread(embeddings.entered.wait, 60)  # indexing is under way
        history, _, _ = await chat.chat("What is a snapshot?", tab("other"))
        assert [m["role"] for m in history] == ["user", "assistant"]
        results, note = await kb.search("penguins", 3)
        assert "big.md" not in {r[0] for r in results}  # not published yet: readers see the old version
        assert not upload.done()
    finally:
        embeddings.release.set()
    status, rows, _ = await upload
    assert "**added**: `big.md`" in status and "big.md" in {r[0] for r in rows}
    results, note = await kb.search("penguins", 3)
    assert results[0][0] == "big.md"
